"""Run timm's own, unmodified ``train.py`` with NoFrost adversarial training and robust validation.

timm's ``train.py`` (in a clone of the timm repository) looks ``ClassificationTask``, ``validate`` and
``_parse_args`` up in its module globals when ``main()`` runs; the launcher loads it by path and replaces them:

* ``_parse_args``: keeps the arguments (for the data config's mean / std), refuses distillation (its tasks are
  not adversarial) and records the adversarial settings in ``args.yaml``;
* ``ClassificationTask``: an :class:`AdversarialTrainer` on the loaders' normalised inputs (prefetcher or not);
* ``validate``: keeps a fixed subset, spread evenly over the set, of the images timm's clean validation loads
  (no second pass), attacks it in pixel space and adds ``robust_top1_<attack>`` to the metrics: in
  ``summary.csv``, the ``--result`` JSON and usable as ``--eval-metric``. The EMA model's validation gets its own.

The script is loaded under a private module name, its directory kept off ``sys.path``: a clone's root holds a
``timm/`` package that would shadow the installed timm.
"""
import argparse
import functools
import importlib.util
import inspect
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..attacks import ThreatModel, parse_attack
from ..attacks.autoattack import autoattack_available
from ..evaluate.engine import WORST_CASE, EvalProgress, RobustCounter
from ..pixels import AMP_DTYPES, PixelModel, denormalize, resolve_mean_std, to_float_pixels, unwrap_model
from ..settings import setting
from .adversarial import AdversarialConfig
from .train_config import resume_differences
from ..data.sources import spread_indices
from .trainer import AdversarialTrainer

__all__ = [
    'LaunchedAdversarialTrainer', 'REQUIRED_GLOBALS', 'RobustValidationConfig', 'SubsetCollector',
    'TimmTrainLauncher', 'load_train_script', 'robust_correct', 'run_timm_train',
]

_logger = logging.getLogger(__name__)

# what the launcher replaces or calls in the script; every timm train.py since the task API has them
REQUIRED_GLOBALS = ('ClassificationTask', 'validate', 'main', '_parse_args')
SCRIPT_MODULE_NAME = '_timm_nofrost_train_script'
METRIC_PREFIX = 'robust_top1_'
# train.py arguments that say where a run is written, how it starts or shows progress: the ones --resume may change
_RUN_MANAGEMENT_ARGS = frozenset({
    'resume', 'no_resume_opt', 'start_epoch', 'initial_checkpoint', 'output', 'experiment', 'config', 'log_interval',
    'recovery_interval', 'checkpoint_hist', 'workers', 'pin_mem', 'device', 'local_rank', 'log_wandb',
    'wandb_project', 'wandb_tags', 'wandb_resume_id', 'save_images'})


