"""Robust evaluation on trained models: our attacks, with and without the active set, against torchattacks and
the official AutoAttack, side by side in one run.

The script trains three demo models itself (the embedded ``NoFrostShapes`` data and the demo preset's narrow
``nf_resnet18_cifar_nofrost``, 32 px, as ``timm-nofrost train`` does by default), caches them under ``--out``
and reuses them on re-runs (``--retrain`` trains again; changed training settings retrain by themselves):

* ``standard``: standard training: almost every image falls to PGD-20 at the evaluation eps;
* ``at-mid``: NoFrost adversarial training at 8/255, about half the images survive PGD-20 at 15/255
  (intended band 40-60 %);
* ``at-high``: NoFrost adversarial training at 20/255, more than 90 % survive PGD-20 at 15/255.

Per model, at one eps (``--eps``, 15/255), it times these contenders in interleaved rounds (each round runs every
contender once, in rotating order, so that machine noise hits them alike; a cheap warm-up of every contender
first) and reports medians of wall-clock and process-CPU time:

* PGD-20 (Linf, step ``--step-size``, 2.5 eps / 20 by default, random start) on ``--n-images`` images, all of
  them attacked, robust = clean-correct and still correct afterwards: ours with the active set (fooled
  examples stop costing forwards and backwards), ours with ``active_set=False`` (every step on every
  example), and ``torchattacks.PGD`` (the reference) on the model wrapped in ``PixelModel``;
* APGD-CE (100 iterations, 1 restart) on the clean-correct ones of ``--apgd-images`` images: ours and the
  official ``APGDAttack`` of ``pyautoattack`` (the reference); ``--contenders ...,apgd-full`` adds ours
  without the active set;
* the cascade APGD-CE then APGD-T (100 iterations each, APGD-T on the classes - 1 = 4 best other classes,
  each attack only on the survivors of the previous one) on ``--cascade-images`` images: ours through
  ``evaluate(..., attacks='apgd-ce,apgd-t', cascade=True)`` (our APGD-CE then ``APGDTargeted`` on the survivors
  where ``evaluate`` has no ``cascade``), and the official ``AutoAttack(version='custom', attacks=['apgd-ce',
  'apgd-t'])`` (the reference; its APGD-CE set to 1 restart, as in the standard version);
  ``--contenders ...,cascade-full`` adds ours without the active set.

Ratios are reference time / contender time: > 1 means faster than the reference. Robust accuracy is over the
group's images. Each row also counts the work done: the images sent through the model with input gradients
(forward and backward) and without (forward only), so that a speed-up can be read against the work the
active set saved (at equal cost per image, reference work / our work bounds the speed-up). A "targets" section
says which targets were met (judged by wall clock, or by CPU time with ``--cpu-time``), and whether the active
set left every per-image outcome unchanged. ``--json`` writes every number (each round's times included).

Run time on 2 CPU cores (1 thread, quiet machine): training 10 minutes on the first run (``--train-threads 2``
may be faster on a quiet machine, and was 2-3x slower on a busy one), then about 7 minutes per round
(``--rounds``, 2 by default): 25 minutes for a first run, 15 for a re-run. The APGD groups are the expensive
ones (APGD-T runs 400 iterations on every robust image); size them with ``--apgd-images`` and
``--cascade-images``, and the PGD group with ``--n-images``.

    python benchmarks/bench_robust_eval.py                                 # train (first run) and measure
    python benchmarks/bench_robust_eval.py --rounds 3 --json robust_eval.json
    python benchmarks/bench_robust_eval.py --models standard,at-mid --contenders pgd --rounds 5
    python benchmarks/bench_robust_eval.py --contenders pgd,apgd,apgd-full,cascade,cascade-full --cpu-time

Needs ``pip install pyautoattack scipy && pip install --no-deps torchattacks==3.5.1``.
"""
import argparse
import contextlib
import datetime
import io
import inspect
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import timm_nofrost  # noqa: F401  registers the NoFrost models
from timm_nofrost.attacks import APGD, PGD, APGDTargeted, PixelModel, parse_eps
from timm_nofrost.data import DEMO_CLASSES, NoFrostShapes
from timm_nofrost.training.adversarial import AdversarialConfig
from timm_nofrost.training.run import TrainConfig, train
from timm_nofrost.training.train_config import CHECKPOINT_LAST, DEMO_MODEL, DEMO_MODEL_KWARGS

