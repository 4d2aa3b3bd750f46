"""Model cards (Hub ``README.md``) for exported NoFrost weights.

The card carries what a user needs to judge the weights honestly: the paper's numbers with their attack
settings, and the independent AutoAttack re-evaluation showing that PGD alone overstates robustness. An
evaluation report of the checkpoint itself (``timm-nofrost eval --out``) goes into the card's ``model-index``
metadata (``model_index``), which the Hub shows as the model's evaluation results.

A leaf module: it reads evaluation reports as plain mappings (``RobustReport.to_dict()``), never through
``timm_nofrost.evaluate``.
"""
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Dict, List, Mapping, Optional

import yaml

__all__ = ['ModelCardInfo', 'render_model_card', 'model_index', 'dataset_id', 'check_eval_report',
           'with_metadata', 'PAPER_RESULTS', 'INDEPENDENT_EVAL', 'CITATION', 'REPORT_KEYS']

PAPER_TITLE = 'Removing Batch Normalization Boosts Adversarial Training'
PAPER_URL = 'https://arxiv.org/abs/2207.01156'
AUTHORS_CODE_URL = 'https://github.com/amazon-research/normalizer-free-robust-training'

# ImageNet-1k, ResNet-50; robustness under PGD-20, L-inf eps 8/255, step 0.5/255, 224 center crop of 256
PAPER_RESULTS = (
    ('Standard training (BatchNorm)', '76.06', '0.00'),
    ('BN-based adversarial training (BN-AT)', '59.28', '13.57'),
    ('NoFrost (no normalizer)', '74.06', '23.56 (authors\' README: 22.45)'),
)
# independent re-evaluation of the released NoFrost ResNet-50, L-inf eps 8/255
INDEPENDENT_EVAL = (
    ('APGD-CE, 20 iterations', '12.0'),
    ('APGD-CE, 100 iterations', '5.3'),
    ('AutoAttack (standard)', '1.3'),
)
CITATION = """@inproceedings{wang2022removing,
  title={Removing Batch Normalization Boosts Adversarial Training},
  author={Wang, Haotao and Zhang, Aston and Zheng, Shuai and Shi, Xingjian and Li, Mu and Wang, Zhangyang},
  booktitle={International Conference on Machine Learning},
  pages={23433--23445},
  year={2022}
}"""
RECIPE = (
    'PGD-10 adversarial training, L-inf eps 8/255, step 1/255, uniform random start, attack in [0,1] pixel space '
    'with mean/std normalisation inside the model, generated in eval mode with frozen parameters',
    'loss = 0.5 * CE_ls(clean) + 0.5 * CE_ls(adversarial), label smoothing 0.1 (plain CE inside the attack)',
    'SGD Nesterov, momentum 0.9, lr 0.1 per 256 images, weight decay 5e-5, cosine schedule per epoch, 90 epochs',
    'dropout 0.25, drop-path 0.1, RandomResizedCrop 224 + horizontal flip; no AGC, no AMP',
)


@dataclass
class ModelCardInfo:
    """What the card says about one exported checkpoint."""
    model_name: str  # timm architecture, e.g. 'nf_resnet50_nofrost'
    repo_id: str  # Hub repo the folder is meant for
    num_params: int
    num_classes: int
    input_size: tuple
    description: str = ''
    tag: Optional[str] = None
    source_checkpoint: Optional[str] = None
    license: str = 'apache-2.0'
    dataset: Optional[str] = 'imagenet-1k'
    architecture: str = ('a normalizer-free pre-activation ResNet '
                         '(scaled weight-standardised convs, no normalization layers)')

    @property
    def is_paper_model(self) -> bool:
        return self.model_name == 'nf_resnet50_nofrost' and self.tag == 'at_in1k'


def _table(header: tuple, rows: tuple) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def _yaml(metadata: Mapping[str, Any]) -> str:
    """``metadata`` as the YAML of a card's front matter, keys in their order (nested values such as
    ``model-index`` included), between the ``---`` lines."""
    return '---\n' + yaml.safe_dump(dict(metadata), sort_keys=False, allow_unicode=True, width=4096) + '---'


def _front_matter(info: ModelCardInfo, extra_metadata: Optional[Mapping[str, Any]]) -> str:
    """The Hub's YAML metadata block: tags, library, license, dataset (``extra_metadata`` added or overriding)."""
    meta: Dict[str, Any] = {'tags': ['image-classification', 'timm', 'timm-nofrost', 'adversarial-robustness'],
                            'library_name': 'timm', 'license': info.license}
    if info.dataset:
        meta['datasets'] = [info.dataset]
    return _yaml({**meta, **(extra_metadata or {})})


