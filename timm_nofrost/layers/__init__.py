"""Layers used by the NoFrost models and the normalizer-free converter."""
from .std_conv import (WS_CONV_TYPES, FusableScaledStdConv2d, FusableScaledStdConv2dSame, FusableStdConv2d,
                       FusableStdConv2dSame, FusedNormFreeBlock, fuse_weight_standardization, fused_conv,
                       is_preact_nf_block, make_fusable, standardized_weight)
from .residual_scale import ScaleInput, ScaleOutput, fold_residual_scale_hooks, residual_scale_hooks, transfer_hooks
