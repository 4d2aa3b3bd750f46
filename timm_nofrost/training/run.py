"""``timm-nofrost train``: a compact adversarial training run built from timm's pieces.

timm supplies the datasets, loaders and transforms, the optimizer and scheduler factories and the model;
``AdversarialTrainer`` supplies the NoFrost step. Around them this module adds what a long run needs: input
checks before any work starts, per-epoch clean and PGD accuracy, a JSON line per epoch, atomic
checkpoints with ``--resume``, a clean stop on a non-finite loss, deterministic epochs, and torchrun.
"""
import hashlib
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn

from ..attacks.spec import parse_attack
from ..checkpoint import CheckpointError, load_checkpoint
from ..files import atomic_copy, atomic_json, atomic_write, hold_folder, remove_stale_temporaries
from ..pixels import amp_dtype, unwrap_model
from .checkpointing import atomic_save, load_training_checkpoint
from ..data.sources import DEMO_IMG_SIZE, image_fingerprint, pixel_eval_transform, source_data_config
from ..data.sources import DataSource, build_datasets
from .epoch_eval import clean_accuracy, report_accuracy, robust_report
from .overfitting import catastrophic_overfitting, first_catastrophic_overfitting
from .results import config_to_json, eval_command, export_command, final_table, jsonable_kwargs
from .train_config import (
    CHECKPOINT_BEST, CHECKPOINT_LAST, DEMO_MODEL, DEMO_MODEL_KWARGS, SUMMARY, TrainConfig, TrainingDiverged,
    check_out_dir, resolve_config, resume_differences)
from .presets import ADAMW_LR, preset_value
from .trainer import AdversarialTrainer

__all__ = ['TrainConfig', 'TrainingDiverged', 'train', 'resolve_config', 'final_table', 'DEMO_MODEL',
           'DEMO_MODEL_KWARGS']