# The three models, all the demo preset's model and data (batch 64, AdamW 3e-3 with a cosine schedule; PGD-3
# with the authors' step rule when adversarial), and all evaluated at --eps (15/255 by default, chosen to put
# at-mid in the middle of its band: PGD-20 accuracy falls from 95 % at 8/255 to 77 % at 12/255, 52 % at 15/255
# and 43 % at 16/255), unless a model sets 'eval_eps'. 'band' is the PGD-20 robust accuracy (percent) the model
# is meant to land in at that eps. at-high needs its eps ramped up (eps_warmup_steps, 31 batches per epoch):
# PGD-3 at 20/255 or 24/255 from the first batch does not learn within 4 epochs (loss stays at ln 5).
MODELS: Dict[str, Dict[str, Any]] = {
    'standard': dict(description='standard training, 4 epochs (no adversarial examples)',
                     adv=dict(steps=0, adv_weight=0.0), epochs=4, band=None),
    'at-mid': dict(description='NoFrost adversarial training, 4 epochs, PGD-3 at 8/255 (the demo preset)',
                   adv=dict(eps='8/255', steps=3), epochs=4, band=(40.0, 60.0)),
    'at-high': dict(description='NoFrost adversarial training, 6 epochs, PGD-3 at 20/255 ramped up over 2 epochs',
                    adv=dict(eps='20/255', steps=3, eps_warmup_steps=62), epochs=6, band=(90.0, 100.0)),
}
# which target each model carries: ours PGD-20 with the active set vs its reference
PGD_TARGETS = {'standard': ('torchattacks', 3.0), 'at-mid': ('torchattacks', 1.5), 'at-high': ('no-active', 0.97)}

PGD_STEPS = 20
ALL_CONTENDERS = ('pgd', 'apgd', 'apgd-full', 'cascade', 'cascade-full')
DEFAULT_CONTENDERS = ('pgd', 'apgd', 'cascade')
OURS_PGD, OURS_PGD_FULL, TA_PGD = ('ours PGD-20, active set + early stop', 'ours PGD-20, no active set, no early stop',
                                  'torchattacks PGD-20')
OURS_PGD_NO_ES = 'ours PGD-20, active set, no early stop'
OURS_APGD, OURS_APGD_FULL, AA_APGD = 'ours APGD-CE, active set', 'ours APGD-CE, no active set', 'official APGD-CE'
OURS_CASCADE, AA_CASCADE = 'ours APGD-CE + APGD-T cascade', 'official AutoAttack custom (apgd-ce, apgd-t)'
OURS_CASCADE_FULL = 'ours cascade, no active set'
REFERENCE = {OURS_PGD: TA_PGD, OURS_PGD_FULL: TA_PGD, OURS_PGD_NO_ES: TA_PGD, TA_PGD: TA_PGD, OURS_APGD: AA_APGD, OURS_APGD_FULL: AA_APGD,
             AA_APGD: AA_APGD, OURS_CASCADE: AA_CASCADE, OURS_CASCADE_FULL: AA_CASCADE,
             AA_CASCADE: AA_CASCADE}


# -- environment -----------------------------------------------------------------------------------------
def early_stop_supported() -> bool:
    """Whether our attacks take ``early_stop=`` (PGD's exact early stopping on repeated iterates)."""
    return 'early_stop' in inspect.signature(PGD.__init__).parameters or \
        'early_stop' in inspect.signature(PGD.__mro__[1].__init__).parameters


def active_set_supported() -> bool:
    """Whether our attacks take ``active_set=`` (False before the active set landed)."""
    return 'active_set' in inspect.signature(PGD.__init__).parameters or \
        any('active_set' in inspect.signature(c.__init__).parameters for c in PGD.__mro__ if c is not object)


def cascade_supported() -> bool:
    from timm_nofrost.evaluate import evaluate
    return 'cascade' in inspect.signature(evaluate).parameters


def machine_info(threads: int) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    except OSError:
        pass
    versions = {'python': platform.python_version(), 'torch': torch.__version__, 'timm': timm.__version__,
                'timm_nofrost': getattr(timm_nofrost, '__version__', '?')}
    for name in ('torchattacks', 'pyautoattack'):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001  (missing or broken: the contenders say so)
            versions[name] = None
    return {'cpu': cpu, 'cores': os.cpu_count(), 'threads': threads, 'platform': platform.platform(),
            'versions': versions, 'date': datetime.datetime.now().isoformat(timespec='seconds'),
            'command': ' '.join(shlex.quote(a) for a in [sys.executable.rsplit('/', 1)[-1]] + sys.argv),
            'active_set_supported': active_set_supported(), 'evaluate_cascade_supported': cascade_supported()}


def fmt_eps(eps: float) -> str:
    return f'{eps * 255:.3g}/255'


# -- training (cached) -----------------------------------------------------------------------------------
def new_model() -> torch.nn.Module:
    return timm.create_model(DEMO_MODEL, num_classes=len(DEMO_CLASSES), **DEMO_MODEL_KWARGS)


def train_spec(name: str) -> Dict[str, Any]:
    spec = MODELS[name]
    AdversarialConfig(**spec['adv'])  # valid settings; only the ones set here identify the cached model
    adv = {k: parse_eps(v) if k == 'eps' else v for k, v in sorted(spec['adv'].items())}
    return {'model': DEMO_MODEL, 'model_kwargs': {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in DEMO_MODEL_KWARGS.items()},
            'epochs': spec['epochs'], 'adv': adv, 'seed': 0, 'data': 'demo'}


