"""``timm-nofrost train``: a compact adversarial training run built from timm's pieces.

timm supplies the datasets, loaders and transforms, the optimizer and scheduler factories and the model;
``AdversarialTrainer`` supplies the NoFrost step. Around them this module adds what a long run needs: input
checks before any work starts, per-epoch clean and PGD accuracy, a JSON line per epoch, atomic
checkpoints with ``--resume``, a clean stop on a non-finite loss, deterministic epochs, and torchrun.
"""
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from ..attacks.base import unwrap_model
from ..attacks.spec import parse_attack
from ..checkpoint import CheckpointError
from .checkpointing import atomic_save, load_training_checkpoint
from .config import AdversarialConfig
from .data import DataSource, build_datasets
from .trainer import AdversarialTrainer

__all__ = ['TrainConfig', 'TrainingDiverged', 'train', 'resolve_config', 'preset_for', 'DEMO_MODEL', 'DEMO_MODEL_KWARGS']

DEMO_MODEL = 'nf_resnet18_cifar_nofrost'
DEMO_MODEL_KWARGS: Dict[str, Any] = {'channels': (16, 32, 64, 128), 'stem_chs': 16, 'drop_rate': 0.0,
                                     'drop_path_rate': 0.0}
# defaults when the user leaves a setting unset: the authors' recipe (SGD, lr 0.1 per 256 images), and a demo
# preset sized for a CPU (a narrow model, AdamW, which gets a zero-initialised NF net going within an epoch)
RECIPE = dict(model='nf_resnet50_nofrost', epochs=90, batch_size=256, img_size=224, attack_steps=10, opt='sgd')
DEMO = dict(model=DEMO_MODEL, epochs=4, batch_size=64, img_size=32, attack_steps=3, opt='adamw', lr=3e-3)
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
    for name in ('epochs', 'batch_size', 'robust_examples', 'img_size', 'num_classes'):
        _positive_int(name, getattr(cfg, name))
    if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 0:
        raise ValueError(f'workers must be an integer >= 0, got {cfg.workers!r}.')
    if cfg.lr is not None and (not math.isfinite(cfg.lr) or cfg.lr <= 0):
        raise ValueError(f'lr must be a positive number, got {cfg.lr!r}.')
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f'val_fraction must be in (0, 1), got {cfg.val_fraction!r}.')
    if not 0 <= cfg.smoothing < 1:
        raise ValueError(f'smoothing must be in [0, 1), got {cfg.smoothing!r}.')
    if cfg.amp not in (None, 'bf16', 'fp16'):
        raise ValueError(f"amp must be 'bf16' or 'fp16' (or unset), got {cfg.amp!r}.")
    if parse_attack(cfg.eval_attack).kind == 'clean':
        raise ValueError(f'eval_attack must be an attack, not {cfg.eval_attack!r} (e.g. pgd-10, apgd-ce).')
    for name in cfg.final_attacks.split(','):
        parse_attack(name.strip())
    if model is None:
        _check_model_name(cfg.model)
    return cfg


def _check_model_name(name: str) -> None:
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
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise PermissionError(f'Output directory {out_dir} is not writable: {e.strerror or e}.') from None


# -- distributed -----------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def primary(self) -> bool:
        return self.rank == 0


def _init_distributed(device_pref: Optional[str]) -> tuple:
    world = int(os.environ.get('WORLD_SIZE', '1'))
    use_cuda = torch.cuda.is_available() if device_pref is None else device_pref.startswith('cuda')
    if world > 1:
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        if not dist.is_initialized():
            dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
        info = _Dist(dist.get_rank(), dist.get_world_size(), local_rank)
        device = torch.device(f'cuda:{local_rank}') if use_cuda else torch.device('cpu')
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        info = _Dist()
        device = torch.device(device_pref) if device_pref else torch.device('cuda' if use_cuda else 'cpu')
    return info, device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# -- model and data --------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, num_classes: int, model: Optional[nn.Module] = None) -> nn.Module:
    if model is None:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, **cfg.model_kwargs)
    if cfg.convert:
        from ..convert import convert_to_normfree
        model = convert_to_normfree(model, init='keep' if cfg.pretrained else 'fresh')
    return model