def with_metadata(card: str, updates: Mapping[str, Any]) -> str:
    """``card`` (a README.md's text) with ``updates`` set in its YAML front matter, the other keys and the card's
    text kept as they are; a card without front matter gets one."""
    from huggingface_hub.repocard import REGEX_YAML_BLOCK  # the front matter as the Hub's own parsers find it
    match = REGEX_YAML_BLOCK.search(card)
    if match is None:
        return _yaml(dict(updates)) + '\n\n' + card
    meta = yaml.safe_load(match.group(2)) or {}
    if not isinstance(meta, dict):
        raise ValueError(f'the model card metadata is not a YAML mapping: {match.group(2)[:80]!r}')
    return card[:match.start()] + _yaml({**meta, **updates}) + '\n' + card[match.end():]


def _details(info: ModelCardInfo) -> List[str]:
    """Bullet points of the 'Model details' section."""
    details = [
        f'- **Architecture:** `{info.model_name}`, {info.architecture}',
        f'- **Parameters (M):** {info.num_params / 1e6:.2f}',
        f'- **Classes:** {info.num_classes}',
        f'- **Image size:** {info.input_size[-2]} x {info.input_size[-1]}',
        f'- **Paper:** [{PAPER_TITLE}]({PAPER_URL}) (ICML 2022)',
        f'- **Original code and checkpoints:** {AUTHORS_CODE_URL}',
    ]
    if info.source_checkpoint:
        details.append(f'- **Converted from:** `{info.source_checkpoint}` with `timm-nofrost export`')
    return details


def _usage(info: ModelCardInfo) -> List[str]:
    """Lines of the 'Usage' code block: load from the Hub (or the registered tag, or the authors' file)."""
    usage = [
        '```python',
        'import timm',
        'import timm_nofrost  # registers the NoFrost model family with timm (pip install timm-nofrost)',
        '',
        f"model = timm.create_model('hf-hub:{info.repo_id}', pretrained=True)",
    ]
    if info.tag:
        usage.append(f"# same weights through the registered tag: timm.create_model('{info.model_name}.{info.tag}', "
                     f"pretrained=True)")
    if info.is_paper_model:
        usage += [
            f"# or the authors' original file (Google Drive links in the README of {AUTHORS_CODE_URL}):",
            f"# timm.create_model('{info.model_name}', pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='{info.source_checkpoint or 'best_RA.pth'}'))",
        ]
    usage += [
        'model.eval()',
        '',
        'data_config = timm.data.resolve_model_data_config(model)',
        'transform = timm.data.create_transform(**data_config, is_training=False)',
        '```',
    ]
    return usage


def _robustness(info: ModelCardInfo) -> List[str]:
    """The paper's numbers (said to be another model's unless this is the paper's checkpoint), then the caveat."""
    results_intro = ('Reported in the paper (ImageNet-1k validation, ResNet-50):' if info.is_paper_model else
                     'For reference, the paper\'s ImageNet-1k ResNet-50 results (these are **not** measurements '
                     'of this checkpoint):')
    return [
        '## Robustness\n' + results_intro + '\n\n' + _table(('Method', 'Clean top-1 (%)', 'PGD top-1 (%)'),
                                                              PAPER_RESULTS)
        + '\n\nAttack: PGD-20, L-inf eps 8/255, step size 0.5/255, on the 224 center crop of 256 images.',
        '### Caveat: PGD overstates this robustness\n'
        'An independent re-evaluation of the released NoFrost ResNet-50 at L-inf eps 8/255 found:\n\n'
        + _table(('Attack', 'Robust top-1 (%)'), INDEPENDENT_EVAL)
        + '\n\nReport robustness next to a strong attack (APGD / AutoAttack), not PGD alone.',
    ]


def render_model_card(info: ModelCardInfo, extra_metadata: Optional[Mapping[str, Any]] = None) -> str:
    """Markdown model card with Hub YAML front matter (``extra_metadata``: more keys, e.g. ``model-index``)."""
    title = f'{info.model_name}.{info.tag}' if info.tag else info.model_name
    sections = [
        _front_matter(info, extra_metadata),
        f'# Model card for {title}',
        info.description or 'Normalizer-free ResNet trained with NoFrost adversarial training.',
        '## Model details\n' + '\n'.join(_details(info)),
        '## Usage\n' + '\n'.join(_usage(info)),
        *_robustness(info),
        '## Training recipe (authors\' code)\n' + '\n'.join(f'- {step}' for step in RECIPE),
        f'## License\n{info.license}: the authors released their code and weights under the Apache-2.0 license.',
        '## Citation\n```bibtex\n' + CITATION + '\n```',
    ]
    return '\n\n'.join(sections) + '\n'


# -- evaluation results as the Hub's model-index ---------------------------------------------------------------
# the fields of a ``RobustReport.to_dict()`` that the card's results are built from
REPORT_KEYS = ('model', 'dataset', 'norm', 'eps', 'attacks', 'n_examples', 'clean_accuracy', 'accuracy')
WORST_CASE = 'worst-case'  # the per-image worst case's column (timm_nofrost.evaluate.WORST_CASE)
# timm's create_dataset name prefixes (timm_nofrost.data.sources.TIMM_PREFIXES) and split folder names
_TIMM_PREFIXES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')
_SPLIT_DIRS = ('train', 'training', 'val', 'validation', 'valid', 'eval', 'evaluation', 'test')


