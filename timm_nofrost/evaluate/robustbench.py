"""An evaluation report in RobustBench's ``model_info`` layout: the JSON a leaderboard entry is made of.

RobustBench keeps one flat JSON per model in ``model_info/<dataset>/<threat model>/<Name>.json`` (e.g.
``model_info/imagenet/Linf/Salman2020Do_R50.json``): ``link``, ``name`` (the paper's title), ``authors``,
``additional_data``, ``number_forward_passes``, ``dataset`` (``cifar10``, ``cifar100``, ``imagenet``), ``venue``,
``architecture``, ``eps`` (``"4/255"``), ``clean_acc``, ``reported`` and ``autoattack_acc``, accuracies as strings in
percent with two decimals (``"34.96"``), and an optional ``footnote``.

``autoattack_acc`` is AutoAttack's column of the report and nothing else: a report whose attacks did not include
``autoattack`` (``fast-worst-case`` is not AutoAttack, nor are ``apgd-ce`` / ``apgd-t`` / ``fab-t`` / ``square`` on
their own), or whose AutoAttack column was not measured (a cascade measures only the worst case), is refused with
a ValueError; ``require_autoattack=False`` writes the entry without the field instead. No other number stands in
for it.
"""
from typing import Any, Dict, Mapping, Optional, Union

from ..attacks.threat import ThreatModel
from ..model_card import check_eval_report, dataset_id

__all__ = ['robustbench_model_info', 'ROBUSTBENCH_DATASETS', 'ROBUSTBENCH_TEST_SET_SIZES', 'AUTOATTACK']

AUTOATTACK = 'autoattack'  # the attack name of the official AutoAttack (standard version) in a report
ROBUSTBENCH_DATASETS = ('cifar10', 'cifar100', 'imagenet')
# the images RobustBench's leaderboards evaluate: the whole CIFAR test sets, 5,000 ImageNet validation images
ROBUSTBENCH_TEST_SET_SIZES = {'cifar10': 10_000, 'cifar100': 10_000, 'imagenet': 5_000}
_DATASET_ALIASES = {'cifar-10': 'cifar10', 'cifar-100': 'cifar100', 'imagenet-1k': 'imagenet',
                    'imagenet1k': 'imagenet', 'ilsvrc2012': 'imagenet'}


def _percent(value: Any, what: str) -> str:
    """An accuracy fraction as RobustBench writes it: percent with two decimals, as a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f'evaluation report: {what} must be an accuracy in [0, 1], got {value!r}.')
    return f'{100 * value:.2f}'


def _benchmark_dataset(report: Mapping[str, Any], dataset: Optional[str]) -> str:
    """RobustBench's name of the report's data set (``dataset`` if given), refused if it has no leaderboard."""
    name = dataset if dataset is not None else dataset_id(report['dataset'])
    key = _DATASET_ALIASES.get(name.lower(), name.lower())
    if key not in ROBUSTBENCH_DATASETS:
        given = f'dataset={dataset!r}' if dataset is not None else f'the report\'s data set {report["dataset"]!r}'
        raise ValueError(f'{given} has no RobustBench leaderboard; accepted: {", ".join(ROBUSTBENCH_DATASETS)} '
                         f'(pass dataset= to name the benchmark the images come from).')
    return key


def _eps_label(report: Mapping[str, Any], eps: Optional[Union[str, float]]) -> str:
    """The report's eps label to write: ``eps`` (a number or a fraction like ``'8/255'``), or the only one."""
    labels = [str(label) for label in report['accuracy']]
    if eps is None:
        if len(labels) != 1:
            raise ValueError(f'the report measured eps {", ".join(labels) or "none"}: pass eps= to choose the one '
                             f'RobustBench entry to write.')
        return labels[0]
    label = ThreatModel(eps, report['norm']).label
    if label not in labels:
        raise ValueError(f'eps {eps!r} ({label}) was not measured by the report; its eps: {", ".join(labels)}.')
    return label


def _autoattack_accuracy(report: Mapping[str, Any], label: str) -> Optional[float]:
    """AutoAttack's accuracy at ``label``, or ``None`` with nothing measured; the reason is ``_no_autoattack``'s."""
    if AUTOATTACK not in report['attacks']:
        return None
    return report['accuracy'][label].get(AUTOATTACK)


