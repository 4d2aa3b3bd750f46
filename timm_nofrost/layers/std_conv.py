"""Weight-standardised convolutions that can be fused into plain convolutions for deployment.

Scaled weight standardisation recomputes the standardised kernel at every forward pass. The kernel only
changes when the weights do, so for inference (and for adversarial attacks, which do not update weights)
it can be computed once and stored in a plain ``nn.Conv2d``. ``FusableScaledStdConv2d`` and friends are
timm's layers with a ``fuse()`` method added, so ``timm.models.reparameterize_model`` fuses them too.
"""
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

from .residual_scale import fold_residual_scale_hooks, transfer_hooks

__all__ = ['WS_CONV_TYPES', 'is_preact_nf_block', 'FusableScaledStdConv2d', 'FusableScaledStdConv2dSame',
           'FusableStdConv2d', 'FusableStdConv2dSame', 'standardized_weight', 'fused_conv',
           'fuse_weight_standardization', 'make_fusable', 'FusedNormFreeBlock']

WS_CONV_TYPES = (ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame)
_BRANCH_CONVS = ('conv1', 'conv2', 'conv2b', 'conv3')  # the convs of an NF pre-activation block's branch, in order
_WsConv = Union[ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame]


def standardized_weight(conv: _WsConv) -> torch.Tensor:
    """The kernel a weight-standardised conv applies, computed exactly as its forward does."""
    scaled = isinstance(conv, (ScaledStdConv2d, ScaledStdConv2dSame))
    gain = (conv.gain * conv.scale).view(-1) if scaled else None
    return F.batch_norm(
        conv.weight.reshape(1, conv.out_channels, -1), None, None,
        weight=gain, training=True, momentum=0., eps=conv.eps,
    ).reshape_as(conv.weight)


