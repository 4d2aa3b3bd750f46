"""Find layers whose training-mode output for one example depends on the rest of the batch.

Only a model without such layers computes exactly the same loss on ``cat([clean, adv])`` as on the two
halves separately, which is what makes NoFrost's single concatenated forward valid.
"""
from typing import List

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['batch_statistics_layers', 'has_split_batchnorm']

# timm layers that normalise with batch statistics without subclassing torch's _BatchNorm
_BATCH_STAT_NAMES = ('EvoNorm2dB0', 'EvoNorm2dB1', 'EvoNorm2dB2', 'SplitBatchNorm2d')


def batch_statistics_layers(model: nn.Module) -> List[str]:
    """Qualified names of the layers that mix statistics across the batch (BatchNorm and relatives)."""
    found = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if isinstance(module, _BatchNorm) or cls in _BATCH_STAT_NAMES or 'BatchNorm' in cls:
            found.append(name or cls)
    return found


def has_split_batchnorm(model: nn.Module) -> bool:
    """True when the model uses timm's ``SplitBatchNorm2d`` (``timm.models.convert_splitbn_model``)."""
    from timm.layers import SplitBatchNorm2d
    return any(isinstance(m, SplitBatchNorm2d) for m in model.modules())
