"""Which layers the converter touches, and what replaces them."""
import contextlib
import re
from collections import Counter
from typing import Dict, Iterator, Optional, Set, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import Conv2dSame
from timm.models.nfnet import _nonlin_gamma

from ..layers import WS_CONV_TYPES, FusableScaledStdConv2d, FusableScaledStdConv2dSame

__all__ = ['norm_classes', 'is_container', 'is_attention', 'norm_replacement', 'to_scaled_std_conv', 'normed_convs',
           'convertible_conv', 'is_std_conv', 'detect_activation', 'activation_gamma', 'NORM_KINDS', 'STD_CONV_EPS']

STD_CONV_EPS = 1e-5  # as timm's NF-ResNets
NORM_KINDS = ('batch', 'group', 'layer')


def _optional(module: str, name: str) -> Tuple[Type[nn.Module], ...]:
    try:
        return (getattr(__import__(module, fromlist=[name]), name),)
    except (ImportError, AttributeError):
        return ()


def norm_classes(kinds: Tuple[str, ...]) -> Tuple[Type[nn.Module], ...]:
    """Module classes removed for the requested normalization kinds."""
    classes: Tuple[Type[nn.Module], ...] = ()
    if 'batch' in kinds:
        # _BatchNorm covers BatchNorm1d/2d/3d, SyncBatchNorm and timm's BatchNormAct2d / SyncBatchNormAct
        classes += (nn.modules.batchnorm._BatchNorm,)
        classes += _optional('timm.layers', 'FrozenBatchNorm2d') + _optional('timm.layers', 'FrozenBatchNormAct2d')
        classes += _optional('torchvision.ops', 'FrozenBatchNorm2d')
    if 'group' in kinds:
        classes += (nn.GroupNorm,)  # includes timm's GroupNormAct and GroupNorm1
    if 'layer' in kinds:
        classes += (nn.LayerNorm,)  # includes timm's LayerNorm2d and LayerNormAct*
    return classes


# normalizers that are never removed by the converter; reported as left unchanged
OTHER_NORMS = (nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm, nn.GroupNorm, nn.LayerNorm,
               nn.modules.batchnorm._BatchNorm) + _optional('timm.layers', 'FrozenBatchNorm2d') \
    + _optional('torchvision.ops', 'FrozenBatchNorm2d')

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_container(module: nn.Module) -> bool:
    """Plain containers: walked through, never treated as residual blocks."""
    return type(module) in _CONTAINERS


_ATTENTION_NAME = re.compile(r'(?i)(squeeze|excit|attention|attn|^se(module|layer)?$|eca|cbam|gather)')


def is_attention(module: nn.Module) -> bool:
    """Channel / spatial attention (SE, ECA, CBAM, ...): gating modules whose convs stay plain."""
    return bool(_ATTENTION_NAME.search(type(module).__name__))


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the duration; every submodule's own train flag restored afterwards."""
    training = [m.training for m in module.modules()]
    try:
        yield module.eval()
    finally:
        for m, flag in zip(module.modules(), training):
            m.training = flag


def norm_replacement(norm: nn.Module) -> nn.Module:
    """``nn.Identity`` for a plain normalizer; the activation (and dropout) of timm's norm+act layers."""
    act = getattr(norm, 'act', None)
    drop = getattr(norm, 'drop', None)
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
            return nn.Sequential(drop, act)
        return act
    return nn.Identity()


def to_scaled_std_conv(conv: nn.Conv2d, gamma: float) -> nn.Conv2d:
    """The scaled weight-standardised counterpart of ``conv``, with its weights (and bias) copied.

    A bias is always present: it takes over the shift the removed normalizer provided.
    """
    dynamic_same = isinstance(conv, Conv2dSame)
    cls = FusableScaledStdConv2dSame if dynamic_same else FusableScaledStdConv2d
    kwargs = dict(padding='SAME') if dynamic_same else dict(padding=conv.padding)
    new = cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, dilation=conv.dilation,
        groups=conv.groups, bias=True, gamma=gamma, eps=STD_CONV_EPS,
        device=conv.weight.device, dtype=conv.weight.dtype, **kwargs)
    new.weight.data.copy_(conv.weight.data)
    new.bias.data.copy_(conv.bias.data if conv.bias is not None else torch.zeros_like(new.bias))
    new.weight.requires_grad_(conv.weight.requires_grad)
    new.train(conv.training)
    return new


def convertible_conv(module: nn.Module) -> bool:
    return type(module) in (nn.Conv2d, Conv2dSame)


def is_std_conv(module: nn.Module) -> bool:
    return isinstance(module, WS_CONV_TYPES)


def normed_convs(model: nn.Module, norms: Tuple[Type[nn.Module], ...]) -> Set[nn.Module]:
    """The modules whose next module in registration order (``nn.Identity`` skipped) is one of ``norms``: outside
    residual blocks, only a conv that loses the normalizer after it is standardised (not a ViT patch embedding)."""
    order = [m for m in model.modules()
             if isinstance(m, norms) or (next(m.children(), None) is None and not isinstance(m, nn.Identity))]
    return {m for m, after in zip(order, order[1:]) if isinstance(after, norms)}


# activation module class names (lower case) -> timm's name; Identity is no activation
_ACT_NAMES: Dict[str, str] = {
    **{n: n for n in ('relu', 'relu6', 'silu', 'gelu', 'elu', 'celu', 'selu', 'sigmoid', 'tanh', 'softplus')},
    'swish': 'silu', 'leakyrelu': 'leaky_relu'}


def detect_activation(model: nn.Module) -> Optional[str]:
    """The most common activation module of ``model``, by timm's name for it; ``None`` if none is found."""
    counts = Counter(_ACT_NAMES.get(type(module).__name__.lower()) for module in model.modules())
    counts.pop(None, None)
    return max(counts, key=counts.get) if counts else None


def activation_gamma(act: str) -> float:
    if act not in _nonlin_gamma:
        raise ValueError(f'Unknown activation {act!r} for the NF gain; accepted: {", ".join(sorted(_nonlin_gamma))}.')
    return float(_nonlin_gamma[act])