class _EpochLines(io.TextIOBase):
    """A stdout that passes on only the training run's per-epoch lines, tagged with the model's name."""

    def __init__(self, name: str):
        self.name, self.buffer = name, ''

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split('\n')
        for line in lines:
            if '] epoch ' in line:
                sys.__stdout__.write(f'[{self.name}] {line.split("] ", 1)[1]}\n')
                sys.__stdout__.flush()
        return len(text)


def trained_model(name: str, out: Path, retrain: bool, threads: int) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The model ``name``, trained into ``out/name`` unless a checkpoint with the same settings is there."""
    folder = out / name
    spec = train_spec(name)
    meta_path = folder / 'bench_train.json'
    ckpt = folder / CHECKPOINT_LAST
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if retrain or meta is None or meta.get('spec') != spec or not ckpt.is_file():
        reason = 'retrain requested' if retrain else 'no cached weights' if meta is None or not ckpt.is_file() \
            else 'training settings changed'
        print(f'[{name}] training ({reason}): {MODELS[name]["description"]}; {threads} '
              f'thread{"" if threads == 1 else "s"} ...', flush=True)
        torch.set_num_threads(threads)
        start = time.perf_counter()
        cfg = TrainConfig(data='demo', epochs=spec['epochs'], adv=AdversarialConfig(**MODELS[name]['adv']),
                          out_dir=str(folder), overwrite=True, progress=False, robust_examples=64,
                          final_attacks='clean', seed=spec['seed'])
        with contextlib.redirect_stdout(_EpochLines(name)):  # only the per-epoch lines of the training log
            summary = train(cfg)
        last = next(iter(summary['runs'].values()))['epochs'][-1]
        meta = {'spec': spec, 'train_time_s': time.perf_counter() - start, 'train_threads': threads,
                'date': datetime.datetime.now().isoformat(timespec='seconds'),
                'last_epoch': {k: last.get(k) for k in ('val_clean_top1', 'val_robust_top1', 'val_robust_attack',
                                                        'val_robust_examples', 'train_loss')}}
        meta_path.write_text(json.dumps(meta, indent=2))
        print(f'[{name}] trained in {meta["train_time_s"]:.0f} s')
    else:
        print(f'[{name}] cached weights: {ckpt} (trained {meta.get("date")} in {meta.get("train_time_s", 0):.0f} s)')
    model = new_model()
    state = torch.load(ckpt, map_location='cpu', weights_only=True)
    model.load_state_dict(state['state_dict'])
    return model.eval(), meta


def val_images(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` demo validation images (pixels in [0, 1]) spread evenly over the split, and their labels."""
    x, y = NoFrostShapes('val').tensors()
    if not 0 < n <= len(y):
        raise SystemExit(f'image counts must be in [1, {len(y)}], got {n}.')
    idx = (torch.arange(n) * len(y)) // n
    return x[idx].contiguous(), y[idx].contiguous()


# -- contenders ------------------------------------------------------------------------------------------
def batches(x: torch.Tensor, *tensors: torch.Tensor, size: int):
    for i in range(0, x.shape[0], size):
        yield (x[i:i + size],) + tuple(t[i:i + size] for t in tensors)