def check_eval_report(report: Any) -> Mapping[str, Any]:
    """``report`` if it is an evaluation report (``timm-nofrost eval --out``, ``RobustReport.to_dict()``), else a
    ValueError saying what it lacks."""
    if not isinstance(report, Mapping):
        raise ValueError(f'an evaluation report must be a JSON object (timm-nofrost eval --out), got '
                         f'{type(report).__name__}.')
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:
        raise ValueError(f'not an evaluation report (as written by timm-nofrost eval --out): missing '
                         f'{", ".join(missing)}.')
    if not isinstance(report['accuracy'], Mapping) or not isinstance(report['attacks'], (list, tuple)):
        raise ValueError('not an evaluation report: "accuracy" must map eps labels to accuracies by attack and '
                         '"attacks" must be a list of attack names.')
    return report


def dataset_id(source: str) -> str:
    """A data set's name from a data source as ``--data`` takes it: ``torch/cifar10`` (or ``torch/cifar10:ROOT``)
    is ``cifar10``, ``hfds/ORG/NAME`` is ``ORG/NAME``, a folder is its name (its parent's for a split folder such
    as ``.../imagenet/val``), ``demo`` stays ``demo``."""
    source = str(source)
    prefix, _, rest = source.partition('/')
    if prefix.lower() in _TIMM_PREFIXES and rest:
        return rest.partition(':')[0]
    path = PurePath(source.rstrip('/\\'))
    if path.name.lower() in _SPLIT_DIRS and path.parent.name:
        return path.parent.name
    return path.name or source


def _percent(value: Any, where: str) -> float:
    """An accuracy fraction of the report in percent; anything but a number in [0, 1] is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f'evaluation report: {where} must be an accuracy in [0, 1], got {value!r}.')
    return 100 * value


def model_index(report: Mapping[str, Any], model_name: str, dataset: Optional[str] = None) -> List[Dict[str, Any]]:
    """The Hub's ``model-index`` metadata of an evaluation report (``RobustReport.to_dict()``, the JSON written by
    ``timm-nofrost eval --out``), built with huggingface_hub's ``EvalResult``.

    One image-classification result on the report's data set (``dataset``, default: ``dataset_id`` of the report's
    source; its split from the report's settings) with, as ``accuracy`` metrics in percent: the clean accuracy, the
    robust accuracy of every attack at every eps, and the per-image worst case over the attacks. Each metric's name
    and ``args`` carry the threat model, the eps, the attack(s), the protocol (per attack or cascade), the number
    of images and the sanity checks that failed. A value an attack did not measure (``None``: a cascade's per-attack columns) is left out, never
    written as a number; a report with no attack has no worst case (it would only repeat the clean accuracy).
    """
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index
    check_eval_report(report)
    n, norm, attacks = int(report['n_examples']), str(report['norm']), [str(a) for a in report['attacks']]
    settings = report.get('settings') or {}
    split = settings.get('split')
    name = dataset or dataset_id(report['dataset'])
    protocol = 'cascade' if report.get('cascade') else 'per attack'
    sanity_failed = [f['name'] for f in report.get('sanity') or [] if not f.get('ok', True)]
    common = dict(task_type='image-classification', task_name='Image Classification', dataset_type=name,
                  dataset_name=f'{name} ({split})' if split else name, dataset_split=split, metric_type='accuracy')
    subset = (report.get('subset') or {}).get('kind')
    results = [EvalResult(**common, metric_value=_percent(report['clean_accuracy'], 'clean_accuracy'),
                          metric_name=f'Clean accuracy (%), {n} images', metric_config='clean',
                          metric_args={'n_images': n, **({'subset': subset} if subset else {})})]
    for label, by_attack in report['accuracy'].items():
        if not isinstance(by_attack, Mapping):
            raise ValueError(f'evaluation report: accuracy[{label!r}] must map attack names to accuracies.')
        columns = attacks + ([WORST_CASE] if attacks else [])
        for attack in columns:
            value = by_attack.get(attack)
            if value is None:  # not measured: a cascade's per-attack column, or an attack this eps did not run
                continue
            args: Dict[str, Any] = {'threat_model': norm, 'eps': str(label), 'n_images': n, 'protocol': protocol}
            if attack == WORST_CASE:
                what = f'worst case per image over {", ".join(attacks)}'
                args['attacks'] = attacks
            else:
                what = attack
                args['attack'] = attack
            if sanity_failed:
                args['sanity_checks_failed'] = sanity_failed
            results.append(EvalResult(
                **common, metric_value=_percent(value, f'accuracy[{label!r}][{attack!r}]'),
                metric_name=f'Robust accuracy (%), {what}, {norm} eps {label}, {n} images',
                metric_config=f'{attack}@{label}', metric_args=args))
    return eval_results_to_model_index(model_name, results)
