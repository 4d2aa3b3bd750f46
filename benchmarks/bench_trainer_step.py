"""One adversarial training step (attack + forward + backward + SGD step): ``AdversarialTrainer`` vs the
NoFrost authors' loop, side by side on the same model and batch.

Every contender trains its own copy of the same model (same initial weights, same batch, SGD with Nesterov
momentum, the authors' lr / weight decay, label smoothing 0.1), and the copies are timed in interleaved rounds
(each round runs every contender once, in rotating order), so that machine noise hits them alike:

* ``clean``: one standard training step (``timm.task.ClassificationTask``), no attack: the 1.00 of the
  "vs clean" column;
* ``authors``: the authors' loop, written out below: PGD in eval mode with frozen parameters and
  input-only gradients (``torch.autograd.grad``), their step ``min(1.25 eps, eps + 4/255) / steps`` from a
  uniform random start, weight standardisation recomputed at every forward (as their model does); then two
  training forwards (clean, adversarial) and ``0.5 * CE_ls(clean) + 0.5 * CE_ls(adv)``: the 1.00 of the
  "vs authors" column;
* ``param_grads``: the same loop, but the attack calls ``loss.backward()`` with trainable parameters
  (weight gradients computed at every attack step and thrown away, as naive AT code does);
* ``trainer``: ``AdversarialTrainer`` as shipped (batch mode ``concat``: one forward on cat([clean, adv]);
  attack with kernels standardised once per attack);
* ``trainer_separate``: ``AdversarialTrainer`` with ``batch_mode='separate'`` (two training forwards):
  splits the trainer's gain into the attack's share and the concatenated forward's share;
* ``trainer_cl``: ``trainer`` with the model and batch in channels_last;
* ``trainer_bf16``: ``trainer`` under ``torch.autocast(dtype=torch.bfloat16)`` (attack included);
* ``trainer_bf16_attack``: ``trainer`` with ``attack_dtype='bfloat16'``: only the attack under bf16
  autocast, the training forward and backward in fp32 (the attack only needs the sign of the input
  gradient);
* ``trainer_cl_bf16_attack``: ``trainer_cl`` and ``trainer_bf16_attack`` combined.

Prints median (and min) step times, their ratios to the authors' loop and to the clean step, and a JSON
line. ``--cpu-time`` times each step by the process CPU time instead of the wall clock: with ``--threads 1``
that is unaffected by other processes sharing the cores (on a busy 2-core machine, 2-thread wall-clock
rounds can be 5-20x slower whenever another process competes for a core).

Memory (``--memory``): each contender runs again in a subprocess of its own, and the table gets its peak
memory during ``--memory-steps`` training steps, above what the process held after building the model,
optimizer and batch. On CPU that is the growth of the peak resident set size (VmHWM in
/proc/self/status, reset to the current RSS before the steps; the whole process, so it includes allocator
slack; Linux only); on CUDA ``torch.cuda.max_memory_allocated()`` growth. Both include
the gradients and the SGD momentum buffers (two parameter-sized tensors, 2 x 61 MiB for nf_resnet26),
which every contender pays alike.

``--profile trainer,authors`` prints torch.profiler's top operators for those contenders (a few steps
each) instead of timing.

Training recipes (``--recipes``): instead of the contenders above, one ``AdversarialTrainer`` step of every
method x training attack (``--methods`` x ``--attacks``: nofrost / madry / trades / mart x PGD-``--steps`` /
FGSM-RS / N-FGSM, batch mode ``concat``) next to the clean step, in the same interleaved rounds, and a table of
their median step times relative to the clean step. ``--model-kwargs`` builds e.g. the demo model:

    cd benchmarks && python bench_trainer_step.py --recipes --model nf_resnet18_cifar_nofrost \\
        --model-kwargs '{"channels": [16, 32, 64, 128], "stem_chs": 16, "drop_rate": 0.0, "drop_path_rate": 0.0}' \\
        --img-size 32 --steps 10 --threads 1 --cpu-time --rounds 15

    python benchmarks/bench_trainer_step.py --rounds 5 --memory
    python benchmarks/bench_trainer_step.py --rounds 5 --threads 1 --cpu-time
    python benchmarks/bench_trainer_step.py --contenders clean,authors,trainer --rounds 10
    python benchmarks/bench_trainer_step.py --profile authors,trainer
"""
import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy
from timm.task import ClassificationTask

