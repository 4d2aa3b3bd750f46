"""The study report: per arm, mean and spread over seeds of every metric, a verdict written from the numbers,
plots, and what is missing. Built only from the runs' own files (``results.json``, ``eval.json``), so it can
aggregate a partly finished study, or one whose runs ran on different machines."""
import math
from contextlib import nullcontext
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple, Union

from ..attacks.threat import ThreatModel
from ..attacks.worst_case import FastWorstCase
from ..evaluate.robust_report import WORST_CASE, save_figure
from ..files import atomic_json, atomic_write, hold_folder
from .layout import EVAL_FILE, STUDY_FILE, read_record, reading, run_dir, run_state

__all__ = ['collect_study', 'write_report', 'study_markdown', 'verdict']

REPORT_MD, REPORT_JSON = 'report.md', 'report.json'
SCATTER_PNG, CURVE_PNG = 'clean_vs_robust.png', 'robust_vs_eps.png'
STANDARD_ARM = 'standard'
# arm -> seed -> a run's metrics / its eps curve (eps multiple -> accuracy)
_PerRun = Dict[str, Dict[int, Dict[str, Any]]]
_Curves = Dict[str, Dict[int, Dict[float, float]]]
FAST = FastWorstCase.name
_ANALYSIS = (('decision_margin_mean', 'decision margin (mean)'), ('loss_increase_mean', 'loss increase in the ball'),
             ('input_grad_dual_norm_mean', 'input-gradient dual norm'))


def _stats(values: Dict[int, float]) -> Dict[str, Any]:
    """mean, sample standard deviation (None for one seed), min, max and the per-seed values."""
    xs = list(values.values())
    return {'mean': statistics.fmean(xs), 'std': statistics.stdev(xs) if len(xs) > 1 else None, 'min': min(xs),
            'max': max(xs), 'n': len(xs), 'values': {str(k): v for k, v in sorted(values.items())}}


def _run_metrics(ev: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers of one evaluated run, in percent (accuracies), seconds and the analysis' units, and its flags."""
    protocol = ev['protocol']
    label = ThreatModel(protocol['eps'][0], protocol['norm']).label
    accuracy = protocol['accuracy'][label]
    failed = [f['name'] for f in protocol.get('sanity', []) if not f['ok']]
    return {'clean': 100.0 * protocol['clean_accuracy'],
            **{a: 100.0 * accuracy[a] for a in protocol['attacks'] if a != 'clean' and accuracy.get(a) is not None},
            WORST_CASE: 100.0 * accuracy[WORST_CASE], 'train_time_s': ev['train_time_s'],
            'eval_time_s': ev['eval_time_s'],
            **{key: protocol['analysis'][key] for key, _ in _ANALYSIS if key in protocol.get('analysis', {})},
            'sanity_failed': len(failed),
            'catastrophic_overfitting': bool(ev.get('catastrophic_overfitting')), 'sanity_flags': failed}


def _curve(ev: Dict[str, Any]) -> Dict[float, float]:
    """eps multiple -> accuracy (%) of the curve attack; 0 -> clean accuracy."""
    curve = ev['curve']
    attack = [a for a in curve['attacks'] if a != 'clean'][0]
    return {0.0: 100.0 * curve['clean_accuracy'],
            **{float(multiple): 100.0 * curve['accuracy'][ThreatModel(eps, curve['norm']).label][attack]
               for multiple, eps in zip(ev['curve_eps_multiples'], curve['eps'])}}


def collect_study(out_dir: Union[str, Path]) -> Dict[str, Any]:
    """Aggregate whatever has finished in a study folder; list what has not."""
    out = Path(out_dir)
    manifest_path = out / STUDY_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f'{out} is not a study folder: it has no {STUDY_FILE} (run `timm-nofrost study '
                                f'--out {out}` first).')
    manifest = read_record(manifest_path, 'restore it: it says which arms and seeds the study has')
    with reading(manifest_path):
        arms, seeds = manifest.get('arm_order') or list(manifest['arms']), manifest['seeds']
    per_run, curves, missing, notes, n_images = _read_runs(out, arms, seeds)
    metric_names = list(dict.fromkeys(k for arm in arms for m in per_run[arm].values() for k, v in m.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)))
    summary = {arm: {name: _stats({s: m[name] for s, m in runs.items() if name in m})
                     for name in metric_names if any(name in m for m in runs.values())}
               for arm, runs in per_run.items() if runs}
    _compare_to_standard(summary)
    attacks = [m for m in metric_names if m not in ('clean', 'train_time_s', 'eval_time_s', 'sanity_failed')
               and m not in dict(_ANALYSIS)]
    curve_summary = {arm: {str(mult): _stats({s: c[mult] for s, c in curves[arm].items()})
                           for mult in sorted({m for c in curves[arm].values() for m in c})}
                     for arm in arms if curves[arm]}
    return {
        'study': {k: manifest[k] for k in ('schedule', 'adversarial', 'protocol') if k in manifest},
        'arm_order': arms,  # report.json sorts its keys: the study's order of arms
        'arm_definitions': {arm: manifest['arms'][arm] for arm in arms}, 'arm_models': manifest.get('arm_models', {}),
        'seeds': seeds, 'attacks': attacks, 'robust_metric': next((m for m in ('autoattack', FAST) if m in attacks), WORST_CASE),
        'arms': summary, 'runs': {arm: {str(s): m for s, m in per_run[arm].items()} for arm in arms},
        'curves': curve_summary, 'missing': missing, 'notes': notes,
        'eps': manifest['adversarial']['eps'], 'norm': manifest['adversarial']['norm'],
        'n_images': max(n_images) if n_images else None,
        'data': manifest['schedule']['data'], 'model': manifest['schedule']['model'],
    }


