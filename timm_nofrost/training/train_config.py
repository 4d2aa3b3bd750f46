"""Settings of a ``timm-nofrost train`` run: the authors' recipe, a CPU-sized demo preset, and the checks that
run before any training starts."""
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Tuple

import timm
import torch.nn as nn

from ..attacks.spec import parse_attack
from ..files import check_writable_dir
from ..pixels import amp_dtype
from ..settings import DataSettings, ModelSettings, RunSettings, flag_of, iter_settings, setting, setting_of
from .adversarial import AdversarialConfig
from .presets import ADAMW_LR, DEMO_MODEL, DEMO_MODEL_KWARGS, chain, resolve

__all__ = ['TrainConfig', 'TrainingDiverged', 'resolve_config', 'apply_presets', 'check_out_dir', 'check_model_name',
           'resume_differences', 'RUN_MANAGEMENT',
           'DEMO_MODEL', 'DEMO_MODEL_KWARGS', 'OPTIMIZERS', 'CHECKPOINT_LAST', 'CHECKPOINT_BEST', 'SUMMARY']


OPTIMIZERS = ('sgd', 'adamw')

CHECKPOINT_LAST = 'checkpoint-last.pth'
CHECKPOINT_BEST = 'model_best.pth'
SUMMARY = 'summary.jsonl'
# where a run is written and how it starts, not what it computes: the only outcome settings --resume may change
RUN_MANAGEMENT = ('out_dir', 'resume', 'overwrite', 'initial_checkpoint')


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: training stopped, the last good checkpoint is kept."""


@dataclass
class TrainConfig(RunSettings, ModelSettings, DataSettings):
    """Settings of one training run; ``None`` means the preset's value (``timm_nofrost.training.presets``: the
    authors' recipe, or the demo preset on the demo data). Each field carries its flag and help (``setting``)."""
    epochs: Optional[int] = setting(None, group='optimisation', type=int, metavar='N', help='epochs')
    batch_size: Optional[int] = setting(None, group='optimisation', short='-b', type=int, metavar='N',
                                        help='images per process and step')
    opt: Optional[str] = setting(None, group='optimisation', choices=OPTIMIZERS,
                                 help='optimizer: sgd (Nesterov) or adamw')
    lr: Optional[float] = setting(None, group='optimisation', type=float, metavar='LR', help='learning rate',
                                  default_help=f'SGD 0.1 x global batch / 256, AdamW {ADAMW_LR:g}')
    weight_decay: float = setting(5e-5, group='optimisation', type=float, metavar='WD', help='weight decay')
    momentum: float = setting(0.9, group='optimisation', type=float, metavar='M', help='SGD (Nesterov) momentum')
    warmup_epochs: int = setting(0, group='optimisation', type=int, metavar='N', help='linear lr warm-up epochs')
    smoothing: float = setting(0.1, group='optimisation', type=float, metavar='S', help='label smoothing')
    scale: Optional[Tuple[float, float]] = setting(
        None, group='augmentation', type=float, nargs=2, metavar=('MIN', 'MAX'),
        help='RandomResizedCrop area range; small images such as 28 px Fashion-MNIST want a narrower range, e.g. '
             '0.6 1.0')
    color_jitter: Optional[float] = setting(None, group='augmentation', type=float, metavar='F',
                                            help='colour jitter strength')
    hflip: float = setting(0.5, group='augmentation', type=float, metavar='P', help='horizontal flip probability')
    adv: Optional[AdversarialConfig] = field(default=None, metadata={'nested': AdversarialConfig})
    eval_attack: str = setting('pgd-10', group='evaluation', metavar='NAME',
                               help='attack for the per-epoch robust accuracy')
    final_attacks: str = setting('clean,pgd-20,apgd-ce', group='evaluation', metavar='LIST',
                                 help='attacks of the final table')
    robust_examples: Optional[int] = setting(
        None, group='evaluation', type=int, metavar='N',
        help='validation images attacked every epoch, spread evenly over the set, the same every epoch')
    compare_bn: bool = setting(False, group='evaluation',
                               help="also train the model's BatchNorm twin the same way (BN-AT) and compare in the "
                                    'final table')
    baseline_model: Optional[str] = setting(None, group='evaluation', metavar='NAME',
                                            help='the BatchNorm model of BN-AT (--compare-bn, the bn arms of a study)',
                                            default_help='the twin of --model, e.g. resnet50')
    out_dir: str = setting('output/nofrost', group='run', flag='--out', metavar='DIR',
                           help='output folder: checkpoints, summary.jsonl, results.json')
    resume: Optional[str] = setting(None, group='run', nargs='?', const='auto', metavar='CHECKPOINT',
                                    help='continue a run: from CHECKPOINT, or from OUT/checkpoint-last.pth when no '
                                         'path is given (starting it when OUT holds none yet); every setting that '
                                         'can change the result must be the recorded one')
    overwrite: bool = setting(False, group='run', help='start over in an OUT that holds a previous run')
    seed: int = setting(0, group='run', type=int, metavar='SEED', help='random seed')
    deterministic: bool = setting(False, group='run', outcome=False,
                                  help='deterministic algorithms: a resumed run ends with the same weights as an '
                                       'uninterrupted one')
    channels_last: bool = setting(False, group='run', help='channels_last memory format')
    initial_checkpoint: Optional[str] = setting(
        None, group='run', metavar='CHECKPOINT',
        help="start from these weights (a checkpoint of another run, timm's or the authors'): a new run with a fresh "
             'optimizer and schedule, recorded in results.json; --resume continues a run instead')

    @property
    def data_split_seed(self) -> int:
        """The seed of the held-out split of a single folder: ``split_seed``, else the run's ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# resolve_config's checks, in order: (setting, what it must be, test); optional settings' tests accept None
_CHECKS: Tuple[Tuple[str, str, Callable[[Any], bool]], ...] = (
    ('split_seed', 'an integer', lambda v: v is None or _is_int(v)),
    *((name, 'a positive integer', lambda v: v is None or _is_int(v) and v >= 1)
      for name in ('epochs', 'batch_size', 'robust_examples', 'img_size', 'num_classes')),
    ('workers', 'an integer >= 0', lambda v: _is_int(v) and v >= 0),
    ('lr', 'a positive number', lambda v: v is None or math.isfinite(v) and v > 0),
    ('val_fraction', 'in (0, 1)', lambda v: 0 < v < 1),
    ('scale', 'two numbers 0 < MIN <= MAX <= 1 (the RandomResizedCrop area range)',
     lambda v: v is None or len(v) == 2 and 0 < v[0] <= v[1] <= 1),
    ('color_jitter', '>= 0', lambda v: v is None or 0 <= v),
    ('hflip', 'a probability in [0, 1]', lambda v: 0 <= v <= 1),
    ('smoothing', 'in [0, 1)', lambda v: 0 <= v < 1),
)


def apply_presets(cfg: TrainConfig, presets: Tuple[str, ...]) -> TrainConfig:
    """Fill ``cfg``'s unset settings from ``presets`` (``timm_nofrost.training.presets.resolve``), in place;
    an unset ``adv`` becomes the presets' ``AdversarialConfig``."""
    for name, value in resolve({f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != 'adv'}, presets).items():
        setattr(cfg, name, value)
    if cfg.adv is None:
        cfg.adv = AdversarialConfig(steps=resolve({'steps': None}, presets)['steps'])
    elif not isinstance(cfg.adv, AdversarialConfig):
        raise TypeError(f'adv must be an AdversarialConfig, got {type(cfg.adv).__name__}.')
    return cfg