from _timing import time_rounds  # benchmarks/_timing.py: interleaved rounds

import timm_nofrost  # noqa: F401  registers the NoFrost models
from timm_nofrost import AdversarialTrainer
from timm_nofrost.attacks import nofrost_step_size
from timm_nofrost.training.adversarial import METHODS, TRAIN_ATTACKS, AdversarialConfig

CONTENDERS = {
    'clean': 'clean step (ClassificationTask)',
    'authors': "authors' loop (2 forwards, WS every forward)",
    'param_grads': 'attack with parameter grads',
    'trainer': 'AdversarialTrainer (concat)',
    'trainer_separate': 'AdversarialTrainer (separate)',
    'trainer_cl': 'AdversarialTrainer channels_last',
    'trainer_bf16': 'AdversarialTrainer bf16 autocast',
    'trainer_bf16_attack': 'AdversarialTrainer, bf16 attack only',
    'trainer_cl_bf16_attack': 'AdversarialTrainer, channels_last + bf16 attack',
}
DEFAULT_CONTENDERS = ','.join(CONTENDERS)
ADV_WEIGHT = 0.5
SMOOTHING = 0.1


class Setup:
    """Model, batch and recipe shared by every contender (each gets its own copy of the model)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.model = timm.create_model(args.model, num_classes=args.num_classes,
                                       **json.loads(args.model_kwargs or '{}')).to(self.device)
        cfg = self.model.pretrained_cfg
        self.mean = torch.tensor(cfg['mean'], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg['std'], device=self.device).view(1, 3, 1, 1)
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(self.device)
        self.target = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(self.device)
        self.input = (self.pixels - self.mean) / self.std  # what timm's loader hands a task
        self.eps = args.eps
        self.step_size = nofrost_step_size(args.eps, args.steps)

    def new_model(self) -> nn.Module:
        if self.args.memory_child:  # one contender per process: no second copy in its memory baseline
            return self.model.train()
        return copy.deepcopy(self.model).train()

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        lr = 0.1 * self.args.batch_size / 256
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-5)

    def sync(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize()


def authors_attack(model: nn.Module, setup: Setup, x: torch.Tensor, y: torch.Tensor,
                   param_grads: bool) -> torch.Tensor:
    """PGD as the authors generate training examples: eval mode, random start, signed steps, clip to ball.

    ``param_grads=False``: parameters frozen, gradients w.r.t. the input only (their code). ``True``: the
    attack backpropagates into the trainable parameters too (``loss.backward()``).
    """
    eps, alpha = setup.eps, setup.step_size
    params = list(model.parameters())
    model.eval()
    if not param_grads:
        for p in params:
            p.requires_grad_(False)
    try:
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(setup.args.steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model((x_adv - setup.mean) / setup.std), y)
            if param_grads:
                loss.backward()
                grad = x_adv.grad
            else:
                grad, = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train()
    return x_adv.detach()


def recipe_name(method: str, attack: str) -> str:
    """The contender name of one method x training attack (``--recipes``)."""
    return f'{method}/{attack}'


def recipe_config(name: str, setup: Setup) -> AdversarialConfig:
    """The ``AdversarialConfig`` of recipe contender ``method/attack``: the config's defaults for the method
    (lambda 0.5, beta 6, its step rule), PGD with ``--steps``, concat batch mode."""
    method, attack = name.split('/')
    return AdversarialConfig(eps=setup.eps, steps=setup.args.steps if attack == 'pgd' else None, method=method,
                             attack=attack, batch_mode='concat')


def build(name: str, setup: Setup) -> Callable[[], None]:
    """One training step of contender ``name`` on its own copy of the model."""
    model = setup.new_model()
    if '/' in name:  # a training recipe, method/attack (--recipes)
        task = AdversarialTrainer(model, criterion=LabelSmoothingCrossEntropy(SMOOTHING),
                                  adv_cfg=recipe_config(name, setup), device=setup.device, verbose=False)
        optimizer = setup.optimizer(model)

        def recipe_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            task(setup.input, setup.target)['loss'].backward()
            optimizer.step()
            setup.sync()
        return recipe_step
    criterion = LabelSmoothingCrossEntropy(SMOOTHING)
    x, y, xn = setup.pixels, setup.target, setup.input

    if name in ('authors', 'param_grads'):
        optimizer = setup.optimizer(model)
        param_grads = name == 'param_grads'

        def step() -> None:
            x_adv = authors_attack(model, setup, x, y, param_grads)
            optimizer.zero_grad(set_to_none=True)  # also drops the attack's parameter gradients
            out_clean = model((x - setup.mean) / setup.std)
            out_adv = model((x_adv - setup.mean) / setup.std)
            loss = (1 - ADV_WEIGHT) * criterion(out_clean, y) + ADV_WEIGHT * criterion(out_adv, y)
            loss.backward()
            optimizer.step()
            setup.sync()
        return step

    if name == 'clean':
        task = ClassificationTask(model, criterion=criterion, device=setup.device, verbose=False)
    elif name.startswith('trainer'):
        task = AdversarialTrainer(
            model, criterion=criterion, eps=setup.eps, steps=setup.args.steps, adv_weight=ADV_WEIGHT,
            batch_mode='separate' if name == 'trainer_separate' else 'concat', device=setup.device,
            verbose=False)
    else:
        raise ValueError(f'Unknown contender {name!r}; known: {", ".join(CONTENDERS)}.')
    if name in ('trainer_cl', 'trainer_cl_bf16_attack'):
        model.to(memory_format=torch.channels_last)
        xn = xn.contiguous(memory_format=torch.channels_last)
    if name.endswith('bf16_attack'):
        task.adv_cfg.attack_dtype = 'bfloat16'  # the shipped setting: attack in bf16, training step in fp32
    optimizer = setup.optimizer(model)
    autocast = name == 'trainer_bf16'

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=setup.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = task(xn, y)
        out['loss'].backward()
        optimizer.step()
        setup.sync()
    return step


def cpu_model_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_status_bytes(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def _rss_baseline() -> int:
    """Current resident set size, after resetting the peak (VmHWM) to it where the kernel allows."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset VmHWM to the current RSS (Linux >= 4.0)
        return _proc_status_bytes('VmRSS')
    except OSError:
        return _proc_status_bytes('VmHWM')