def _read_runs(out: Path, arms: List[str], seeds: List[int]) -> Tuple[_PerRun, _Curves, List[Dict[str, Any]],
                                                                      List[str], Set[int]]:
    """Every run's ``eval.json``, in the study's order: the metrics and eps curve of each evaluated run by arm and
    seed, the runs not evaluated yet, notes on what makes the runs incomparable, and the image counts evaluated."""
    per_run: _PerRun = {arm: {} for arm in arms}
    curves: _Curves = {arm: {} for arm in arms}
    missing, notes, fingerprints, n_images, autoattack_notes, escalated = [], [], set(), set(), set(), []
    for arm in arms:
        for seed in seeds:
            path = run_dir(out, arm, seed)
            state, detail = run_state(path)
            if state != 'evaluated':
                missing.append({'arm': arm, 'seed': seed, 'state': state, 'detail': detail, 'path': str(path)})
                continue
            ev = read_record(path / EVAL_FILE)
            with reading(path / EVAL_FILE):
                per_run[arm][seed] = _run_metrics(ev)
                curves[arm][seed] = _curve(ev)
                fingerprints.add(ev['data'].get('images_sha256'))
                n_images.add(ev['protocol']['n_examples'])
                if ev.get('autoattack', 'run').startswith('not run'):
                    autoattack_notes.add(ev['autoattack'])
                if ev['protocol'].get('escalation', {}).get('ran'):
                    escalated.append(f'{arm} seed {seed} ({ev["protocol"]["escalation"]["reason"]})')
    if len(fingerprints) > 1:
        notes.append('The runs were NOT evaluated on the same images (different image fingerprints): their numbers '
                     'are not comparable.')
    if autoattack_notes:
        notes.append(f'AutoAttack: {"; ".join(sorted(autoattack_notes))}.')
    if escalated:
        notes.append(f"fast-worst-case ran AutoAttack's FAB-T and Square on its survivors for: {'; '.join(escalated)}.")
    return per_run, curves, missing, notes, n_images


