"""One ``timm-nofrost eval`` in one process against the same command under ``torchrun`` (gloo, CPU), side by side.

Trains the README's main job once (``timm-nofrost train``: the demo model, cached in ``--cache``) and evaluates
its best checkpoint with the eval command it prints (clean, PGD-20, APGD-CE at 8/255 on ``--images`` of its
validation images), in interleaved rounds (rotating order, so that machine noise hits every contender alike):

* ``one``: ``timm-nofrost eval ... --out`` in one process, ``--threads`` torch threads;
* ``torchrun-N``: ``torchrun --nproc_per_node N -m timm_nofrost eval ... --out``, ``--threads / N`` threads each
  (the same cores shared out).

It prints each contender's median wall time (process start included: imports, data, the report) and its ratio
to ``one`` (> 1: faster), and checks that every report's per-image outcomes equal ``one``'s.

    python benchmarks/bench_eval_shard.py --images 96 --rounds 3 --procs 2
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup(cache: Path, images: int) -> list:
    """The README's main job (``timm-nofrost train``, about 2 minutes, cached in ``cache``), and the eval command
    it prints, on ``images`` of its validation images; returns the arguments without --out."""
    results = cache / 'train' / 'results.json'
    if not results.is_file():
        env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])}
        subprocess.run([sys.executable, '-m', 'timm_nofrost', 'train', '--out', str(cache / 'train'),
                        '--no-progress'], env=env, check=True, capture_output=True)
    command = shlex.split(json.loads(results.read_text())['eval_command'])[1:]
    command[command.index('--checkpoint') + 1] = str(cache / 'train' / 'model_best.pth')  # wherever train ran
    return command + ['--attacks', 'clean,pgd-20,apgd-ce', '--n-examples', str(images), '--batch-size', '16',
                      '--no-progress', '--json']


def _run(contender: str, args: list, out: Path, threads: int) -> float:
    procs = 1 if contender == 'one' else int(contender.split('-')[1])
    env = {**os.environ, 'OMP_NUM_THREADS': str(max(threads // procs, 1)),
           'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])}
    launcher = [sys.executable, '-m', 'timm_nofrost'] if procs == 1 else \
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}', '-m',
         'timm_nofrost']
    start = time.perf_counter()
    done = subprocess.run(launcher + args + ['--out', str(out)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f'{contender} failed:\n{done.stderr[-2000:]}')
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=96, help='images evaluated (default: %(default)s)')
    parser.add_argument('--rounds', type=int, default=3, help='timed rounds (default: %(default)s)')
    parser.add_argument('--procs', type=int, nargs='+', default=[2], help='torchrun process counts (default: 2)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads in all (default: %(default)s)')
    parser.add_argument('--cache', default=str(Path(tempfile.gettempdir()) / 'bench-eval-shard'),
                        help='where the trained model is kept between runs (default: %(default)s)')
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix='bench-shard-'))
    try:
        command = _setup(Path(args.cache), args.images)
        contenders = ['one'] + [f'torchrun-{n}' for n in args.procs]
        times = {c: [] for c in contenders}
        for r in range(args.rounds):
            for c in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
                out = root / f'{c}-{r}.json'
                times[c].append(_run(c, command, out, args.threads))
        reports = {c: json.loads((root / f'{c}-0.json').read_text())['per_example'] for c in contenders}
        base = statistics.median(times['one'])
        print(f'{args.images} images, clean,pgd-20,apgd-ce at 8/255, {args.threads} threads in all, '
              f'{args.rounds} rounds (median wall seconds, process start included)')
        for c in contenders:
            same = 'same per-image outcomes' if reports[c] == reports['one'] else 'OUTCOMES DIFFER'
            print(f'  {c:<12} {statistics.median(times[c]):7.1f} s   {base / statistics.median(times[c]):5.2f}x   '
                  f'{same}')
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