def peak_memory_child(name: str, args: argparse.Namespace) -> None:
    """Run in a subprocess: peak memory growth over ``--memory-steps`` steps of one contender (JSON).

    CPU: growth of the peak RSS (VmHWM of /proc/self/status; ru_maxrss would not do, Linux carries it over
    from the parent through exec). CUDA: growth of ``torch.cuda.max_memory_allocated()``.
    """
    setup = Setup(args)
    step = build(name, setup)
    cuda = setup.device.type == 'cuda'
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_baseline()
    for _ in range(args.memory_steps):
        step()
    peak = (torch.cuda.max_memory_allocated() if cuda else _proc_status_bytes('VmHWM')) - before
    print(json.dumps({'contender': name, 'peak_bytes': peak, 'kind': 'cuda_max_allocated' if cuda else 'VmHWM'}))


def measure_memory(names: List[str]) -> Dict[str, float]:
    """Peak memory growth (MiB) per contender, each in a fresh subprocess."""
    out = {}
    for name in names:
        argv = [a for a in sys.argv[1:]]
        cmd = [sys.executable, os.path.abspath(__file__), *argv, '--memory-child', name]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f'memory run of {name} failed:\n{proc.stderr[-3000:]}')
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        out[name] = result['peak_bytes'] / 2 ** 20
    return out