def _compare_to_standard(summary: Dict[str, Dict[str, Any]]) -> None:
    """Add each arm's clean-accuracy drop and training-time cost against the standard arm, if there is one."""
    standard = summary.get(STANDARD_ARM)
    if standard is None:
        return
    base_clean, base_time = standard['clean']['mean'], standard['train_time_s']['mean']
    for stats in summary.values():
        stats['clean_drop'] = _stats({int(s): base_clean - v for s, v in stats['clean']['values'].items()})
        stats['cost_vs_standard'] = _stats({int(s): v / base_time for s, v in stats['train_time_s']['values'].items()})


# -- verdict ---------------------------------------------------------------------------------------------
def _compare(a: str, b: str, sa: Dict[str, Any], sb: Dict[str, Any]) -> Tuple[float, str]:
    """(difference of means a - b, whether it exceeds the seed spread, in words)."""
    diff = sa['mean'] - sb['mean']
    if sa['n'] < 2 or sb['n'] < 2:
        return diff, 'one seed on a side: no spread to judge it against'
    (top, s_top), (other, s_other) = ((a, sa), (b, sb)) if diff >= 0 else ((b, sb), (a, sa))
    if s_top['min'] > s_other['max']:
        return diff, f'every seed of {top} is above every seed of {other}: beyond the seed spread'
    return diff, 'the seed ranges overlap: within the seed spread'


def _metric_label(metric: str) -> str:
    return {'clean': 'clean accuracy', WORST_CASE: 'worst-case robust accuracy',
            'autoattack': 'AutoAttack accuracy', FAST: 'fast worst-case accuracy'}.get(metric, f'{metric.upper()} accuracy')


def verdict(result: Dict[str, Any]) -> List[str]:
    """Sentences written from the numbers: who leads on each metric, and whether by more than the seed spread."""
    arms = result['arms']
    lines: List[str] = []
    if len(arms) < 2:
        return ['Fewer than two arms have finished: nothing to compare yet.'] + result['notes']
    for metric in ['clean', *result['attacks']]:
        ranked = sorted((a for a in arms if metric in arms[a]), key=lambda a: arms[a][metric]['mean'], reverse=True)
        if len(ranked) < 2:
            continue
        top, second = ranked[0], ranked[1]
        diff, spread = _compare(top, second, arms[top][metric], arms[second][metric])
        label = _metric_label(metric)
        lines.append(f'{label[0].upper() + label[1:]}: {top} leads ({arms[top][metric]["mean"]:.1f} %), '
                     f'{diff:.1f} points above {second} ({arms[second][metric]["mean"]:.1f} %); {spread}.')
    robust = result['robust_metric']
    for bn in ('bn-at', 'mbn-at'):
        if 'nofrost' in arms and bn in arms:
            diffs = {m: _compare('nofrost', bn, arms['nofrost'][m], arms[bn][m]) for m in ('clean', robust)}
            lines.append(f'NoFrost against {bn} (the paper\'s comparison): '
                         + '; '.join(f'{_metric_label(m)} {d:+.1f} points ({s})' for m, (d, s) in diffs.items()) + '.')
    if STANDARD_ARM in arms and 'nofrost' in arms and 'clean_drop' in arms['nofrost']:
        drops = ', '.join(f'{a} {arms[a]["clean_drop"]["mean"]:.1f}' for a in arms if a != STANDARD_ARM)
        lines.append(f'Clean accuracy lost against standard training (points; the paper\'s headline): {drops}.')
    if robust == FAST:
        lines.append("AutoAttack did not run: the robust figures are the fast worst case (APGD-CE, then APGD-T on "
                     "linearly ranked targets; AutoAttack's FAB-T and Square only where a sanity check flagged a "
                     'model), not AutoAttack; add autoattack to --eval-attacks to run the official one.')
    elif robust != 'autoattack':
        lines.append('AutoAttack was not part of this evaluation: the robust figures are PGD / APGD only and may '
                     'overstate robustness.')
    for key, sentence in (('sanity_failed', 'Sanity flags failed for: {} (see the table below): read those numbers '
                                            'with care.'),
                          ('catastrophic_overfitting', 'Catastrophic overfitting during training: {}.')):
        named = sorted({f'{a} seed {s}' for a, runs in result['runs'].items() for s, m in runs.items() if m.get(key)})
        if named:
            lines.append(sentence.format(', '.join(named)))
    if result['missing']:
        lines.append(f'{len(result["missing"])} run(s) have not finished (listed below): the figures cover the '
                     f'finished ones only.')
    return lines + result['notes']


