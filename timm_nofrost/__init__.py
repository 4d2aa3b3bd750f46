"""timm-nofrost: normalizer-free adversarial training (NoFrost, ICML 2022) for timm.

Importing the package registers the ``*_nofrost`` model family (and ``normfree_converted``) with timm::

    import timm, timm_nofrost
    model = timm.create_model('nf_resnet50_nofrost', pretrained=True)
"""
from .version import __version__
from .checkpoint import CheckpointError, checkpoint_filter_fn, clean_state_dict, read_state_dict
from .pixels import AMP_DTYPES, PixelModel, amp_dtype, denormalize, normalize, resolve_mean_std, to_float_pixels
from .layers import fuse_weight_standardization, make_fusable
from .models import HF_HUB_ORG, NOFROST_RECIPE_DEFAULTS, NoFrostCfg, NormFreeBasicBlock, NormFreeBasicResNet
from .convert import BlockReport, ConversionReport, NormFreeConversionError, convert_to_normfree, normfree_blocks
from .signal_propagation import BlockSignal, signal_propagation
from .attacks import ThreatModel
from .hub import convert_and_export, export_checkpoint, list_nofrost_models, push_folder
from .training import AdversarialConfig, AdversarialTrainer
from .training.train_config import TrainConfig
from .study import ARMS, Arm, StudyConfig, run_study, write_report

__all__ = ['__version__', 'CheckpointError', 'checkpoint_filter_fn', 'clean_state_dict', 'read_state_dict',
           'AMP_DTYPES', 'PixelModel', 'amp_dtype', 'denormalize', 'normalize', 'resolve_mean_std', 'to_float_pixels',
           'fuse_weight_standardization', 'make_fusable', 'HF_HUB_ORG', 'NOFROST_RECIPE_DEFAULTS', 'NoFrostCfg',
           'NormFreeBasicBlock', 'NormFreeBasicResNet', 'BlockReport', 'ConversionReport', 'NormFreeConversionError',
           'convert_and_export', 'convert_to_normfree', 'normfree_blocks', 'BlockSignal', 'signal_propagation',
           'ThreatModel', 'export_checkpoint', 'list_nofrost_models', 'push_folder', 'AdversarialConfig',
           'AdversarialTrainer', 'TrainConfig', 'ARMS', 'Arm', 'StudyConfig', 'run_study', 'write_report']