def resolve_config(cfg: TrainConfig, model: Optional[nn.Module] = None,
                   presets: Optional[Tuple[str, ...]] = None) -> TrainConfig:
    """Fill unset values (``presets``, default: the recipe, or the demo preset on the demo data) and validate
    everything before training.

    With a ready ``model``, ``cfg.model`` is only its label (default: the class name).
    """
    if model is not None:
        cfg.model = cfg.model or type(model).__name__
    apply_presets(cfg, presets or chain(cfg.data))
    if cfg.opt not in OPTIMIZERS:
        raise ValueError(f'Unknown optimizer {cfg.opt!r}; accepted: {", ".join(OPTIMIZERS)}.')
    for name, what, valid in _CHECKS:
        if not valid(getattr(cfg, name)):
            raise ValueError(f'{name} must be {what}, got {getattr(cfg, name)!r}.')
    if cfg.scale is not None:
        cfg.scale = (float(cfg.scale[0]), float(cfg.scale[1]))
    cfg.amp = None if amp_dtype(cfg.amp) is None else cfg.amp  # 'none' and None are both off; else a ValueError
    if parse_attack(cfg.eval_attack).kind == 'clean':
        raise ValueError(f'eval_attack must be an attack, not {cfg.eval_attack!r} (e.g. pgd-10, apgd-ce).')
    for name in cfg.final_attacks.split(','):
        parse_attack(name.strip())
    if model is None:
        check_model_name(cfg.model)
    return cfg