# -- Markdown --------------------------------------------------------------------------------------------
def _cell(stats: Optional[Dict[str, Any]], fmt: str = '{:.1f}', suffix: str = '') -> str:
    if stats is None:
        return '-'
    return fmt.format(stats['mean']) + suffix + ('' if stats['std'] is None else ' ± ' + fmt.format(stats['std']))


def study_markdown(result: Dict[str, Any], plots: Dict[str, str]) -> str:
    arms = result['arms']
    threat = ThreatModel(result['eps'], result['norm'])
    protocol = result['study'].get('protocol', {})
    lines = [f'# Study: {result["model"]} on {result["data"]}', '', *[f'- {s}' for s in verdict(result)], '']
    metrics = ['clean', 'clean_drop', *result['attacks']]
    header = ['arm', 'seeds', 'clean', 'drop vs standard', *result['attacks'], 'train time (s)', 'cost vs standard']
    lines += [f'## Accuracy (%), mean ± standard deviation over seeds; {threat}, '
              f'{result["n_images"]} validation images', '',
              '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for arm, stats in arms.items():
        row = [arm, str(stats['clean']['n'])] + [_cell(stats.get(m)) for m in metrics]
        row += [_cell(stats.get('train_time_s'), '{:.0f}'), _cell(stats.get('cost_vs_standard'), '{:.2f}', 'x')]
        lines.append('| ' + ' | '.join(row) + ' |')
    lines += ['', 'Worst case: the lowest outcome over all attacks, per image. Drop vs standard: the standard arm\'s '
              'mean clean accuracy minus this arm\'s. Cost: training time relative to the standard arm.', '']
    if result['missing']:
        lines += ['## Not finished', '', *[f'- {m["arm"]} seed {m["seed"]}: {m["detail"]} ({m["path"]})'
                                           for m in result['missing']], '']
    for key, title in (('scatter', 'Clean against robust accuracy (every seed; larger marker: mean)'),
                       ('curve', f'Robust accuracy against eps ({protocol.get("curve_attack")}; mean ± std)')):
        if key in plots:
            lines += [f'## {title}', '', f'![{title}]({plots[key]})', '']
    if any(k in stats for stats in arms.values() for k, _ in _ANALYSIS):
        lines += ['## Margin and smoothness (the paper\'s explanation for its gains)', '',
                  '| arm | ' + ' | '.join(label for _, label in _ANALYSIS) + ' |', '|' + '---|' * (len(_ANALYSIS) + 1)]
        for arm, stats in arms.items():
            lines.append(f'| {arm} | ' + ' | '.join(_cell(stats.get(k), '{:.4g}') for k, _ in _ANALYSIS) + ' |')
        lines += ['', 'Decision margin: smallest radius at which PGD flips the prediction (an upper bound, searched up '
                  'to 4 eps), on up to 32 correctly classified images. Loss increase: what PGD gains within the '
                  'eps-ball. Smaller loss increase and gradient norm mean a smoother model.', '']
    lines += ['## Runs', '', '| arm | seed | clean | ' + ' | '.join(result['attacks']) + ' | sanity flags failed |',
              '|' + '---|' * (len(result['attacks']) + 4)]
    for arm, runs in result['runs'].items():
        for seed, m in runs.items():
            cells = [f'{m[a]:.1f}' if a in m else '-' for a in result['attacks']]
            flags = ', '.join(m['sanity_flags']) or 'none'
            lines.append(f'| {arm} | {seed} | {m["clean"]:.1f} | ' + ' | '.join(cells) + f' | {flags} |')
    lines += ['', '## Arms', '']
    for arm, definition in result['arm_definitions'].items():
        keys = ', '.join(f'{k}={v}' for k, v in definition.items()
                         if k not in ('name', 'description') and v is not None)
        lines.append(f'- **{arm}**: {definition.get("description") or ""} '
                     f'({result["arm_models"].get(arm, "")}; {keys})')
    schedule, adv = result['study'].get('schedule', {}), result['study'].get('adversarial', {})
    lines += ['', '## Protocol', '',
              f'- Training: {schedule.get("epochs")} epochs, batch {schedule.get("batch_size")}, {schedule.get("opt")} '
              f'lr {schedule.get("lr") or "default"}, weight decay {schedule.get("weight_decay")}, label smoothing '
              f'{schedule.get("smoothing")}; attacks at {threat}, PGD steps {adv.get("steps")}.',
              f'- Evaluation of the final weights on the same {result["n_images"]} validation images for '
              f'every run: {protocol.get("eval_attacks")} at {threat} (attack seed {protocol.get("eval_seed")}), '
              f'sanity checks, and {protocol.get("curve_attack")} at {protocol.get("curve_eps")} x eps.',
              f'- Seeds: {", ".join(str(s) for s in result["seeds"])}.', '']
    return '\n'.join(lines)


# -- plots -----------------------------------------------------------------------------------------------
def _plots(result: Dict[str, Any], out: Path) -> Dict[str, str]:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    plots: Dict[str, str] = {}
    robust = result['robust_metric']
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for i, (arm, runs) in enumerate(result['runs'].items()):
        if not runs:
            continue
        color = colors[i % len(colors)]
        ax.scatter([m['clean'] for m in runs.values()], [m[robust] for m in runs.values() if robust in m],
                   color=color, alpha=0.6, s=25)
        stats = result['arms'][arm]
        ax.scatter([stats['clean']['mean']], [stats[robust]['mean']], color=color, s=110, marker='D',
                   edgecolors='black', label=arm)
    ax.set(xlabel='clean accuracy (%)', ylabel=f'{_metric_label(robust)} (%)')
    ax.set_title(f'{result["model"]} on {result["data"]}', fontsize=9)
    plots['scatter'] = save_figure(plt, fig, ax, out / SCATTER_PNG, legend_size=8).name
    if result['curves']:
        fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
        scale = 255 if result['norm'] == 'Linf' else 1
        for i, (arm, curve) in enumerate(result['curves'].items()):
            mults = sorted(curve, key=float)
            xs = [float(m) * result['eps'] * scale for m in mults]
            ax.errorbar(xs, [curve[m]['mean'] for m in mults], yerr=[curve[m]['std'] or 0 for m in mults],
                        marker='o', capsize=3, label=arm, color=colors[i % len(colors)])
        ax.set(xlabel='eps' + (' (x 1/255)' if scale == 255 else ''), ylabel='accuracy (%)', ylim=(0, 100))
        plots['curve'] = save_figure(plt, fig, ax, out / CURVE_PNG, legend_size=8).name
    return plots


def write_report(out_dir: Union[str, Path]) -> Dict[str, Any]:
    """Write report.md, report.json and the plots into the study folder; returns the report's JSON. Launches
    finishing together take turns, so the report written last is built from every run finished by then."""
    out = Path(out_dir)
    with hold_folder(out, 'timm-nofrost study report', wait=True) if out.is_dir() else nullcontext():
        result = collect_study(out)
        result.update(verdict=verdict(result), plots=_plots(result, out) if result['arms'] else {})
        atomic_json(out / REPORT_JSON, _finite(result))
        atomic_write(out / REPORT_MD, study_markdown(result, result['plots']))
    return result


def _finite(value: Any) -> Any:
    """JSON without NaN / inf (strict parsers refuse them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