def _no_autoattack(report: Mapping[str, Any], label: str) -> str:
    """Why the report has no AutoAttack accuracy at ``label``, and what to run instead."""
    attacks = ', '.join(report['attacks']) or 'none (clean accuracy only)'
    if AUTOATTACK in report['attacks']:
        why = ('it ran as part of a cascade, which measures only the worst case over its attacks'
               if report.get('cascade') else f'its AutoAttack column at eps {label} holds no measurement')
    else:
        why = f'AutoAttack did not run (attacks: {attacks})'
        if 'fast-worst-case' in report['attacks']:
            why += '; fast-worst-case is not AutoAttack'
    return (f'no AutoAttack accuracy to fill RobustBench\'s autoattack_acc: {why}. Evaluate with '
            f'timm-nofrost eval --attacks clean,autoattack (without --worst-case-only), or pass require_autoattack=False to '
            f'write the entry without autoattack_acc.')


def robustbench_model_info(
        report: Any,
        *,
        name: Optional[str] = None,
        link: str = '',
        authors: str = '',
        venue: str = '',
        architecture: Optional[str] = None,
        additional_data: bool = False,
        dataset: Optional[str] = None,
        eps: Optional[Union[str, float]] = None,
        reported: str = '',
        number_forward_passes: int = 1,
        footnote: Optional[str] = None,
        require_autoattack: bool = True,
) -> Dict[str, Any]:
    """A RobustBench ``model_info`` entry (``model_info/<dataset>/<norm>/<Name>.json``) from an evaluation report.

    Args:
        report: A ``RobustReport`` or its dict (the JSON of ``timm-nofrost eval --out``).
        name, link, authors, venue, architecture, additional_data: As RobustBench lists them: the paper's title
            (default: the report's model), link, authors, venue (``"ICML 2022"``), ``"ResNet-50"`` (default: the
            report's model), and whether training used data beyond the benchmark's training set.
        dataset: ``cifar10``, ``cifar100`` or ``imagenet``; default: read from the report's data source
            (``torch/cifar10`` is ``cifar10``); any other data set is refused.
        eps: Which of the report's radii to write (``'8/255'`` or ``8/255``); required when it has several.
        reported: The robust accuracy the paper reports, as text (``""`` when none).
        number_forward_passes: Forward passes per prediction (1 for a plain model).
        footnote: RobustBench's footnote; default: a note with the number of images when the report evaluated
            fewer than the leaderboard's test set (``""``: none).
        require_autoattack: Refuse (ValueError) a report without an AutoAttack measurement at ``eps``; ``False``
            writes the entry without ``autoattack_acc`` instead. Never filled from another attack.

    Returns the entry as a dict in RobustBench's key order (``json.dumps(info, indent=2)`` writes the file).
    Raises ValueError for anything but an evaluation report, a data set without a leaderboard, an eps the report
    did not measure (or several and none chosen), and no AutoAttack measurement (with ``require_autoattack``).
    """
    report = check_eval_report(report.to_dict() if hasattr(report, 'to_dict') else report)
    if isinstance(number_forward_passes, bool) or not isinstance(number_forward_passes, int) \
            or number_forward_passes < 1:
        raise ValueError(f'number_forward_passes must be an integer >= 1, got {number_forward_passes!r}.')
    benchmark = _benchmark_dataset(report, dataset)
    label = _eps_label(report, eps)
    autoattack = _autoattack_accuracy(report, label)
    if autoattack is None and require_autoattack:
        raise ValueError(_no_autoattack(report, label))

    info: Dict[str, Any] = {
        'link': link, 'name': str(report['model']) if name is None else name, 'authors': authors,
        'additional_data': bool(additional_data), 'number_forward_passes': number_forward_passes,
        'dataset': benchmark, 'venue': venue, 'architecture': str(report['model']) if architecture is None
        else architecture, 'eps': label, 'clean_acc': _percent(report['clean_accuracy'], 'clean_accuracy'),
        'reported': reported}
    if autoattack is not None:
        info['autoattack_acc'] = _percent(autoattack, f'accuracy[{label!r}][{AUTOATTACK!r}]')
    footnote = _footnote(report, benchmark) if footnote is None else footnote
    if footnote:
        info['footnote'] = footnote
    return info


def _footnote(report: Mapping[str, Any], benchmark: str) -> str:
    """A note with the number of images when the report evaluated fewer than the leaderboard does, else ``''``."""
    n, full = int(report['n_examples']), ROBUSTBENCH_TEST_SET_SIZES[benchmark]
    if n >= full:
        return ''
    split = (report.get('settings') or {}).get('split')
    return f'Evaluated on {n:,} images{f" of the {split} split" if split else ""}, not the leaderboard\'s {full:,}.'