def build_contenders(model: torch.nn.Module, data: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     eps: float, step_size: float, args) -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> a run of that contender over its group's images; the run returns per-image robust flags (bool).

    ``data`` maps each contender group to its images, labels and clean-correct flags.
    """
    pixel = PixelModel.from_model(model).eval()
    bs, seed, chosen = args.batch_size, args.seed, set(args.contenders)
    active = active_set_supported()
    fns: Dict[str, Callable[[], torch.Tensor]] = {}

    def ours(cls, on: Optional[bool], early_stop: Optional[bool] = None, **kw):
        options = dict(kw, seed=seed)
        if active and on is not None:
            options['active_set'] = on
        if early_stop_supported():  # early stopping follows the active set unless given
            options['early_stop'] = bool(on) if early_stop is None else early_stop
        return cls(pixel, eps=eps, **options)

    def per_batch(attack, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Our attack's robust flags over batches."""
        out = [attack(xb, yb).correct.cpu() for xb, yb in batches(xs, ys, size=bs)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)

    def official_flags(run, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Robust flags of an official attack (``run(x, y)`` -> x_adv) over batches, its forward included."""
        out = []
        with torch.random.fork_rng():  # the official code reseeds torch's global generator
            for xb, yb in batches(xs, ys, size=bs):
                adv = run(xb, yb)
                with torch.no_grad():
                    out.append(pixel(adv).argmax(1) == yb)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)

    def on_clean(clean: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Run ``fn(rows)`` on the clean-correct rows only (AutoAttack's protocol), robust False elsewhere."""
        idx = clean.nonzero()[:, 0]

        def run() -> torch.Tensor:
            full = torch.zeros_like(clean)
            if idx.numel():
                full[idx] = fn(idx)
            return full
        return run

    if 'pgd' in chosen:
        # every image goes in (torchattacks attacks misclassified ones too); robust = clean-correct and still correct
        x_p, y_p, clean_p = data['pgd']
        settings = dict(steps=args.steps, step_size=step_size, random_start=True)
        pgd_active, pgd_full = ours(PGD, True, **settings), ours(PGD, False, **settings)
        if active:
            fns[OURS_PGD] = lambda: per_batch(pgd_active, x_p, y_p) & clean_p
        if early_stop_supported():
            pgd_no_es = ours(PGD, True, early_stop=False, **settings)
            fns[OURS_PGD_NO_ES] = lambda: per_batch(pgd_no_es, x_p, y_p) & clean_p
        fns[OURS_PGD_FULL] = lambda: per_batch(pgd_full, x_p, y_p) & clean_p
        try:
            import torchattacks
        except ImportError as e:
            print(f'  torchattacks unavailable ({e}): pip install --no-deps torchattacks==3.5.1')
        else:
            theirs = torchattacks.PGD(pixel, eps=eps, alpha=step_size, steps=args.steps, random_start=True)

            def torchattacks_pgd() -> torch.Tensor:
                torch.manual_seed(seed)  # torchattacks draws its random start from the global generator
                out = []
                for xb, yb in batches(x_p, y_p, size=bs):
                    adv = theirs(xb, yb)
                    with torch.no_grad():
                        out.append(pixel(adv).argmax(1) == yb)
                return torch.cat(out) & clean_p
            fns[TA_PGD] = torchattacks_pgd

    if 'apgd' in chosen or 'apgd-full' in chosen:
        x_a, y_a, clean_a = data['apgd']
        apgd = dict(steps=args.apgd_steps, loss='ce', restarts=1)
        apgd_active, apgd_full = ours(APGD, True, **apgd), ours(APGD, False, **apgd)
        if 'apgd' in chosen and active:
            fns[OURS_APGD] = on_clean(clean_a, lambda idx: per_batch(apgd_active, x_a[idx], y_a[idx]))
        if 'apgd-full' in chosen or not active:
            fns[OURS_APGD_FULL] = on_clean(clean_a, lambda idx: per_batch(apgd_full, x_a[idx], y_a[idx]))
        APGDAttack = _official('autopgd_base', 'APGDAttack')
        if 'apgd' in chosen and APGDAttack is not None:
            options = dict(n_iter=args.apgd_steps, norm='Linf', n_restarts=1, eps=eps, seed=seed, loss='ce',
                           eot_iter=1, rho=.75, verbose=False, device=x_a.device)
            if 'logger' in inspect.signature(APGDAttack.__init__).parameters:
                options['logger'] = logging.getLogger('auto-attack')
            official = APGDAttack(pixel, **options)
            fns[AA_APGD] = on_clean(clean_a, lambda idx: official_flags(official.perturb, x_a[idx], y_a[idx]))

    if 'cascade' in chosen or 'cascade-full' in chosen:
        x_c, y_c, clean_c = data['cascade']
        n_classes = int(pixel(x_c[:1]).shape[1])
        if cascade_supported():
            from timm_nofrost.evaluate import evaluate
            from timm_nofrost.evaluate.robust_report import WORST_CASE
            loader = DataLoader(TensorDataset(x_c, y_c), batch_size=bs, shuffle=False)

            def evaluate_cascade(**kw) -> Callable[[], torch.Tensor]:
                def run() -> torch.Tensor:  # clean forward, APGD-CE on the clean-correct, APGD-T on the survivors
                    report = evaluate(model, loader, attacks='apgd-ce,apgd-t', eps=[eps], cascade=True, seed=seed,
                                      batch_size=bs, sanity=False, progress=False, **kw)
                    label = next(iter(report.per_example))
                    return torch.tensor(report.per_example[label][WORST_CASE], dtype=torch.bool)
                return run
            fns[OURS_CASCADE] = evaluate_cascade()
            if 'cascade-full' in chosen and 'active_set' in inspect.signature(evaluate).parameters:
                fns[OURS_CASCADE_FULL] = evaluate_cascade(active_set=False)
        else:
            ce = ours(APGD, True, steps=args.apgd_steps, loss='ce', restarts=1)
            targeted = ours(APGDTargeted, True, steps=args.apgd_steps, n_target_classes=n_classes - 1)

            def ours_cascade() -> torch.Tensor:
                robust = clean_c.clone()
                for attack in (ce, targeted):
                    rows = robust.nonzero()[:, 0]
                    if rows.numel():
                        robust[rows] = per_batch(attack, x_c[rows], y_c[rows])
                return robust
            fns[OURS_CASCADE] = ours_cascade
        Official = _official(None, 'AutoAttack')
        if Official is not None:
            runs = ['apgd-ce', 'apgd-t']
            params = inspect.signature(Official.__init__).parameters
            options = dict(norm='Linf', eps=eps, version='custom', seed=seed, device=x_c.device)
            if 'attacks' in params:  # pyautoattack
                options['attacks'] = runs
            else:  # the GitHub package
                options.update(attacks_to_run=runs, verbose=False)
            aa = Official(pixel, **options)
            aa.verbose = False
            aa.apgd.n_restarts = 1  # as in version='standard' (the custom version keeps 5)
            aa.apgd_targeted.n_restarts = 1
            aa.apgd_targeted.n_target_classes = max(1, min(9, n_classes - 1))  # as timm_nofrost's wrapper does
            batch_arg = 'batch_size' if 'batch_size' in inspect.signature(aa.run_standard_evaluation).parameters \
                else 'bs'

            def official_cascade() -> torch.Tensor:  # clean forward, checks, APGD-CE, APGD-T on survivors
                with torch.random.fork_rng():
                    out = aa.run_standard_evaluation(x_c, y_c, **{batch_arg: bs})
                adv = out[0] if isinstance(out, (tuple, list)) else out
                with torch.no_grad():
                    return (pixel(adv).argmax(1) == y_c) & clean_c
            fns[AA_CASCADE] = official_cascade
    return fns


def _official(module: Optional[str], name: str):
    """A class of the official AutoAttack: ``pyautoattack`` (PyPI), else ``autoattack`` (GitHub), else None."""
    import importlib
    for package in ('pyautoattack', 'autoattack'):
        try:
            return getattr(importlib.import_module(package + ('.' + module if module else '')), name)
        except (ImportError, AttributeError):
            continue
    print(f'  official AutoAttack unavailable ({name}): pip install pyautoattack')
    return None


# -- timing ----------------------------------------------------------------------------------------------
class WorkCounter:
    """Counts the images that go through the model: with input gradients (a forward and a backward) or without
    (a forward only). A forward pre-hook on the timm model, which every contender's forwards reach; it costs one
    Python call per forward."""

    def __init__(self, model: torch.nn.Module):
        self.grad = self.nograd = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: Tuple) -> None:
        x = inputs[0]
        if x.requires_grad:
            self.grad += x.shape[0]
        else:
            self.nograd += x.shape[0]

    def take(self) -> Tuple[int, int]:
        counts, self.grad, self.nograd = (self.grad, self.nograd), 0, 0
        return counts