_EPOCH_SUMS = ('loss', 'loss_clean', 'loss_adv', 'acc_clean', 'acc_adv')  # per-step values averaged per epoch


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def primary(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: Optional[str]) -> tuple:
    """Join the torchrun process group (once) when WORLD_SIZE > 1; returns the rank info and this rank's device."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    use_cuda = torch.cuda.is_available() if device_pref is None else device_pref.startswith('cuda')
    if world <= 1:
        return _Dist(), torch.device(device_pref or ('cuda' if use_cuda else 'cpu'))
    if not dist.is_initialized():
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    device = torch.device(f'cuda:{int(os.environ.get("LOCAL_RANK", "0"))}' if use_cuda else 'cpu')
    if use_cuda:
        torch.cuda.set_device(device)
    return _Dist(dist.get_rank(), dist.get_world_size()), device


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
    if cfg.initial_checkpoint:  # a new run from another run's weights (timm's --initial-checkpoint)
        load_checkpoint(model, cfg.initial_checkpoint)
    return model


def _log(info: _Dist, message: str) -> None:
    if info.primary:
        print(message, flush=True)


def train(cfg: TrainConfig, model: Optional[nn.Module] = None) -> Dict[str, Any]:
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
    primary = int(os.environ.get('RANK', '0')) == 0
    # one process per run folder (the first rank of a torchrun job holds it for all of them)
    with hold_folder(cfg.out_dir, f'timm-nofrost train --out {cfg.out_dir}') if primary else nullcontext():
        return _train(cfg, model, primary)


def _train(cfg: TrainConfig, model: Optional[nn.Module], primary: bool) -> Dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    resume_path = None
    if cfg.resume:
        resume_path = out_dir / CHECKPOINT_LAST if cfg.resume == 'auto' else Path(cfg.resume)
        if not resume_path.is_file() and cfg.resume != 'auto':
            raise FileNotFoundError(f'Nothing to resume: checkpoint {resume_path} does not exist.')
        if not resume_path.is_file():  # a run killed before its first checkpoint: the same command starts it
            if primary:
                print(f'Nothing to resume in {out_dir} yet: starting the run.', flush=True)
            resume_path = None
    check_out_dir(out_dir, resume=resume_path is not None, overwrite=cfg.overwrite)  # every rank: none may hang
    if primary:
        remove_stale_temporaries(out_dir)
    info, device = init_distributed(cfg.device)
    source = build_datasets(cfg.data, cfg.data_dir, img_size=cfg.img_size or DEMO_IMG_SIZE,
                            val_fraction=cfg.val_fraction, seed=cfg.data_split_seed)
    num_classes = cfg.num_classes or source.num_classes
    if not num_classes:
        raise ValueError(f'Could not tell the number of classes of {cfg.data!r}; pass --num-classes.')
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_everything(cfg.seed)
    run = _Run(cfg, source, build_model(cfg, num_classes, model), num_classes, info, device, out_dir, 'nofrost')
    results = {'config': config_to_json(cfg), 'runs': {'nofrost': run.fit(resume_path)}}
    if cfg.initial_checkpoint:
        results['initial_checkpoint_sha256'] = hashlib.sha256(Path(cfg.initial_checkpoint).read_bytes()).hexdigest()
    if cfg.compare_bn:
        from .baseline import create_bn_twin
        _seed_everything(cfg.seed)
        bn_model, bn_name = create_bn_twin(cfg.model, num_classes, cfg.model_kwargs, cfg.baseline_model)
        bn_cfg = replace(cfg, adv=replace(cfg.adv, batch_mode='separate'), convert=False, resume=None)
        bn_dir = out_dir / 'bn-at'
        bn_resume = bn_dir / CHECKPOINT_LAST if resume_path and (bn_dir / CHECKPOINT_LAST).exists() else None
        if info.primary:
            if bn_resume is None:
                check_out_dir(bn_dir, resume=False, overwrite=True)
            remove_stale_temporaries(bn_dir)
        bn_run = _Run(bn_cfg, source, bn_model, num_classes, info, device, bn_dir, f'BN-AT ({bn_name})')
        results['runs']['bn-at'] = bn_run.fit(bn_resume)
    if info.primary:
        # a ready model passed in is not a timm name the eval command could rebuild
        results['data'] = image_fingerprint(source.val)  # the images eval_command evaluates: compare with its report
        results['eval_command'] = eval_command(cfg, out_dir, num_classes) if model is None else ''
        results['export_command'] = export_command(cfg, out_dir, num_classes) if model is None else ''
        atomic_json(out_dir / 'results.json', results)
        _log(info, '\n' + final_table(results))
        if results['eval_command']:
            _log(info, f"\nCheckpoints, per-epoch JSON and reports are in {out_dir}. A stronger evaluation of the best "
                       f"checkpoint:\n  {results['eval_command']}\nThe best checkpoint as a Hub-ready folder (with "
                       f"eval --out REPORT.json above, add --eval-report REPORT.json to put its results on the card):\n"
                       f"  {results['export_command']}")
    if info.world_size > 1:
        dist.barrier()
    return results


class _Run:
    """One model trained with one configuration into one output folder."""

    def __init__(self, cfg: TrainConfig, source: DataSource, model: nn.Module, num_classes: int, info: _Dist,
                 device: torch.device, out_dir: Path, name: str):
        from timm.data import create_loader
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        self.cfg, self.source, self.info, self.device = cfg, source, info, device
        self.out_dir, self.name, self.num_classes = out_dir, name, num_classes
        self.model = model.to(device)  # Module.to works in place and returns the module
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        # the data config of the run: the one ``timm-nofrost eval`` rebuilds from ``--data`` and ``--img-size``
        data_config = source_data_config(cfg.data, model, cfg.img_size)
        # the training loader's normalisation, also the evaluation's: a ready model may have no pretrained_cfg
        self.normalization = dict(mean=tuple(data_config['mean']), std=tuple(data_config['std']))
        jitter = cfg.color_jitter if cfg.color_jitter is not None else preset_value('color_jitter', cfg.data)
        self.loader = create_loader(
            source.train, input_size=data_config['input_size'], batch_size=cfg.batch_size, is_training=True,
            use_prefetcher=False, scale=cfg.scale or preset_value('scale', cfg.data), color_jitter=jitter,
            hflip=cfg.hflip, interpolation=data_config['interpolation'], mean=data_config['mean'],
            std=data_config['std'], num_workers=cfg.workers, distributed=info.world_size > 1, persistent_workers=False,
            device=device, pin_memory=device.type == 'cuda', crop_pct=data_config['crop_pct'])
        # evaluation in pixel space ([0, 1]); attacks and clean accuracy normalise inside PixelModel
        source.val.transform = pixel_eval_transform(data_config)
        self.task = AdversarialTrainer(model, criterion_kwargs=dict(smoothing=cfg.smoothing), adv_cfg=cfg.adv,
                                       **self.normalization, device=device, verbose=False)
        global_batch = cfg.batch_size * info.world_size
        self.lr = cfg.lr if cfg.lr is not None else (0.1 * global_batch / 256 if cfg.opt == 'sgd' else ADAMW_LR)
        self.optimizer = create_optimizer_v2(self.task.get_trainable_module(), cfg.opt, lr=self.lr,
                                             weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, 'cosine', num_epochs=cfg.epochs,
                                                warmup_epochs=cfg.warmup_epochs, warmup_lr=self.lr * 0.01)
        if info.world_size > 1:
            self.task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None)
        self.amp = amp_dtype(cfg.amp)
        # evaluation progress: bars with --progress (on a terminal), else a line at most every 10 s
        self.eval_progress = 'auto' if cfg.progress else 'lines'
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)  # disabled: plain steps
        self.start_epoch, self.best, self.history = 0, None, []

    # -- checkpoints -------------------------------------------------------------------------------------
    def state(self, epoch: int, metrics: Dict[str, Any]) -> Dict[str, Any]:
        task_state, net = self.task.get_task_state(), unwrap_model(self.model)
        return {
            'state_dict': net.state_dict(),
            'arch': self.cfg.model if self.name == 'nofrost' else net.pretrained_cfg.get('architecture'),
            'num_classes': self.num_classes,
            'model_kwargs': json.dumps(jsonable_kwargs(self.cfg.model_kwargs) if self.name == 'nofrost' else {}),
            'epoch': epoch,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            # the method and attack travel with the task state: a resume must continue the same training
            'task_state': {**{k: v for k, v in task_state.items() if k != 'adv_cfg'},
                           'method': self.cfg.adv.method, 'attack': self.cfg.adv.attack},
            'adv_cfg': json.dumps(task_state.get('adv_cfg', {})),
            'metric': metrics.get('val_robust_top1'),
            'best_metric': self.best,
            'history': json.dumps(self.history),
            'config': json.dumps(config_to_json(self.cfg)),  # what --resume compares
            'version': 1,
        }

    def restore(self, path: Path) -> None:
        state = load_training_checkpoint(path)
        self._check_same_run(path, state)
        try:
            load_checkpoint(unwrap_model(self.model), state['state_dict'])
        except CheckpointError as e:
            raise e.with_source(f'Checkpoint {path} does not match the model {self.cfg.model}', path) from None
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.task.load_task_state(state.get('task_state'))
        self.start_epoch = int(state['epoch']) + 1
        self.best = state.get('best_metric')
        self.history = json.loads(state.get('history', '[]'))
        if self.info.primary:
            self._write_summary()  # a run killed between its checkpoint and its summary gets every epoch's line
        _log(self.info, f'[{self.name}] resumed from {path} (epoch {self.start_epoch} of {self.cfg.epochs} done)')

    def _check_same_run(self, path: Path, state: Dict[str, Any]) -> None:
        """Refuse to resume a checkpoint written with other settings: the record would claim one run and hold
        another. Checkpoints from before the config was recorded compare their method and attack (then nofrost
        with PGD when not recorded either)."""
        if 'config' in state:
            recorded = json.loads(state['config'])
        else:
            saved = {'method': 'nofrost', 'attack': 'pgd', **json.loads(state.get('adv_cfg') or '{}'),
                     **(state.get('task_state') or {})}
            recorded = {'adv': {k: saved[k] for k in ('method', 'attack')}}
        differences = resume_differences(recorded, json.loads(json.dumps(config_to_json(self.cfg))))
        if differences:
            raise ValueError(f'{path} was trained with other settings: {"; ".join(differences)}. --resume continues '
                             f'the same run: repeat its settings, or start a new run from its weights with '
                             f'--initial-checkpoint {path} --out NEW_DIR.')

    # -- training ----------------------------------------------------------------------------------------
    def fit(self, resume: Optional[Path]) -> Dict[str, Any]:
        cfg, info = self.cfg, self.info
        if resume is not None:
            self.restore(resume)
        adv = cfg.adv
        method = ('standard training (no adversarial examples)' if adv.method == 'nofrost' and adv.adv_weight == 0
                  else f'method {adv.describe()}')
        _log(info, f'[{self.name}] {self.source.description}; model '
                   f'{cfg.model if self.name == "nofrost" else self.name}, '
                   f'{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, batch mode '
                   f'{self.task.batch_mode}; {method}; '
                   f'{cfg.epochs} epochs, batch {cfg.batch_size} x {info.world_size}, {cfg.opt} lr {self.lr:.4g}')
        for epoch in range(self.start_epoch, cfg.epochs):
            self.train_epoch(epoch)
        final = self.final_evaluation()
        return {'name': self.name, 'out_dir': str(self.out_dir), 'epochs': self.history, 'final': final,
                'catastrophic_overfitting': first_catastrophic_overfitting(self.history)}

    def train_epoch(self, epoch: int) -> None:
        cfg, info = self.cfg, self.info
        _seed_everything(cfg.seed + 10007 * epoch + info.rank)  # every epoch replays exactly after --resume
        if hasattr(getattr(self.loader, 'sampler', None), 'set_epoch'):
            self.loader.sampler.set_epoch(epoch)
        self.model.train()
        start = time.time()
        sums, steps = dict.fromkeys(_EPOCH_SUMS, 0.0), 0
        from tqdm import tqdm
        bar = tqdm(self.loader, total=len(self.loader), desc=f'[{self.name}] epoch {epoch + 1}/{cfg.epochs}',
                   unit='batch', leave=False, dynamic_ncols=True, file=sys.stderr,
                   disable=not (cfg.progress and info.primary))
        for step, (x, y) in enumerate(bar):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                result = self.task(x, y)
            loss = result['loss']
            self._check_finite(loss, epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            steps += 1
            for k in (*_EPOCH_SUMS, 'loss_robust'):  # loss_robust: the beta-weighted term of trades / mart
                if k in result:
                    sums[k] = sums.get(k, 0.0) + float(result[k].detach())
            bar.set_postfix(loss=f'{sums["loss"] / steps:.3f}', adv_acc=f'{100 * sums["acc_adv"] / steps:.0f}%')
        self.scheduler.step(epoch + 1)
        metrics = {f'train_{k}': (100 if 'acc' in k else 1) * (v / max(steps, 1)) for k, v in sums.items()}
        metrics.update(epoch=epoch + 1, lr=self.optimizer.param_groups[0]['lr'], train_time_s=time.time() - start)
        if info.primary:
            metrics.update(self.evaluate_epoch())
            self.history.append(metrics)
            verdict = catastrophic_overfitting(self.history)  # PGD collapsing while the training attack's acc rises
            metrics['catastrophic_overfitting'] = verdict is not None
            if verdict is not None:
                metrics['catastrophic_overfitting_message'] = verdict['message']
            self._save(epoch, metrics)
            warning = f'  CATASTROPHIC OVERFITTING\n[{self.name}] warning: {verdict["message"]}' if verdict else ''
            _log(info, f"[{self.name}] epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.3f}  "
                       f"val clean {metrics['val_clean_top1']:.1f} %  val {cfg.eval_attack} "
                       f"{metrics['val_robust_top1']:.1f} % ({metrics['val_robust_examples']} images)  "
                       f"{metrics['train_time_s']:.0f} s{warning}")
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
        clean = clean_accuracy(self.model, self.source.val, self.device, min(cfg.batch_size, 256), cfg.workers,
                               **self.normalization)
        report = robust_report(self.model, self.source.val, cfg, self.device, f'clean,{cfg.eval_attack}', False,
                               self.name, **self.normalization, progress=self.eval_progress)
        self.model.train()
        return {'val_clean_top1': clean, 'val_robust_top1': report_accuracy(report)[parse_attack(cfg.eval_attack).name],
                'val_robust_attack': cfg.eval_attack, 'val_robust_examples': report.n_examples}

    def _save(self, epoch: int, metrics: Dict[str, Any]) -> None:
        improved = self.best is None or metrics['val_robust_top1'] >= self.best
        self.best = metrics['val_robust_top1'] if improved else self.best
        last = atomic_save(self.state(epoch, metrics), self.out_dir / CHECKPOINT_LAST)
        if improved:
            atomic_copy(last, self.out_dir / CHECKPOINT_BEST)
        self._write_summary()

    def _write_summary(self) -> None:
        """``summary.jsonl``: one line per finished epoch, rewritten whole from the checkpointed history."""
        atomic_write(self.out_dir / SUMMARY, ''.join(json.dumps({'run': self.name, **m}) + '\n' for m in self.history))

    def final_evaluation(self) -> Dict[str, Any]:
        """The final table's evaluation, written to ``robustness.json`` / ``.md`` (resumable); with no attack
        (``--final-attacks clean``, as in a study, which evaluates the run itself) no report file is written."""
        if not self.info.primary:
            return {}
        attacked = any(parse_attack(a).kind != 'clean' for a in self.cfg.final_attacks.split(',') if a.strip())
        out = self.out_dir / 'robustness.json'
        arch = (getattr(self.model, 'pretrained_cfg', None) or {}).get('architecture') or type(self.model).__name__
        built = f'{arch} converted with convert_to_normfree' if self.cfg.convert else arch
        report = robust_report(self.model, self.source.val, self.cfg, self.device, self.cfg.final_attacks, attacked,
                               built, **self.normalization, progress=self.eval_progress, run=self.name,
                               out=out if attacked else None)
        if attacked:
            atomic_write(self.out_dir / 'robustness.md', report.to_markdown())
        acc = report_accuracy(report)
        if self.history and self.history[-1]['epoch'] == self.cfg.epochs:  # measured after the last epoch already
            clean = self.history[-1]['val_clean_top1']
        else:
            clean = clean_accuracy(self.model, self.source.val, self.device, min(self.cfg.batch_size, 256),
                                   self.cfg.workers, **self.normalization)
        return {'attacks': list(acc), 'accuracy': acc, 'n_examples': report.n_examples, 'val_clean_top1_full': clean,
                'sanity_flags_failed': [f['name'] for f in report.flags_failed]}