def _data_config(cfg: TrainConfig, model: nn.Module) -> Dict[str, Any]:
    args: Dict[str, Any] = {}
    if cfg.img_size is not None:
        args['input_size'] = (3, cfg.img_size, cfg.img_size)
    elif cfg.data == 'demo':
        args['input_size'] = (3, DEMO['img_size'], DEMO['img_size'])
    if cfg.data == 'demo':
        args['crop_pct'] = 1.0
    return timm.data.resolve_data_config(args, model=model)


def _loaders(cfg: TrainConfig, source: DataSource, data_config: Dict[str, Any], info: _Dist, device: torch.device):
    from timm.data import create_loader, create_transform
    demo = cfg.data == 'demo'
    train_loader = create_loader(
        source.train, input_size=data_config['input_size'], batch_size=cfg.batch_size, is_training=True,
        use_prefetcher=False, scale=(0.6, 1.0) if demo else None, color_jitter=0.0 if demo else 0.4,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=cfg.workers, distributed=info.world_size > 1, persistent_workers=False, device=device,
        pin_memory=device.type == 'cuda', crop_pct=data_config['crop_pct'])
    # evaluation in pixel space ([0, 1]); attacks and clean accuracy normalise inside PixelModel
    source.val.transform = create_transform(**data_config, is_training=False, normalize=False)
    return train_loader


def _pixel_batches(loader_or_ds, limit: Optional[int] = None):
    for x, y in loader_or_ds:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        yield x, y


# -- evaluation ------------------------------------------------------------------------------------------
@torch.no_grad()
def clean_accuracy(model: nn.Module, val, device: torch.device, batch_size: int, workers: int) -> float:
    from ..attacks.base import PixelModel
    pixel = PixelModel.from_model(unwrap_model(model)).to(device).eval()
    loader = DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=workers)
    correct = total = 0
    for x, y in _pixel_batches(loader):
        x, y = x.to(device), y.to(device)
        correct += int((pixel(x).argmax(1) == y).sum())
        total += y.numel()
    return 100.0 * correct / max(total, 1)


def robust_report(model: nn.Module, val, cfg: TrainConfig, device: torch.device, attacks: str, sanity: bool,
                  name: str):
    """Clean and robust accuracy on the first ``robust_examples`` validation images (a fixed subset)."""
    from ..evaluate import evaluate
    n = min(cfg.robust_examples, len(val))
    loader = DataLoader(Subset(val, range(n)), batch_size=min(cfg.batch_size, 128), shuffle=False,
                        num_workers=cfg.workers)
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(cfg.amp or '')
    return evaluate(model, loader, attacks=attacks, eps=[cfg.adv.eps], norm=cfg.adv.norm, device=device,
                    seed=cfg.seed, amp_dtype=amp, sanity=sanity, progress=False, model_name=name)


def report_accuracy(report) -> Dict[str, float]:
    """Percent accuracy per attack (clean first, worst case last) at the report's single eps."""
    by_attack = report.accuracy[report.eps_labels[0]]
    return {'clean': 100.0 * report.clean_accuracy, **{a: 100.0 * v for a, v in by_attack.items()}}


# -- the run ---------------------------------------------------------------------------------------------
def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit='batch', leave=False, dynamic_ncols=True, file=sys.stderr)


def _log(info: _Dist, message: str) -> None:
    if info.primary:
        print(message, flush=True)