def time_contenders(fns: Dict[str, Callable[[], torch.Tensor]], rounds: int, warmup_fns: Dict[str, Callable],
                    counter: WorkCounter) -> Tuple[Dict[str, Dict[str, List[float]]], Dict[str, torch.Tensor],
                                                   Dict[str, bool], Dict[str, Tuple[int, int]]]:
    """Warm-up, then ``rounds`` interleaved rounds in rotating order. Returns per contender its wall-clock and
    process-CPU times, the first round's robust flags, whether every round gave the same flags, and the first
    round's work (images forwarded with / without input gradients)."""
    for fn in warmup_fns.values():
        fn()
    names = list(fns)
    times = {name: {'wall': [], 'cpu': []} for name in names}
    flags: Dict[str, torch.Tensor] = {}
    stable: Dict[str, bool] = {name: True for name in names}
    work: Dict[str, Tuple[int, int]] = {}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            counter.take()
            wall, cpu = time.perf_counter(), time.process_time()
            robust = fns[name]()
            times[name]['wall'].append(time.perf_counter() - wall)
            times[name]['cpu'].append(time.process_time() - cpu)
            work.setdefault(name, counter.take())
            if name in flags:
                stable[name] &= bool(torch.equal(flags[name], robust))
            else:
                flags[name] = robust
        print(f'  round {r + 1}/{rounds} (wall / CPU s): '
              + ', '.join(f'{n} {times[n]["wall"][-1]:.1f} / {times[n]["cpu"][-1]:.1f}' for n in names), flush=True)
    return times, flags, stable, work


# -- report ----------------------------------------------------------------------------------------------
GROUP_OF = {OURS_PGD: 'pgd', OURS_PGD_FULL: 'pgd', OURS_PGD_NO_ES: 'pgd', TA_PGD: 'pgd', OURS_APGD: 'apgd', OURS_APGD_FULL: 'apgd',
            AA_APGD: 'apgd', OURS_CASCADE: 'cascade', OURS_CASCADE_FULL: 'cascade', AA_CASCADE: 'cascade'}