def profile(names: List[str], setup: Setup, steps: int = 3, top: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == 'cuda' else [])
    for name in names:
        step = build(name, setup)
        step()  # warm-up
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                step()
        print(f'\n=== {CONTENDERS[name]} ({steps} steps) ===')
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=top))


def print_recipe_table(medians: Dict[str, float], times: Dict[str, List[float]], methods: List[str],
                       attacks: List[str], setup: Setup, args: argparse.Namespace) -> None:
    """Median step time of each method x attack relative to the clean step (rows: methods), then the JSON."""
    clean = medians['clean']
    label = {'pgd': f'PGD-{args.steps}', 'fgsm-rs': 'FGSM-RS', 'n-fgsm': 'N-FGSM'}
    print(f'clean training step: median {clean:.4f} s (min {min(times["clean"]):.4f} s) = 1.00x')
    print('| method | ' + ' | '.join(label[a] for a in attacks) + ' |')
    print('|---|' + '---:|' * len(attacks))
    for m in methods:
        print(f'| {m} | ' + ' | '.join(f'{medians[recipe_name(m, a)] / clean:.2f}x' for a in attacks) + ' |')
    steps = {n: {'step_size': recipe_config(n, setup).attack_step_size, 'steps': recipe_config(n, setup).steps}
             for n in medians if '/' in n}
    print(json.dumps({
        'args': {k: v for k, v in vars(args).items() if k != 'memory_child'}, 'threads': torch.get_num_threads(),
        'torch': torch.__version__, 'timm': timm.__version__, 'cpu': cpu_model_name(), 'median_s': medians,
        'ratio_to_clean': {k: v / clean for k, v in medians.items()}, 'attack_settings': steps, 'times_s': times,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='nf_resnet26_nofrost', help='timm model name (default: %(default)s)')
    parser.add_argument('--model-kwargs', default=None, metavar='JSON',
                        help='extra create_model arguments as a JSON object')
    parser.add_argument('--num-classes', type=int, default=10, help='classifier outputs (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=32, help='images per step (default: %(default)s)')
    parser.add_argument('--img-size', type=int, default=64, help='input resolution (default: %(default)s)')
    parser.add_argument('--steps', type=int, default=3, help='PGD steps per training step (default: %(default)s)')
    parser.add_argument('--eps', type=float, default=8 / 255, help='Linf radius (default: 8/255)')
    parser.add_argument('--contenders', default=DEFAULT_CONTENDERS,
                        help=f'comma-separated, from: {", ".join(CONTENDERS)} (default: all)')
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds per contender (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds first (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads (default: %(default)s)')
    parser.add_argument('--device', default='cpu', help='torch device (default: %(default)s)')
    parser.add_argument('--cpu-time', action='store_true',
                        help='time each step by the process CPU time (all threads) instead of wall-clock time: '
                             'with --threads 1 it is robust to other processes sharing the cores')
    parser.add_argument('--memory', action='store_true',
                        help='also measure peak memory per contender, each in its own subprocess')
    parser.add_argument('--memory-steps', type=int, default=2, help='steps per memory run (default: %(default)s)')
    parser.add_argument('--profile', default='', help='comma-separated contenders to profile instead of timing')
    parser.add_argument('--recipes', action='store_true',
                        help='time every training method x attack against the clean step instead of the '
                             'contenders, and print a table of ratios')
    parser.add_argument('--methods', default=','.join(METHODS),
                        help='with --recipes: comma-separated methods (default: %(default)s)')
    parser.add_argument('--attacks', default=','.join(TRAIN_ATTACKS),
                        help='with --recipes: comma-separated training attacks (default: %(default)s)')
    parser.add_argument('--memory-child', default='', help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_child:
        peak_memory_child(args.memory_child, args)
        return
    names = [n.strip() for n in args.contenders.split(',') if n.strip()]
    if args.recipes:
        methods = [m.strip() for m in args.methods.split(',') if m.strip()]
        attacks = [a.strip() for a in args.attacks.split(',') if a.strip()]
        bad = [m for m in methods if m not in METHODS] + [a for a in attacks if a not in TRAIN_ATTACKS]
        if bad:
            parser.error(f'unknown method or attack {bad[0]!r}; methods: {", ".join(METHODS)}; attacks: '
                         f'{", ".join(TRAIN_ATTACKS)}')
        names = ['clean'] + [recipe_name(m, a) for m in methods for a in attacks]
        CONTENDERS.update({n: n for n in names[1:]})
    for n in names + [n for n in args.profile.split(',') if n]:
        if n not in CONTENDERS:
            parser.error(f'unknown contender {n!r}; known: {", ".join(CONTENDERS)}')

    setup = Setup(args)
    recipe = (f'training recipes at Linf eps {args.eps * 255:.3g}/255 (PGD-{args.steps}; each method\'s default '
              f'step, lambda and beta)' if args.recipes else
              f'PGD-{args.steps} (Linf eps {args.eps * 255:.3g}/255, step {setup.step_size * 255:.3g}/255, random '
              f'start), lambda {ADV_WEIGHT}')
    header = (f'{args.model}, batch {args.batch_size} x {args.img_size}px, {recipe}; '
              f'device {args.device}, torch {torch.__version__}, timm {timm.__version__}, '
              f'{torch.get_num_threads()} threads, {cpu_model_name()}')
    print(header + (', process CPU time per step' if args.cpu_time else ', wall-clock time per step'))
    if args.profile:
        profile([n for n in args.profile.split(',') if n], setup)
        return

    fns = {name: build(name, setup) for name in names}
    if not args.cpu_time:
        times = time_rounds(fns, args.rounds, args.warmup)
    else:  # the same interleaved rounds, but each call's process CPU time instead of wall time
        cpu: Dict[str, List[float]] = {name: [] for name in names}

        def cpu_timed(name: str, fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                start = time.process_time()
                fn()
                cpu[name].append(time.process_time() - start)
            return run
        time_rounds({name: cpu_timed(name, fn) for name, fn in fns.items()}, args.rounds, args.warmup)
        times = {name: values[args.warmup:] for name, values in cpu.items()}
    medians = {k: statistics.median(v) for k, v in times.items()}
    if args.recipes:
        print_recipe_table(medians, times, methods, attacks, setup, args)
        return
    memory = measure_memory(names) if args.memory else {}
    ref_authors = medians.get('authors')
    ref_clean = medians.get('clean')

    def ratio(value: float, ref) -> str:
        return f'{value / ref:.2f}x' if ref else '-'

    print(f'{"contender":<46} {"median s":>9} {"min s":>7} {"vs authors":>11} {"vs clean":>9}'
          + (' peak MiB' if memory else ''))
    for name, median in medians.items():
        line = (f'{CONTENDERS[name]:<46} {median:>9.3f} {min(times[name]):>7.3f} {ratio(median, ref_authors):>11} '
                f'{ratio(median, ref_clean):>9}')
        if memory:
            line += f' {memory[name]:>8.0f}'
        print(line)
    print(json.dumps({
        'args': {k: v for k, v in vars(args).items() if k != 'memory_child'}, 'threads': torch.get_num_threads(),
        'torch': torch.__version__, 'timm': timm.__version__, 'cpu': cpu_model_name(),
        'median_s': medians,
        'ratio_to_authors': {k: v / ref_authors for k, v in medians.items()} if ref_authors else {},
        'ratio_to_clean': {k: v / ref_clean for k, v in medians.items()} if ref_clean else {},
        'peak_memory_mib': memory, 'times_s': times,
    }))


if __name__ == '__main__':
    main()