@dataclass
class RobustValidationConfig:
    """Robust accuracy measured after each of timm's validations: ``attacks`` (named as ``timm-nofrost eval``
    names them; a list or a comma-separated string) on ``examples`` validation images spread evenly over the set
    (indices ``floor(i * size / n)``; 0 turns robust validation off)."""
    attacks: Union[str, Sequence[str]] = setting(
        'pgd-10', group='robust-validation', flag='--adv-val-attacks',
        metavar='LIST', help="comma-separated attacks run at the training eps and norm, e.g. pgd-20,apgd-ce (clean "
                             "adds the subset's clean accuracy); each adds eval_robust_top1_<attack> to summary.csv, "
                             'plus robust_top1_worst-case with several attacks')
    examples: int = setting(
        500, group='robust-validation', flag='--adv-val-examples', type=int,
        metavar='N', help='attack N validation images spread evenly over the set, the same ones every epoch '
                          '(collected while timm validates: no extra pass over the data); 0 turns robust validation '
                          'off')
    specs: List[Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = self.attacks.split(',') if isinstance(self.attacks, str) else list(self.attacks)
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise ValueError('No validation attack given; name at least one, e.g. pgd-10 (or set examples=0 '
                             'to turn robust validation off).')
        self.specs = list({s.name: s for s in map(parse_attack, names)}.values())  # each canonical name once
        if any(s.kind == 'autoattack' for s in self.specs) and not autoattack_available():
            raise ValueError('autoattack needs the official AutoAttack package: pip install pyautoattack.')
        self.attacks = tuple(s.name for s in self.specs)
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < 0:
            raise ValueError(f'The number of robust validation examples must be an integer >= 0, '
                             f'got {self.examples!r}.')

    @property
    def enabled(self) -> bool:
        return self.examples > 0

    def metric_names(self) -> List[str]:
        """Keys added to timm's validation metrics, in order."""
        names = [METRIC_PREFIX + a for a in self.attacks]
        if sum(s.kind != 'clean' for s in self.specs) > 1:
            names.append(METRIC_PREFIX + WORST_CASE)
        return names


# -- loading the script ---------------------------------------------------------------------------------------
def load_train_script(path: Union[str, Path], module_name: str = SCRIPT_MODULE_NAME) -> ModuleType:
    """Import ``path`` (a timm ``train.py``) as a private module, leaving ``sys.path`` untouched.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a Python file, or a script without the globals the launcher needs.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f'No timm train.py at {str(path)!r}: give the path of train.py in a clone of '
                                f'https://github.com/huggingface/pytorch-image-models.')
    if path.suffix != '.py':
        raise ValueError(f'{str(path)!r} is not a Python script; give the path of timm\'s train.py.')
    importlib.import_module('timm_nofrost.models')  # registers our models before train.py creates one
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(module_name)
    sys.modules[module_name] = module  # some machinery (pickling, dataclasses) looks the module up by name
    argv, sys.argv = sys.argv, [str(path)] + sys.argv[1:]  # train.py's parser takes its name from argv[0]
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if previous is None:
            sys.modules.pop(module_name, None)
        else:
            sys.modules[module_name] = previous
        raise
    finally:
        sys.argv = argv
    missing = [name for name in REQUIRED_GLOBALS if not callable(getattr(module, name, None))]
    if missing:
        raise ValueError(f'{str(path)!r} does not look like timm\'s train.py: it has no {", ".join(missing)}. '
                         f'The launcher needs a train.py from timm >= 1.0.31 (with timm.task).')
    return module


# -- robust validation ----------------------------------------------------------------------------------------
class SubsetCollector:
    """Hands timm's eval loader to its ``validate`` unchanged, keeping the images of the robust subset on the way.

    Subset members of each batch are kept as pixels in [0, 1] (the loader's ``mean`` / ``std`` undone; 8-bit
    when the pipeline quantised them, as timm's do). Under timm's ordered distributed sampler rank ``r`` sees
    dataset positions ``r, r + W, r + 2W, ...`` (past the dataset: padding), so the ranks together keep each
    subset image exactly once. The length of ``loader.dataset`` places the subset of ``n_examples`` images
    (without one: the first ones); ``mean`` / ``std`` are the loader's normalisation.
    """

    def __init__(self, loader: Any, n_examples: int, mean: Sequence[float], std: Sequence[float], rank: int = 0,
                 world_size: int = 1):
        self.loader = loader
        try:
            self.subset = set(spread_indices(n_examples, len(loader.dataset)))
        except (AttributeError, TypeError):  # no sized dataset: the first images
            self.subset = set(range(n_examples))
        self.mean, self.std = resolve_mean_std(None, mean, std)  # validated: one value per channel, std > 0
        self.rank, self.world_size = rank, world_size
        self.pixels, self.targets = [], []  # the kept images (uint8 or float pixels) and their labels
        self.batch_size = self._seen = 0
        self.unsupported: Optional[str] = None

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__['loader'], name)

    def __iter__(self):
        self._seen = 0
        for batch in self.loader:
            self._keep(batch)
            yield batch

    def _keep(self, batch: Any) -> None:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(torch.is_tensor(t) for t in batch)
                and batch[0].ndim == 4):
            self.unsupported = f'batches of {type(batch).__name__} instead of (images, targets)'
            return
        input, target = batch
        n = input.shape[0]
        self.batch_size = max(self.batch_size, n)
        # dataset positions of this rank's next n samples; padding (past the dataset) is in no subset
        rows = [i for i in range(n) if self.rank + (self._seen + i) * self.world_size in self.subset]
        self._seen += n
        if not rows:
            return
        index = torch.tensor(rows, device=input.device)
        pixels = denormalize(input.index_select(0, index).float(), self.mean, self.std).clamp_(0, 1)
        levels = pixels * 255
        if (levels - levels.round()).abs().max() < 1e-3:  # 8-bit images: keep them in a quarter of the memory
            pixels = levels.round_().to(torch.uint8)
        self.pixels.append(pixels)
        self.targets.append(target.index_select(0, index.to(target.device)))

    def examples(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The kept images as float pixels in [0, 1] (ordinary tensors, usable with autograd) and their labels."""
        if not self.pixels:
            return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long)
        pixels = torch.cat([to_float_pixels(p).float() for p in self.pixels]).clone()
        targets = torch.cat(self.targets).clone()
        if targets.ndim == 2:  # one-hot / soft targets
            targets = targets.argmax(dim=1)
        return pixels, targets.long()


def _autocast_dtype(amp_autocast: Callable) -> Optional[torch.dtype]:
    """The autocast dtype train.py uses (a ``partial(torch.autocast, dtype=...)``), None without AMP."""
    is_autocast = isinstance(amp_autocast, functools.partial) and amp_autocast.func is torch.autocast
    dtype = amp_autocast.keywords.get('dtype') if is_autocast else None
    return dtype if dtype in AMP_DTYPES.values() else None


def robust_correct(model: nn.Module, pixels: torch.Tensor, targets: torch.Tensor, config: RobustValidationConfig,
                   threat: ThreatModel, mean: Sequence[float], std: Sequence[float], batch_size: int,
                   model_dtype: Optional[torch.dtype] = None, amp_dtype: Optional[torch.dtype] = None, seed: int = 0,
                   distributed: bool = False, progress: Union[bool, str] = 'off') -> Tuple[Dict[str, int], int]:
    """How many of ``pixels`` (images in [0, 1]) stay correct under each attack, keyed by metric name, and how many
    images were counted; summed over the ranks when ``distributed``.

    Counted by the evaluation engine (``timm_nofrost.evaluate.engine.RobustCounter``), as ``timm-nofrost eval``
    counts: robust = clean-correct and still correct after the attack; with several attacks,
    ``robust_top1_worst-case`` counts an image only if it survives every one.
    """
    net = unwrap_model(model)
    counter = RobustCounter(PixelModel(net, mean, std), config.specs, [threat], keep_per_example=False,
                            seed=seed, amp_dtype=amp_dtype)
    was_training = net.training
    net.eval()
    bar = EvalProgress(progress, -(-pixels.shape[0] // max(batch_size, 1)), 'robust validation')
    try:
        # timm's validate runs under inference_mode; attacks need autograd (input gradients only)
        with torch.inference_mode(False), torch.enable_grad():
            for start in range(0, pixels.shape[0], max(batch_size, 1)):
                x = pixels[start:start + batch_size]
                counter.update(x if model_dtype is None else x.to(model_dtype), targets[start:start + batch_size], bar)
    finally:
        bar.close()
        net.train(was_training)
    if distributed:
        counter.reduce(pixels.device)
    by_attack = {**counter.correct[counter.labels[0]], 'clean': counter.clean_correct}
    return {name: by_attack[name[len(METRIC_PREFIX):]] for name in config.metric_names()}, counter.total


class LaunchedAdversarialTrainer(AdversarialTrainer):
    """The :class:`AdversarialTrainer` train.py gets (a separate name, so logs say where it came from)."""


# -- launching -----------------------------------------------------------------------------------------------
class TimmTrainLauncher:
    """Swaps NoFrost adversarial training (``adv_cfg``, default: the NoFrost recipe) and robust validation
    (``robust_val``, its attacks at the training eps and norm) into a timm ``train.py`` loaded by
    :func:`load_train_script`."""

    def __init__(self, module: ModuleType, adv_cfg: Optional[AdversarialConfig] = None,
                 robust_val: Optional[RobustValidationConfig] = None):
        self.module = module
        self.adv_cfg = adv_cfg or AdversarialConfig()
        self.robust_val = robust_val or RobustValidationConfig()
        self.args: Optional[argparse.Namespace] = None
        self.mean = self.std = None  # the loaders' normalisation, known once train.py builds its task
        self.tasks: List[AdversarialTrainer] = []
        self.robust_history: List[Dict[str, Any]] = []  # one entry per validation: metrics, images, suffix
        self._original: Dict[str, Any] = {name: getattr(module, name) for name in REQUIRED_GLOBALS}
        self._validate_signature = inspect.signature(self._original['validate'])

    # -- installation ---------------------------------------------------------------------------------------
    def install(self) -> None:
        """Replace ``_parse_args``, ``ClassificationTask`` and ``validate`` in the script's globals."""
        self.module._parse_args = self._parse_args
        self.module.ClassificationTask = self.make_task
        self.module.validate = self.validate

    def uninstall(self) -> None:
        """Put the script's own functions back."""
        for name, value in self._original.items():
            setattr(self.module, name, value)

    def settings(self) -> Dict[str, Any]:
        """The launcher's settings, as recorded in ``args.yaml``."""
        return {'adversarial': self.adv_cfg.to_dict(),
                'robust_validation': {'attacks': list(self.robust_val.attacks), 'examples': self.robust_val.examples,
                                      'eps': self.adv_cfg.eps, 'norm': self.adv_cfg.norm}}

    # -- replacements ---------------------------------------------------------------------------------------
    def _parse_args(self, *a: Any, **kw: Any) -> Any:
        """train.py's own parsing; keeps the arguments and adds our settings to the saved ``args.yaml``."""
        parsed = self._original['_parse_args'](*a, **kw)
        args = parsed[0] if isinstance(parsed, tuple) else parsed
        if getattr(args, 'kd_model_name', None):
            raise ValueError('timm-train runs adversarial training through ClassificationTask; train.py\'s '
                             'distillation tasks (--kd-model-name) are not adversarial. Drop --kd-model-name.')
        self.args = args
        if isinstance(parsed, tuple) and len(parsed) > 1 and isinstance(parsed[1], str):  # args_text: args.yaml
            import yaml
            parsed = (args, parsed[1] + yaml.safe_dump({'nofrost': self.settings()}, default_flow_style=False),
                      *parsed[2:])
            if getattr(args, 'resume', None):
                self._check_resume(Path(args.resume).parent / 'args.yaml', yaml.safe_load(parsed[1]))
        return parsed

    @staticmethod
    def _check_resume(recorded_file: Path, now: Dict[str, Any]) -> None:
        """``--resume`` of a run whose ``args.yaml`` records other settings that change the result: a one-line
        error naming each (train.py arguments and the adversarial settings), before anything runs."""
        import yaml
        if not recorded_file.is_file():  # a checkpoint without its run folder: nothing recorded to compare
            return
        recorded = yaml.safe_load(recorded_file.read_text()) or {}
        differences = [f'--{k.replace("_", "-")} {recorded[k]} (this command: {now.get(k)})' for k in recorded
                       if k not in _RUN_MANAGEMENT_ARGS and k != 'nofrost' and recorded[k] != now.get(k)]
        if 'nofrost' in recorded:
            differences += resume_differences({'adv': recorded['nofrost']['adversarial']},
                                              {'adv': now['nofrost']['adversarial']})
        if differences:
            raise ValueError(f'{recorded_file.parent} was trained with other settings: {"; ".join(differences)}. '
                             f'--resume continues the same run: repeat its settings, or start a new run from its '
                             f'weights with --initial-checkpoint.')

    def make_task(self, model: nn.Module, criterion: Optional[Callable] = None, device: Optional[torch.device] = None,
                  dtype: Optional[torch.dtype] = None, verbose: bool = True, **kwargs: Any) -> AdversarialTrainer:
        """Stands in for ``ClassificationTask(...)``: an :class:`AdversarialTrainer` on normalised inputs."""
        self.mean, self.std = self._normalization(model)
        task = LaunchedAdversarialTrainer(
            model, criterion=criterion, adv_cfg=self.adv_cfg, mean=self.mean, std=self.std, input_normalized=True,
            device=device, dtype=dtype, verbose=verbose, **kwargs)
        self.tasks.append(task)
        return task

    def validate(self, *a: Any, **kw: Any) -> Any:
        """timm's validation, then robust top-1 on the fixed subset added to its metrics."""
        if not self.robust_val.enabled:
            return self._original['validate'](*a, **kw)
        bound = self._validate_signature.bind(*a, **kw)
        bound.apply_defaults()
        call = bound.arguments
        args = call.get('args') or self.args
        rank, world_size = getattr(args, 'rank', 0), getattr(args, 'world_size', 1)
        mean, std = (self.mean, self.std) if self.mean is not None else self._normalization(call['model'])
        collector = SubsetCollector(call['loader'], self.robust_val.examples, mean, std, rank, world_size)
        call['loader'] = collector  # timm's loop loads the subset for us: no second pass over the data
        metrics = self._original['validate'](*bound.args, **bound.kwargs)
        if not isinstance(metrics, dict):
            return metrics
        start = time.time()
        device = torch.device(call.get('device') or getattr(args, 'device', 'cpu'))
        if collector.unsupported:
            _logger.warning(f'Robust validation skipped: the eval loader yields {collector.unsupported}.')
            collector.pixels, collector.targets = [], []  # counts 0, joins the sum
        pixels, targets = collector.examples()
        counts, n = robust_correct(
            call['model'], pixels.to(device), targets.to(device), self.robust_val, threat=self.adv_cfg.threat,
            mean=mean, std=std, batch_size=max(collector.batch_size, 1), model_dtype=call.get('model_dtype'),
            amp_dtype=_autocast_dtype(call.get('amp_autocast')), distributed=bool(getattr(args, 'distributed', False)),
            progress='lines' if rank == 0 else 'off')
        robust = {k: (100.0 * counts[k] / n if n else float('nan')) for k in self.robust_val.metric_names()}
        metrics.update(robust)
        suffix = call.get('log_suffix', '') or ''
        self.robust_history.append({'metrics': dict(robust), 'examples': n, 'log_suffix': suffix})
        if rank == 0:
            shown = '  '.join(f'{k[len(METRIC_PREFIX):]}: {v:.3f}' for k, v in robust.items())
            _logger.info(f'Robust{suffix}: {shown}  ({self.adv_cfg.threat}, {n} images, {time.time() - start:.1f}s)')
        return metrics

    def _normalization(self, model: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """mean / std of timm's loaders: the data config train.py resolves from its arguments and the model."""
        from timm.data import resolve_data_config
        args = vars(self.args) if self.args is not None else {}
        config = resolve_data_config(args, model=unwrap_model(model), verbose=False)
        return tuple(float(m) for m in config['mean']), tuple(float(s) for s in config['std'])

    # -- running --------------------------------------------------------------------------------------------
    def run(self, train_args: Sequence[str]) -> Any:
        """Call the script's ``main()`` with ``train_args`` as its command line; returns what main returns."""
        argv, sys.argv = sys.argv, [str(getattr(self.module, '__file__', 'train.py'))] + list(train_args)
        self.install()
        try:
            result = self.module.main()
        finally:
            sys.argv = argv
            self.uninstall()
        if not self.tasks:
            _logger.warning('train.py never built a ClassificationTask: nothing was trained adversarially.')
        return result


def run_timm_train(script: Union[str, Path], train_args: Sequence[str], adv_cfg: Optional[AdversarialConfig] = None,
                   robust_val: Optional[RobustValidationConfig] = None) -> TimmTrainLauncher:
    """Run timm's ``train.py`` at ``script`` with ``train_args``, adversarially; returns the launcher.

    Example::

        run_timm_train('pytorch-image-models/train.py', ['/data/imagenet', '--model', 'nf_resnet50_nofrost'],
                       AdversarialConfig(eps='4/255'), RobustValidationConfig('pgd-20,apgd-ce', examples=1000))
    """
    launcher = TimmTrainLauncher(load_train_script(script), adv_cfg, robust_val)
    launcher.run(train_args)
    return launcher

