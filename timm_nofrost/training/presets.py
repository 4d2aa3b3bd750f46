"""Presets: the values of the settings a user leaves unset (``None``), as data, applied by one resolver.

``recipe`` is the NoFrost authors' ImageNet recipe; ``demo`` a CPU-sized run on the embedded demo data (a narrow
model and AdamW, which gets a zero-initialised NF net going within an epoch); ``study`` the study's protocol on
real data; ``demo-study`` the demo study, minutes on 2 CPU cores. A command resolves a setting through a chain
of presets, the first that sets it wins (``chain``); the CLI and the Python API call the same ``resolve``.
Keys are field names of ``TrainConfig``, ``AdversarialConfig`` and ``StudyConfig``.
"""
from typing import Any, Dict, Mapping, Tuple

__all__ = ['PRESETS', 'DEMO_MODEL', 'DEMO_MODEL_KWARGS', 'PROTOCOL_ATTACKS', 'PAPER_ARMS', 'chain', 'resolve',
           'preset_value', 'help_presets']

DEMO_MODEL = 'nf_resnet18_cifar_nofrost'
DEMO_MODEL_KWARGS: Dict[str, Any] = {'channels': (16, 32, 64, 128), 'stem_chs': 16, 'drop_rate': 0.0,
                                     'drop_path_rate': 0.0}
PROTOCOL_ATTACKS = 'clean,pgd-20,apgd-ce,fast-worst-case'  # add autoattack to run the official one too
PAPER_ARMS = ('standard', 'bn-at', 'mbn-at', 'nofrost')

PRESETS: Dict[str, Dict[str, Any]] = {
    'recipe': dict(model='nf_resnet50_nofrost', epochs=90, batch_size=256, opt='sgd', steps=10, val_fraction=0.1,
                   robust_examples=256, scale=(0.08, 1.0), color_jitter=0.4),
    'demo': dict(model=DEMO_MODEL, model_kwargs=DEMO_MODEL_KWARGS, epochs=4, batch_size=64, opt='adamw', steps=3,
                 scale=(0.6, 1.0), color_jitter=0.0),
    'study': dict(arms=PAPER_ARMS, seeds=(0, 1, 2), eval_examples=500, eval_attacks=PROTOCOL_ATTACKS,
                  curve_attack='apgd-ce', split_seed=0),
    'demo-study': dict(arms=PAPER_ARMS, seeds=(0, 1), img_size=16, epochs=2, steps=2, robust_examples=64,
                       eval_examples=64, eval_attacks=PROTOCOL_ATTACKS, curve_attack='pgd-20'),
}
# applied where the transform is built, not written into the config (a recorded None means "the preset's"):
# run folders and study.json written before keep comparing equal
_AT_USE = frozenset({'scale', 'color_jitter'})
# AdamW's learning rate when none is given (SGD follows the authors' 0.1 per 256 images)
ADAMW_LR = 3e-3


def chain(data: str, study: bool = False) -> Tuple[str, ...]:
    """The presets a command resolves unset settings from, first match wins."""
    if data == 'demo':
        return ('demo-study', 'demo', 'study', 'recipe') if study else ('demo', 'recipe')
    return ('study', 'recipe') if study else ('recipe',)


def _unset(key: str, values: Mapping[str, Any]) -> bool:
    value = values.get(key)
    if key == 'model_kwargs':  # the demo model's width, only for the demo model given no kwargs of its own
        return not value and values.get('model') == DEMO_MODEL
    if key == 'steps':  # the PGD steps; single-step attacks take their own one step
        return value is None and values.get('attack', 'pgd') == 'pgd'
    return value is None


def resolve(values: Dict[str, Any], presets: Tuple[str, ...]) -> Dict[str, Any]:
    """``values`` with every unset setting that a preset of ``presets`` sets filled in (a new dict)."""
    out = dict(values)
    for name in presets:
        for key, value in PRESETS[name].items():
            if key in out and key not in _AT_USE and _unset(key, out):
                out[key] = dict(value) if isinstance(value, dict) else value
    return out


def preset_value(key: str, data: str) -> Any:
    """A setting's preset value where it is applied at use (``scale``, ``color_jitter``)."""
    return next(PRESETS[p][key] for p in chain(data) if key in PRESETS[p])


def help_presets(study: bool = False) -> Dict[str, Dict[str, Any]]:
    """The presets a command's ``--help`` names for unset defaults, labelled as the help says them."""
    names = ('recipe', 'demo', 'study', 'demo-study') if study else ('recipe', 'demo')
    return {n.replace('-', ' '): PRESETS[n] for n in names}