def train(cfg: TrainConfig, model: Optional[nn.Module] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run adversarial training as configured; returns the summary (also written to OUT_DIR/results.json).

    Args:
        cfg: The run's settings (``resolve_config`` is applied).
        model: A ready model to train instead of ``cfg.model`` (e.g. your own converted ResNet).

    Raises:
        ValueError / FileExistsError / PermissionError: bad settings, data, model or output directory, before
            any training step.
        TrainingDiverged: a non-finite loss; the last good checkpoint stays in place.
    """
    cfg = resolve_config(cfg, model)
    custom_model = model
    out_dir = Path(cfg.out_dir)
    resume_path = None
    if cfg.resume:
        resume_path = out_dir / CHECKPOINT_LAST if cfg.resume == 'auto' else Path(cfg.resume)
        if not resume_path.is_file():
            raise FileNotFoundError(f'Nothing to resume: checkpoint {resume_path} does not exist.')
    check_out_dir(out_dir, resume=resume_path is not None, overwrite=cfg.overwrite)  # every rank: none may hang
    info, device = _init_distributed(cfg.device)
    source = build_datasets(cfg.data, cfg.data_dir, img_size=cfg.img_size or DEMO['img_size'],
                            val_fraction=cfg.val_fraction, seed=cfg.seed)
    num_classes = cfg.num_classes or source.num_classes
    if not num_classes:
        raise ValueError(f'Could not tell the number of classes of {cfg.data!r}; pass --num-classes.')
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_everything(cfg.seed)
    model = build_model(cfg, num_classes, model)
    run = _Run(cfg, source, model, num_classes, info, device, out_dir, 'nofrost')
    results = {'config': _jsonable(cfg), 'runs': {}}
    results['runs']['nofrost'] = run.fit(resume_path)
    if cfg.compare_bn:
        from .baseline import create_bn_twin
        _seed_everything(cfg.seed)
        bn_model, bn_name = create_bn_twin(cfg.model, num_classes, cfg.model_kwargs, cfg.baseline_model)
        bn_cfg = TrainConfig(**{**cfg.__dict__, 'adv': AdversarialConfig(**{**cfg.adv.to_dict(), 'batch_mode': 'separate'}),
                                'convert': False, 'resume': None})
        bn_dir = out_dir / 'bn-at'
        bn_resume = bn_dir / CHECKPOINT_LAST if resume_path is not None and (bn_dir / CHECKPOINT_LAST).exists() else None
        if info.primary and bn_resume is None:
            check_out_dir(bn_dir, resume=False, overwrite=True)
        bn_run = _Run(bn_cfg, source, bn_model, num_classes, info, device, bn_dir, f'BN-AT ({bn_name})')
        results['runs']['bn-at'] = bn_run.fit(bn_resume)
    if info.primary:
        # a ready model passed in is not a timm name the eval command could rebuild
        results['eval_command'] = eval_command(cfg, out_dir, num_classes) if custom_model is None else ''
        atomic_json(out_dir / 'results.json', results)
        _log(info, '\n' + final_table(results))
        if results['eval_command']:
            _log(info, f"\nCheckpoints, per-epoch JSON and reports are in {out_dir}. A stronger evaluation of the best "
                       f"checkpoint:\n  {results['eval_command']}")
    if info.world_size > 1:
        dist.barrier()
    return results


def final_table(results: Dict[str, Any]) -> str:
    runs = results['runs']
    attacks = next(iter(runs.values()))['final']['attacks']
    header = '| model | ' + ' | '.join(attacks) + ' |'
    lines = [header, '|' + '---|' * (len(attacks) + 1)]
    for run in runs.values():
        acc = run['final']['accuracy']
        lines.append(f"| {run['name']} | " + ' | '.join(f'{acc[a]:.1f} %' for a in attacks) + ' |')
    adv = results['config']['adv']
    return (f"Accuracy on the first {next(iter(runs.values()))['final']['n_examples']} validation images, "
            f"{adv['norm']} eps {_eps_text(adv['eps'], adv['norm'])} (worst case = lowest over attacks per image):\n"
            + '\n'.join(lines))


def _eps_text(value: float, norm: str) -> str:
    return f'{value * 255:.3g}/255' if norm == 'Linf' else f'{value:.3g}'


def atomic_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _jsonable_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def _jsonable(cfg: TrainConfig) -> Dict[str, Any]:
    d = asdict(cfg)
    d['model_kwargs'] = _jsonable_kwargs(d['model_kwargs'])
    return d


def eval_command(cfg: TrainConfig, out_dir: Path, num_classes: int) -> str:
    """The ``timm-nofrost eval`` command line that re-evaluates the best checkpoint with stronger attacks."""
    parts = ['timm-nofrost eval', f'--model {cfg.model}', f'--num-classes {num_classes}']
    if cfg.model_kwargs:
        parts.append(f"--model-kwargs '{json.dumps(_jsonable_kwargs(cfg.model_kwargs))}'")
    if cfg.convert:
        return ''  # a converted model is not a timm name: evaluate it from Python (see docs/training.md)
    parts += [f'--checkpoint {out_dir / CHECKPOINT_BEST}', f'--data {cfg.data}', '--attacks clean,pgd-20,apgd-ce,apgd-t',
              f'--eps {_eps_text(cfg.adv.eps, cfg.adv.norm)}' + ('' if cfg.adv.norm == 'Linf' else ' --norm L2')]
    return ' '.join(parts)


class _Run:
    """One model trained with one configuration into one output folder."""

    def __init__(self, cfg: TrainConfig, source: DataSource, model: nn.Module, num_classes: int, info: _Dist,
                 device: torch.device, out_dir: Path, name: str):
        self.cfg, self.source, self.info, self.device, self.out_dir, self.name = cfg, source, info, device, out_dir, name
        self.num_classes = num_classes
        model = model.to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.data_config = _data_config(cfg, model)
        self.loader = _loaders(cfg, source, self.data_config, info, device)
        self.task = AdversarialTrainer(model, criterion_kwargs=dict(smoothing=cfg.smoothing), adv_cfg=cfg.adv,
                                       mean=self.data_config['mean'], std=self.data_config['std'],
                                       device=device, verbose=False)
        global_batch = cfg.batch_size * info.world_size
        self.lr = cfg.lr if cfg.lr is not None else (0.1 * global_batch / 256 if cfg.opt == 'sgd' else DEMO['lr'])
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        self.optimizer = create_optimizer_v2(self.task.get_trainable_module(), cfg.opt, lr=self.lr,
                                             weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, 'cosine', num_epochs=cfg.epochs,
                                                warmup_epochs=cfg.warmup_epochs, warmup_lr=self.lr * 0.01)
        if info.world_size > 1:
            self.task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None)
        self.amp = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(cfg.amp or '')
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None
        self.start_epoch = 0
        self.best = None
        self.history: List[Dict[str, Any]] = []

    # -- checkpoints -------------------------------------------------------------------------------------
    def state(self, epoch: int, metrics: Dict[str, Any]) -> Dict[str, Any]:
        task_state = self.task.get_task_state()
        return {
            'state_dict': unwrap_model(self.model).state_dict(),
            'arch': self.cfg.model if self.name == 'nofrost' else unwrap_model(self.model).pretrained_cfg.get('architecture'),
            'num_classes': self.num_classes,
            'model_kwargs': json.dumps(_jsonable_kwargs(self.cfg.model_kwargs) if self.name == 'nofrost' else {}),
            'epoch': epoch,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'task_state': {k: v for k, v in task_state.items() if k != 'adv_cfg'},
            'adv_cfg': json.dumps(task_state.get('adv_cfg', {})),
            'metric': metrics.get('val_robust_top1'),
            'best_metric': self.best,
            'history': json.dumps(self.history),
            'version': 1,
        }

    def restore(self, path: Path) -> None:
        state = load_training_checkpoint(path)
        try:
            unwrap_model(self.model).load_state_dict(state['state_dict'])
        except RuntimeError as e:
            raise CheckpointError(f'Checkpoint {path} does not match the model {self.cfg.model}: '
                                  f'{str(e).splitlines()[0]}') from None
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.task.load_task_state(state.get('task_state'))
        self.start_epoch = int(state['epoch']) + 1
        self.best = state.get('best_metric')
        self.history = json.loads(state.get('history', '[]'))
        _log(self.info, f'[{self.name}] resumed from {path} (epoch {self.start_epoch} of {self.cfg.epochs} done)')

    # -- training ----------------------------------------------------------------------------------------
    def fit(self, resume: Optional[Path]) -> Dict[str, Any]:
        cfg, info = self.cfg, self.info
        if resume is not None:
            self.restore(resume)
        _log(info, f'[{self.name}] {self.source.description}; model {cfg.model if self.name == "nofrost" else self.name}, '
                   f'{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, batch mode '
                   f'{self.task.batch_mode}; {self._attack_summary()}; '
                   f'{cfg.epochs} epochs, batch {cfg.batch_size} x {info.world_size}, {cfg.opt} lr {self.lr:.4g}')
        for epoch in range(self.start_epoch, cfg.epochs):
            self.train_epoch(epoch)
        final = self.final_evaluation()
        return {'name': self.name, 'out_dir': str(self.out_dir), 'epochs': self.history, 'final': final}

    def _attack_summary(self) -> str:
        adv = self.cfg.adv
        if adv.adv_weight == 0:
            return 'standard training (no adversarial examples)'
        return (f'{adv.norm} eps {_eps_text(adv.eps, adv.norm)}, PGD-{adv.steps} step '
                f'{_eps_text(adv.attack_step_size, adv.norm)}, lambda {adv.adv_weight:g}')

    def train_epoch(self, epoch: int) -> None:
        cfg, info = self.cfg, self.info
        _seed_everything(cfg.seed + 10007 * epoch + info.rank)  # every epoch replays exactly after --resume
        sampler = getattr(self.loader, 'sampler', None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
        self.model.train()
        start = time.time()
        sums = {'loss': 0.0, 'loss_clean': 0.0, 'loss_adv': 0.0, 'acc_clean': 0.0, 'acc_adv': 0.0}
        steps = 0
        bar = _progress(self.loader, len(self.loader), cfg.progress and info.primary,
                        f'[{self.name}] epoch {epoch + 1}/{cfg.epochs}')
        for step, (x, y) in enumerate(bar):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                result = self.task(x, y)
            loss = result['loss']
            self._check_finite(loss, epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            steps += 1
            for k in sums:
                if k in result:
                    sums[k] += float(result[k].detach())
            if bar is not self.loader:
                bar.set_postfix(loss=f'{sums["loss"] / steps:.3f}', adv_acc=f'{100 * sums["acc_adv"] / steps:.0f}%')
        self.scheduler.step(epoch + 1)
        metrics = {f'train_{k}': v / max(steps, 1) for k, v in sums.items()}
        metrics = {k: (100 * v if 'acc' in k else v) for k, v in metrics.items()}
        metrics.update(epoch=epoch + 1, lr=self.optimizer.param_groups[0]['lr'], train_time_s=time.time() - start)
        if info.primary:
            metrics.update(self.evaluate_epoch())
            self.history.append(metrics)
            self._save(epoch, metrics)
            _log(info, f"[{self.name}] epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.3f}  "
                       f"val clean {metrics['val_clean_top1']:.1f} %  val {cfg.eval_attack} "
                       f"{metrics['val_robust_top1']:.1f} % (first {metrics['val_robust_examples']})  "
                       f"{metrics['train_time_s']:.0f} s")
        if info.world_size > 1:
            dist.barrier()

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        value = loss.detach().float().reshape(1).clone()
        if self.info.world_size > 1:  # every rank stops together, none waits in a collective
            dist.all_reduce(value)
        if not torch.isfinite(value).all():
            last = self.out_dir / CHECKPOINT_LAST
            kept = (f'the last good checkpoint {last} (epoch {self.history[-1]["epoch"]}) is kept'
                    if self.history and last.exists() else 'no checkpoint had been written yet')
            raise TrainingDiverged(
                f'[{self.name}] loss is {value.item()} at epoch {epoch + 1}, step {step + 1}: training stopped; '
                f'{kept}. Lower --lr, add --warmup-epochs, or check the data; resume with --resume.')

    def evaluate_epoch(self) -> Dict[str, Any]:
        cfg = self.cfg
        clean = clean_accuracy(self.model, self.source.val, self.device, min(cfg.batch_size, 256), cfg.workers)
        report = robust_report(self.model, self.source.val, cfg, self.device, f'clean,{cfg.eval_attack}', False,
                               self.name)
        self.model.train()
        robust = report_accuracy(report)[parse_attack(cfg.eval_attack).name]
        return {'val_clean_top1': clean, 'val_robust_top1': robust, 'val_robust_attack': cfg.eval_attack,
                'val_robust_examples': report.n_examples}

    def _save(self, epoch: int, metrics: Dict[str, Any]) -> None:
        improved = self.best is None or metrics['val_robust_top1'] >= self.best
        if improved:
            self.best = metrics['val_robust_top1']
        last = atomic_save(self.state(epoch, metrics), self.out_dir / CHECKPOINT_LAST)
        if improved:
            tmp = self.out_dir / f'.{CHECKPOINT_BEST}.tmp'
            shutil.copyfile(last, tmp)
            os.replace(tmp, self.out_dir / CHECKPOINT_BEST)
        with open(self.out_dir / SUMMARY, 'a') as f:
            f.write(json.dumps({'run': self.name, **metrics}) + '\n')

    def final_evaluation(self) -> Dict[str, Any]:
        if not self.info.primary:
            return {}
        report = robust_report(self.model, self.source.val, self.cfg, self.device, self.cfg.final_attacks, True,
                               self.name)
        report.save_json(self.out_dir / 'robustness.json')
        (self.out_dir / 'robustness.md').write_text(report.to_markdown())
        acc = report_accuracy(report)
        clean = clean_accuracy(self.model, self.source.val, self.device, min(self.cfg.batch_size, 256), self.cfg.workers)
        return {'attacks': list(acc), 'accuracy': acc, 'n_examples': report.n_examples, 'val_clean_top1_full': clean,
                'sanity_flags_failed': [f['name'] for f in report.flags_failed]}
