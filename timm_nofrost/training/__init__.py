"""Adversarial training: the NoFrost recipe as a timm training task."""
from .batch_stats import batch_statistics_layers, has_split_batchnorm
from .adversarial import BATCH_MODES, METHODS, TRAIN_ATTACKS, AdversarialConfig
from .trainer import AdversarialTrainer, resolve_batch_mode

__all__ = [
    'AdversarialConfig', 'AdversarialTrainer', 'BATCH_MODES', 'METHODS', 'TRAIN_ATTACKS', 'batch_statistics_layers',
    'has_split_batchnorm', 'resolve_batch_mode',
]
