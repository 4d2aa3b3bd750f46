"""Model cards (Hub ``README.md``) for exported NoFrost weights.

The card carries what a user needs to judge the weights honestly: the paper's numbers with their attack
settings, and the independent AutoAttack re-evaluation showing that PGD alone overstates robustness.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

__all__ = ['ModelCardInfo', 'render_model_card', 'PAPER_RESULTS', 'INDEPENDENT_EVAL', 'CITATION']

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


def _front_matter(info: ModelCardInfo, extra_metadata: Optional[Dict[str, Any]]) -> str:
    """The Hub's YAML metadata block: tags, library, license (``extra_metadata`` added or overriding), dataset."""
    meta = {'tags': ['image-classification', 'timm', 'timm-nofrost', 'adversarial-robustness'],
            'library_name': 'timm', 'license': info.license, **(extra_metadata or {})}
    front = ['---']
    for key, value in meta.items():
        if isinstance(value, (list, tuple)):
            front += [f'{key}:', *(f'- {v}' for v in value)]
        else:
            front.append(f'{key}: {value}')
    if info.dataset:
        front += ['datasets:', f'- {info.dataset}']
    front.append('---')
    return '\n'.join(front)


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


def render_model_card(info: ModelCardInfo, extra_metadata: Optional[Dict[str, Any]] = None) -> str:
    """Markdown model card with Hub YAML front matter."""
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
