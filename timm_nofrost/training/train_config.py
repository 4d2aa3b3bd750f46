"""Settings of a ``timm-nofrost train`` run: the authors' recipe, a CPU-sized demo preset, and the checks that
run before any training starts."""
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch.nn as nn

from ..attacks.spec import parse_attack
from ..files import check_writable_dir
from ..pixels import amp_dtype
from ..data.sources import DEMO_IMG_SIZE
from .config import AdversarialConfig

__all__ = ['TrainConfig', 'TrainingDiverged', 'resolve_config', 'preset_for', 'check_out_dir', 'check_model_name',
           'DEMO_MODEL', 'DEMO_MODEL_KWARGS', 'RECIPE', 'DEMO', 'OPTIMIZERS', 'CHECKPOINT_LAST', 'CHECKPOINT_BEST',
           'SUMMARY']


DEMO_MODEL = 'nf_resnet18_cifar_nofrost'
DEMO_MODEL_KWARGS: Dict[str, Any] = {'channels': (16, 32, 64, 128), 'stem_chs': 16, 'drop_rate': 0.0,
                                     'drop_path_rate': 0.0}
# defaults when the user leaves a setting unset: the authors' recipe (SGD, lr 0.1 per 256 images), and a demo
# preset sized for a CPU (a narrow model, AdamW, which gets a zero-initialised NF net going within an epoch)
RECIPE = dict(model='nf_resnet50_nofrost', epochs=90, batch_size=256, img_size=224, attack_steps=10, opt='sgd')
DEMO = dict(model=DEMO_MODEL, epochs=4, batch_size=64, img_size=DEMO_IMG_SIZE, attack_steps=3, opt='adamw', lr=3e-3)
OPTIMIZERS = ('sgd', 'adamw')

CHECKPOINT_LAST = 'checkpoint-last.pth'
CHECKPOINT_BEST = 'model_best.pth'
SUMMARY = 'summary.jsonl'


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: training stopped, the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Settings of one training run; ``None`` means the recipe's value (or the demo preset's on demo data)."""
    data: str = 'demo'
    data_dir: Optional[str] = None
    val_fraction: float = 0.1
    split_seed: Optional[int] = None  # seed of the held-out split of a single folder; None: ``seed``
    model: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    convert: bool = False
    num_classes: Optional[int] = None
    img_size: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    opt: Optional[str] = None  # 'sgd' (Nesterov) or 'adamw'
    lr: Optional[float] = None  # None: SGD 0.1 per 256 images of global batch, AdamW 3e-3
    weight_decay: float = 5e-5
    momentum: float = 0.9
    warmup_epochs: int = 0
    smoothing: float = 0.1
    # training augmentation (timm's create_transform): RandomResizedCrop scale range, colour jitter, flip
    # probability; None: timm's ImageNet defaults (0.08-1, 0.4), on the demo data 0.6-1 and no jitter
    scale: Optional[Tuple[float, float]] = None
    color_jitter: Optional[float] = None
    hflip: float = 0.5
    adv: Optional[AdversarialConfig] = None  # None: the recipe (PGD-10), PGD-3 on the demo data
    eval_attack: str = 'pgd-10'
    final_attacks: str = 'clean,pgd-20,apgd-ce'
    robust_examples: int = 256
    compare_bn: bool = False
    baseline_model: Optional[str] = None
    out_dir: str = 'output/nofrost'
    resume: Optional[str] = None  # a checkpoint path, or 'auto' for OUT_DIR/checkpoint-last.pth
    overwrite: bool = False
    seed: int = 0
    deterministic: bool = False
    workers: int = 0
    device: Optional[str] = None
    amp: Optional[str] = None  # None, 'bf16' or 'fp16'
    channels_last: bool = False
    progress: bool = True

    @property
    def data_split_seed(self) -> int:
        """The seed of the held-out split of a single folder: ``split_seed``, else the run's ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed


def _positive_int(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f'{name} must be a positive integer, got {value!r}.')


def preset_for(data: str) -> Dict[str, Any]:
    """The defaults for unset settings: the demo preset on the demo data, else the authors' recipe."""
    return DEMO if data == 'demo' else RECIPE


def resolve_config(cfg: TrainConfig, model: Optional[nn.Module] = None) -> TrainConfig:
    """Fill unset values (recipe, or demo preset on the demo data) and validate everything before training.

    With a ready ``model``, ``cfg.model`` is only its label (default: the class name).
    """
    preset = preset_for(cfg.data)
    if model is not None:
        cfg.model = cfg.model or type(model).__name__
    cfg.model = cfg.model or preset['model']
    if cfg.model == DEMO_MODEL and cfg.data == 'demo' and not cfg.model_kwargs:
        cfg.model_kwargs = dict(DEMO_MODEL_KWARGS)
    cfg.epochs = cfg.epochs if cfg.epochs is not None else preset['epochs']
    cfg.batch_size = cfg.batch_size if cfg.batch_size is not None else preset['batch_size']
    cfg.opt = cfg.opt or preset['opt']
    if cfg.opt not in OPTIMIZERS:
        raise ValueError(f'Unknown optimizer {cfg.opt!r}; accepted: {", ".join(OPTIMIZERS)}.')
    if cfg.adv is None:
        cfg.adv = AdversarialConfig(steps=preset['attack_steps'])
    elif not isinstance(cfg.adv, AdversarialConfig):
        raise TypeError(f'adv must be an AdversarialConfig, got {type(cfg.adv).__name__}.')
    if cfg.split_seed is not None and (isinstance(cfg.split_seed, bool) or not isinstance(cfg.split_seed, int)):
        raise ValueError(f'split_seed must be an integer, got {cfg.split_seed!r}.')
    for name in ('epochs', 'batch_size', 'robust_examples', 'img_size', 'num_classes'):
        _positive_int(name, getattr(cfg, name))
    if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 0:
        raise ValueError(f'workers must be an integer >= 0, got {cfg.workers!r}.')
    if cfg.lr is not None and (not math.isfinite(cfg.lr) or cfg.lr <= 0):
        raise ValueError(f'lr must be a positive number, got {cfg.lr!r}.')
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f'val_fraction must be in (0, 1), got {cfg.val_fraction!r}.')
    if cfg.scale is not None:
        if len(cfg.scale) != 2 or not 0 < cfg.scale[0] <= cfg.scale[1] <= 1:
            raise ValueError(f'scale must be two numbers 0 < MIN <= MAX <= 1 (the RandomResizedCrop area range), '
                             f'got {cfg.scale!r}.')
        cfg.scale = (float(cfg.scale[0]), float(cfg.scale[1]))
    if cfg.color_jitter is not None and not 0 <= cfg.color_jitter:
        raise ValueError(f'color_jitter must be >= 0, got {cfg.color_jitter!r}.')
    if not 0 <= cfg.hflip <= 1:
        raise ValueError(f'hflip must be a probability in [0, 1], got {cfg.hflip!r}.')
    if not 0 <= cfg.smoothing < 1:
        raise ValueError(f'smoothing must be in [0, 1), got {cfg.smoothing!r}.')
    amp_dtype(cfg.amp)  # None, 'bf16' or 'fp16' (or torch's names); else a ValueError listing them
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


# -- distributed -----------------------------------------------------------------------------------------