def measure_model(name: str, model: torch.nn.Module, meta: Dict[str, Any], images: Dict[str, Tuple],
                  args) -> Dict[str, Any]:
    eps = parse_eps(MODELS[name].get('eval_eps', args.eps))
    step_size = parse_eps(args.step_size) if args.step_size else 2.5 * eps / PGD_STEPS
    pixel = PixelModel.from_model(model).eval()
    data = {}
    for group, (x, y) in images.items():
        with torch.no_grad():
            data[group] = (x, y, pixel(x).argmax(1) == y)
    x, y, clean = data['pgd']
    print(f'\n== {name}: {MODELS[name]["description"]}; eval Linf eps {fmt_eps(eps)}, PGD step {fmt_eps(step_size)}; '
          f'clean accuracy {100 * clean.float().mean():.1f} % ({int(clean.sum())}/{clean.numel()})', flush=True)
    last = meta.get('last_epoch') or {}
    if last.get('val_clean_top1') is not None:
        adv = AdversarialConfig(**MODELS[name]['adv'])
        at = f'{last["val_robust_attack"]} at {"the training eps " if adv.adv_weight > 0 else ""}{fmt_eps(adv.eps)}'
        threads = meta.get('train_threads')
        print(f'   training: {meta.get("train_time_s", 0):.0f} s with {threads} thread{"" if threads == 1 else "s"}; '
              f'after the last '
              f'epoch: val clean {last["val_clean_top1"]:.1f} %, {at} {last["val_robust_top1"]:.1f} % '
              f'({last["val_robust_examples"]} images)')
    fns = build_contenders(model, data, eps, step_size, args)
    warm = {}
    if args.warmup:  # every code path once, cheaply: a few images, a few iterations
        small = argparse.Namespace(**{**vars(args), 'steps': 2, 'apgd_steps': 5})
        w = {g: tuple(t[:4] for t in d) for g, d in data.items()}
        warm = build_contenders(model, w, eps, step_size, small)
    counter = WorkCounter(model)
    try:
        times, flags, stable, work = time_contenders(fns, args.rounds, warm, counter)
    finally:
        counter.handle.remove()
    med = {clk: {k: statistics.median(v[clk]) for k, v in times.items()} for clk in ('wall', 'cpu')}
    primary = 'cpu' if args.cpu_time else 'wall'
    medians = med[primary]
    rows = {}
    for contender in fns:
        ref = REFERENCE[contender]
        robust, n = int(flags[contender].sum()), flags[contender].numel()
        ratio = {clk: med[clk][ref] / max(med[clk][contender], 1e-9) if ref in fns else None for clk in med}
        rows[contender] = {'median_s': medians[contender], 'clock': primary, 'ratio_vs_reference': ratio[primary],
                           'median_wall_s': med['wall'][contender], 'median_cpu_s': med['cpu'][contender],
                           'ratio_wall': ratio['wall'], 'ratio_cpu': ratio['cpu'], 'wall_s': times[contender]['wall'],
                           'cpu_s': times[contender]['cpu'], 'robust': robust, 'n_images': n,
                           'clean': int(data[GROUP_OF[contender]][2].sum()), 'robust_acc': 100.0 * robust / n,
                           'reference': ref, 'same_flags_every_round': stable[contender],
                           'fwd_bwd_images': work[contender][0], 'fwd_only_images': work[contender][1]}
    pairs = {}
    for a, b in ((OURS_PGD, OURS_PGD_FULL), (OURS_PGD_NO_ES, OURS_PGD_FULL), (OURS_APGD, OURS_APGD_FULL),
                 (OURS_CASCADE, OURS_CASCADE_FULL)):
        if a in flags and b in flags:
            differ = int((flags[a] != flags[b]).sum())
            pairs[f'{a} vs {b}'] = {'identical': differ == 0, 'differing_images': differ,
                                    'ratio': medians[b] / medians[a]}
    first, second = ('cpu', 'wall') if args.cpu_time else ('wall', 'cpu')
    print(f'\n{"contender":<46} {first + " s":>8} {"ratio":>7} {second + " s":>8} {"ratio":>7} {"robust acc":>17}'
          f' {"fwd+bwd":>8} {"fwd":>6}')
    for contender, row in rows.items():
        acc = f'{row["robust_acc"]:.1f} % ({row["robust"]}/{row["n_images"]})'
        cols = ''.join(f' {row[f"median_{clk}_s"]:>8.2f} ' + (f'{row[f"ratio_{clk}"]:>6.2f}x' if row[f'ratio_{clk}']
                                                              else f'{"-":>7}') for clk in (first, second))
        print(f'{contender:<46}{cols} {acc:>17} {row["fwd_bwd_images"]:>8} {row["fwd_only_images"]:>6}'
              + ('' if row['same_flags_every_round'] else '  [robust flags varied across rounds]'))
    print('  (fwd+bwd / fwd: images sent through the model with input gradients / without, in one run)')
    for pair, info in pairs.items():
        outcome = 'identical' if info['identical'] else f'DIFFER on {info["differing_images"]} images'
        print(f'  {pair}: per-image outcomes {outcome}; the active set is {info["ratio"]:.2f}x as fast')
    return {'description': MODELS[name]['description'], 'training': meta, 'eval_eps': eps, 'step_size': step_size,
            'clean': {g: int(d[2].sum()) for g, d in data.items()},
            'n_images': {g: d[2].numel() for g, d in data.items()},
            'contenders': rows, 'active_vs_full': pairs}