def fused_conv(conv: _WsConv) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` (``Conv2dSame`` for dynamic SAME padding) holding the standardised kernel."""
    dynamic_same = bool(getattr(conv, 'same_pad', False))
    conv_cls = Conv2dSame if dynamic_same else nn.Conv2d
    fused = conv_cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
        padding=0 if dynamic_same else conv.padding, dilation=conv.dilation, groups=conv.groups,
        bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(standardized_weight(conv))
        if conv.bias is not None:
            fused.bias.copy_(conv.bias)
    fused.train(conv.training)
    return fused


class _FuseMixin:
    """Adds ``fuse()``, the hook timm's ``reparameterize_model`` looks for, to a weight-standardised conv."""

    @torch.jit.ignore
    def fuse(self) -> nn.Conv2d:
        return transfer_hooks(self, fused_conv(self))  # a converted block's residual-scale hooks go along


class FusableScaledStdConv2d(_FuseMixin, ScaledStdConv2d):
    """timm's ``ScaledStdConv2d`` with ``fuse()``."""


class FusableScaledStdConv2dSame(_FuseMixin, ScaledStdConv2dSame):
    """timm's ``ScaledStdConv2dSame`` with ``fuse()``."""


class FusableStdConv2d(_FuseMixin, StdConv2d):
    """timm's ``StdConv2d`` with ``fuse()``."""


class FusableStdConv2dSame(_FuseMixin, StdConv2dSame):
    """timm's ``StdConv2dSame`` with ``fuse()``."""


_FUSABLE = {
    ScaledStdConv2d: FusableScaledStdConv2d,
    ScaledStdConv2dSame: FusableScaledStdConv2dSame,
    StdConv2d: FusableStdConv2d,
    StdConv2dSame: FusableStdConv2dSame,
}


def make_fusable(module: nn.Module) -> nn.Module:
    """Give every timm weight-standardised conv in ``module`` a ``fuse()`` method, in place.

    The fusable classes subclass timm's and add no state, so switching an instance's class keeps its
    parameters, buffers and forward exactly as they were.
    """
    for m in module.modules():
        fusable = _FUSABLE.get(type(m))
        if fusable is not None:
            m.__class__ = fusable
    return module


def fuse_weight_standardization(model: nn.Module, inplace: bool = False,
                                fold_residual_scales: bool = True) -> nn.Module:
    """Replace every weight-standardised conv with a plain conv holding its precomputed kernel.

    The result computes the same function (up to float rounding) without standardising the weights at
    every forward pass: use it for inference and deployment, not for training (the kernels are frozen
    into plain weights and the gains are gone). With ``fold_residual_scales`` (eval only: drop-path must
    be inactive), the alpha / beta scalings of NF pre-activation blocks are folded into their convs too.

    Args:
        model: Model with timm ``StdConv2d`` / ``ScaledStdConv2d`` layers (``*Same`` variants included).
        inplace: Modify ``model`` itself; by default a deep copy is fused and returned.
        fold_residual_scales: Replace timm ``NormFreeBlock`` / NoFrost ``NormFreeBasicBlock`` instances
            without attention by ``FusedNormFreeBlock``, and fold the alpha / beta hooks of blocks converted by
            ``convert_to_normfree`` into the convs they sit on (hooks on other modules stay and keep working).
    """
    if not inplace:
        import copy
        model = copy.deepcopy(model)
    if isinstance(model, WS_CONV_TYPES):
        return transfer_hooks(model, fused_conv(model))
    for name, child in model.named_children():
        if isinstance(child, WS_CONV_TYPES):
            fused = transfer_hooks(child, fused_conv(child))  # a converted block's residual scalings go along
            setattr(model, name, fused)
            if fold_residual_scales:
                fold_residual_scale_hooks(fused)
            continue
        fuse_weight_standardization(child, inplace=True, fold_residual_scales=fold_residual_scales)
        if fold_residual_scales and _foldable(child):
            setattr(model, name, FusedNormFreeBlock(child))
    return model


def is_preact_nf_block(module: nn.Module) -> bool:
    """Whether ``module`` is a normalizer-free pre-activation block, found by what it has (as timm's
    ``reparameterize_model`` finds ``fuse()``): float ``alpha`` and ``beta``, ``act1``, ``conv1``, ``downsample``
    and ``attn_last`` attributes, computing ``alpha * branch(beta * act1(x)) + shortcut``. timm's
    ``NormFreeBlock`` and the NoFrost ``NormFreeBasicBlock`` are; post-activation ResNet blocks are not (no
    ``alpha`` / ``beta`` / ``attn_last``)."""
    scales = [getattr(module, name, None) for name in ('alpha', 'beta')]
    return (all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scales)
            and all(hasattr(module, name) for name in ('act1', 'conv1', 'downsample', 'attn_last')))


class FusedNormFreeBlock(nn.Module):
    """Inference form of a normalizer-free pre-activation block (timm ``NormFreeBlock``, ``NormFreeBasicBlock``).

    With plain (fused) convs, the constant residual scalings fold into them exactly: ``beta`` into the
    convs that read the pre-activated input (first branch conv and the shortcut projection), ``alpha``
    into the last branch conv (weight and bias). The forward then runs no elementwise scaling at all:
    ``out = branch(act(x)) + shortcut``. Inference only: drop-path (identity in eval) is dropped.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        convs = [n for n in _BRANCH_CONVS if getattr(block, n, None) is not None]
        acts = {'conv2': 'act2', 'conv2b': 'act2b', 'conv3': 'act3'}
        self.act1 = block.act1
        self.downsample = block.downsample
        self.branch = nn.Sequential()
        for i, name in enumerate(convs):
            if i > 0:
                self.branch.add_module(acts[name], getattr(block, acts[name]))
            self.branch.add_module(name, getattr(block, name))
        with torch.no_grad():
            first, last = self.branch[0], self.branch[-1]
            first.weight.mul_(block.beta)
            if self.downsample is not None:
                self.downsample.conv.weight.mul_(block.beta)
            last.weight.mul_(block.alpha)
            if last.bias is not None:
                last.bias.mul_(block.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x)
        shortcut = x if self.downsample is None else self.downsample(out)
        return self.branch(out) + shortcut


def _foldable(block: nn.Module) -> bool:
    """Plain-conv NF pre-activation block in eval mode without attention or skipinit, whose scalings can be folded."""
    if not is_preact_nf_block(block) or block.training:
        return False
    if any(getattr(block, n, None) is not None for n in ('attn', 'attn_last', 'skipinit_gain')):
        return False
    drop_path = getattr(block, 'drop_path', None)
    if drop_path is not None and not isinstance(drop_path, nn.Identity) and drop_path.training:
        return False  # stochastic depth is active: not an inference model
    convs = [getattr(block, n, None) for n in _BRANCH_CONVS]
    convs += [] if block.downsample is None else [block.downsample.conv]
    return all(c is None or type(c) is nn.Conv2d for c in convs)
