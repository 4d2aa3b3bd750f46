"""timm-nofrost: normalizer-free adversarial training (NoFrost, ICML 2022) for timm.

Importing the package registers the ``*_nofrost`` model family with timm's factory::

    import timm, timm_nofrost
    model = timm.create_model('nf_resnet50_nofrost', pretrained=True)
"""
from .version import __version__
from .checkpoint import CheckpointError, checkpoint_filter_fn, clean_state_dict, read_state_dict
from .models import HF_HUB_ORG, NOFROST_RECIPE_DEFAULTS, NoFrostCfg, NormFreeBasicBlock, NormFreeBasicResNet
from .hub import export_checkpoint, push_folder, list_nofrost_models

__all__ = [
    '__version__',
    'CheckpointError',
    'checkpoint_filter_fn',
    'clean_state_dict',
    'read_state_dict',
    'HF_HUB_ORG',
    'NOFROST_RECIPE_DEFAULTS',
    'NoFrostCfg',
    'NormFreeBasicBlock',
    'NormFreeBasicResNet',
    'export_checkpoint',
    'push_folder',
    'list_nofrost_models',
]