def _speed(ours: Dict[str, Any], ref: Dict[str, Any], clock: str) -> Tuple[float, str]:
    """(ratio by the judging clock, text with both clocks)."""
    other = 'cpu' if clock == 'wall' else 'wall'
    ratio = {clk: ref[f'median_{clk}_s'] / max(ours[f'median_{clk}_s'], 1e-9) for clk in ('wall', 'cpu')}
    return ratio[clock], f'{ratio[clock]:.2f}x by {clock} time ({other}: {ratio[other]:.2f}x)'


def check_targets(results: Dict[str, Dict[str, Any]], clock: str) -> List[Dict[str, Any]]:
    """Each target: its statement, met (True / False / None: not measured) and the numbers behind it."""
    targets = []
    for name, res in results.items():  # the accuracy bands the models were trained for
        band = MODELS[name]['band']
        rows = res['contenders']
        row_name = next((k for k in (TA_PGD, OURS_PGD_FULL, OURS_PGD) if k in rows), None)
        if band is not None:
            row = rows.get(row_name)
            text = f'({name}) PGD-20 robust accuracy in the intended {band[0]:g}-{band[1]:g} % band'
            targets.append({'target': text, 'met': None if row is None else band[0] <= row['robust_acc'] <= band[1],
                            'detail': 'not measured' if row is None else
                            f'{row["robust_acc"]:.1f} % ({row["robust"]}/{row["n_images"]}, {row_name})'})
    for name, (ref_kind, need) in PGD_TARGETS.items():
        res = results.get(name)
        if res is None:
            continue
        rows = res['contenders']
        ours = rows.get(OURS_PGD)
        ref_name = TA_PGD if ref_kind == 'torchattacks' else OURS_PGD_FULL
        ref = rows.get(ref_name)
        if ref_kind == 'torchattacks':
            text = (f'({name}) ours PGD-20 with the active set >= {need:g}x torchattacks PGD-20, at equal or lower '
                    f'accuracy')
        else:
            text = f'({name}) ours PGD-20 with the active set no slower than without it (>= {need:g}x, noise allowance)'
        if ours is None or ref is None:
            why = 'active_set not supported by this version' if ours is None and not active_set_supported() else \
                f'{OURS_PGD if ours is None else ref_name} not run'
            targets.append({'target': text, 'met': None, 'detail': f'not measured: {why}'})
            continue
        ratio, speed = _speed(ours, ref, clock)
        acc_ok = ours['robust'] <= ref['robust']
        detail = f'{speed}; robust {ours["robust_acc"]:.1f} % vs {ref["robust_acc"]:.1f} %'
        if ours['fwd_bwd_images']:
            detail += (f'; work {ours["fwd_bwd_images"]} vs {ref["fwd_bwd_images"]} forward+backward images, a '
                       f'{ref["fwd_bwd_images"] / ours["fwd_bwd_images"]:.2f}x bound at equal cost per image')
        pair = res['active_vs_full'].get(f'{OURS_PGD} vs {OURS_PGD_FULL}')
        if pair is not None:
            detail += '; per-image outcomes identical to the full run' if pair['identical'] else \
                f'; per-image outcomes DIFFER from the full run on {pair["differing_images"]} images'
        targets.append({'target': text, 'met': ratio >= need and acc_ok, 'ratio': ratio, 'detail': detail})
    for name, res in results.items():
        rows = res['contenders']
        label = OURS_APGD if OURS_APGD in rows else OURS_APGD_FULL
        ours, ref = rows.get(label), rows.get(AA_APGD)
        text = f'({name}) {label} at equal or lower accuracy than the official APGD-CE, and no slower'
        if ours is None or ref is None:
            targets.append({'target': text, 'met': None, 'detail': 'not measured'})
            continue
        ratio, speed = _speed(ours, ref, clock)
        targets.append({'target': text, 'met': ratio >= 1.0 and ours['robust'] <= ref['robust'], 'ratio': ratio,
                        'detail': f'{speed}; robust {ours["robust_acc"]:.1f} % vs {ref["robust_acc"]:.1f} %'})
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='output/bench_robust_eval',
                        help='folder of the trained models, reused on re-runs (default: %(default)s)')
    parser.add_argument('--retrain', action='store_true', help='train the models again even if cached')
    parser.add_argument('--models', default=','.join(MODELS), help='comma-separated subset of %(default)s')
    parser.add_argument('--contenders', default=','.join(DEFAULT_CONTENDERS),
                        help='comma-separated groups to run (default: %(default)s; also apgd-full and '
                             'cascade-full: ours APGD-CE / cascade without the active set)')
    parser.add_argument('--eps', default='15/255', help='Linf radius of the evaluation (default: %(default)s)')
    parser.add_argument('--step-size', default=None,
                        help='PGD step for ours and torchattacks (default: 2.5 eps / 20, our PGD\'s default)')
    parser.add_argument('--apgd-steps', type=int, default=100, help='APGD iterations (default: %(default)s)')
    parser.add_argument('--n-images', type=int, default=256, help='validation images for PGD (default: %(default)s)')
    parser.add_argument('--apgd-images', type=int, default=32,
                        help='validation images for APGD-CE (default: %(default)s)')
    parser.add_argument('--cascade-images', type=int, default=16,
                        help='validation images for the APGD-CE + APGD-T cascade (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=256, help='images per attack call (default: %(default)s)')
    parser.add_argument('--rounds', type=int, default=2, help='timed interleaved rounds (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=1, choices=(0, 1),
                        help='run every contender once first, on 4 images with 2 PGD / 5 APGD iterations '
                             '(default: %(default)s)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads while timing (default: %(default)s)')
    parser.add_argument('--train-threads', type=int, default=1,
                        help='torch threads while training (default: %(default)s; on a shared 2-core machine 2 threads '
                             'trained 2-3x slower than 1, on a quiet one they are faster)')
    parser.add_argument('--cpu-time', action='store_true',
                        help='judge the targets by process CPU time instead of wall clock (both are always measured '
                             'and printed; with 1 thread CPU time does not grow when other processes share the cores)')
    parser.add_argument('--seed', type=int, default=0, help='attack seed (default: %(default)s)')
    parser.add_argument('--json', default=None, help='write every number to this JSON file')
    args = parser.parse_args()
    args.steps = PGD_STEPS  # the warm-up runs fewer
    args.contenders = [c.strip() for c in args.contenders.split(',') if c.strip()]
    names = [m.strip() for m in args.models.split(',') if m.strip()]
    for bad in [c for c in args.contenders if c not in ALL_CONTENDERS] + [m for m in names if m not in MODELS]:
        raise SystemExit(f'unknown contender group or model {bad!r}; contenders: {", ".join(ALL_CONTENDERS)}; '
                         f'models: {", ".join(MODELS)}')
    logging.getLogger('auto-attack').setLevel(logging.WARNING)

    started = time.perf_counter()
    info = machine_info(args.threads)
    print(f'command: {info["command"]}')
    print(f'machine: {info["cpu"]}, {info["cores"]} cores; torch threads while timing: {args.threads} '
          f'(targets judged by {"process CPU time" if args.cpu_time else "wall clock"}); '
          + ', '.join(f'{k} {v}' for k, v in info['versions'].items()) + f'; {info["date"]}')
    no_active = 'NO (rows with the active set are skipped)'
    no_cascade = 'no (our cascade: APGD-CE, then APGDTargeted on the survivors)'
    print(f'active_set keyword: {"yes" if info["active_set_supported"] else no_active}; '
          f'evaluate(cascade=...): {"yes" if info["evaluate_cascade_supported"] else no_cascade}')

    out = Path(args.out)
    models = {name: trained_model(name, out, args.retrain, args.train_threads) for name in names}
    train_s = time.perf_counter() - started

    torch.set_num_threads(args.threads)
    images = {'pgd': val_images(args.n_images), 'apgd': val_images(args.apgd_images),
              'cascade': val_images(args.cascade_images)}
    print(f'\nDemo validation images (32 px, spread evenly over the 500-image split): {args.n_images} for PGD, '
          f'{args.apgd_images} for APGD-CE, {args.cascade_images} for the cascade; batch {args.batch_size}; '
          f'{args.rounds} interleaved rounds{" after a warm-up" if args.warmup else ""}; medians of wall-clock and '
          f'process-CPU seconds; ratio = reference time / contender time (> 1: faster than the reference), the '
          f'references being {TA_PGD} for the PGD rows, {AA_APGD} for APGD-CE and {AA_CASCADE} for the cascade; '
          f'robust accuracy over the group\'s images')
    results = {name: measure_model(name, model, meta, images, args) for name, (model, meta) in models.items()}

    targets = check_targets(results, 'cpu' if args.cpu_time else 'wall')
    print('\n== targets')
    for t in targets:
        verdict = 'not measured' if t['met'] is None else 'MET' if t['met'] else 'NOT MET'
        print(f'- {t["target"]}: {verdict} ({t["detail"]})')
    total_s = time.perf_counter() - started
    print(f'\ntotal {total_s:.0f} s (training or loading {train_s:.0f} s)')
    if args.json:
        payload = {'args': vars(args), 'machine': info, 'models': results, 'targets': targets, 'total_s': total_s}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