def check_model_name(name: str) -> None:
    """A ValueError naming ``name`` and similar timm names when timm does not know it (``hf-hub:`` / ``local-dir:``
    are timm's to check)."""
    if name.startswith(('hf-hub:', 'local-dir:')):
        return
    arch = name.split('.', 1)[0]
    if not timm.is_model(arch):
        close = timm.list_models(f'*{arch[:6]}*')[:8] if len(arch) >= 3 else []
        hint = f'; similar names: {", ".join(close)}' if close else ''
        raise ValueError(f'Unknown model {name!r}: not a timm model name{hint}. NoFrost models: '
                         f'{", ".join(timm.list_models("*nofrost*"))}.')


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Writable, and not holding another run's checkpoints unless resuming or overwriting."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f'Output path {out_dir} exists and is not a directory.')
    if not resume and not overwrite and (out_dir / CHECKPOINT_LAST).exists():
        raise FileExistsError(f'{out_dir} already holds a training run ({CHECKPOINT_LAST}); pass --resume to '
                              f'continue it or --overwrite to start over.')
    check_writable_dir(out_dir, 'Output directory')


def resume_differences(recorded: Mapping[str, Any], cfg: Mapping[str, Any]) -> List[str]:
    """``'--FLAG RECORDED (this command: VALUE)'`` for every setting that can change a run's result (all but
    ``outcome=False`` ones and ``RUN_MANAGEMENT``) whose value in ``cfg`` differs from the ``recorded`` run's; both
    are ``config_to_json`` dicts. Settings the record predates are not compared."""
    found = []
    for f in iter_settings(TrainConfig, RUN_MANAGEMENT):
        old, new = (recorded.get('adv', {}), cfg['adv']) if f.name in _ADV_NAMES else (recorded, cfg)
        if setting_of(f).outcome and f.name in old and not _same(old[f.name], new.get(f.name)):
            found.append(f'{flag_of(f)} {_shown(old[f.name])} (this command: {_shown(new.get(f.name))})')
    return found


_ADV_NAMES = frozenset(f.name for f in iter_settings(AdversarialConfig))


def _same(old: Any, new: Any) -> bool:
    """Equal as JSON, or two names of the same existing path."""
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new))
    if isinstance(old, str) and isinstance(new, str) and old != new and Path(old).exists():
        return Path(old).resolve() == Path(new).resolve()
    return old == new


def _shown(value: Any) -> str:
    return 'unset' if value is None else f'{value:g}' if isinstance(value, float) else str(value)
