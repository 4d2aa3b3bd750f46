"""Residual scalings of converted blocks, applied by hooks so that the block keeps its class and its forward.

A normalizer-free residual block computes ``alpha * branch(beta * x) + shortcut``. The converter puts the two
constants on the user's own block as attributes (``nf_beta``, ``nf_alpha``) and applies them with a forward
pre-hook on the branch's first operation(s) (``ScaleInput``: multiplies that module's input by ``block.nf_beta``)
and a forward hook on its last (``ScaleOutput``: multiplies its output by ``block.nf_alpha``). The hooks read the
block's attributes at every call, so what the block shows is what it computes. Parameter names, the block's
class, attributes and methods are untouched.
"""
from typing import Any, List, Tuple

import torch
import torch.nn as nn

__all__ = ['ScaleInput', 'ScaleOutput', 'residual_scale_hooks', 'transfer_hooks', 'fold_residual_scale_hooks']


class _Scale:
    """Reads the scale from ``getattr(block, attr)``: one source of truth, visible on the block."""

    def __init__(self, block: nn.Module, attr: str):
        self.block = block
        self.attr = attr

    @property
    def scale(self) -> float:
        return float(getattr(self.block, self.attr))

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.attr}={self.scale:.4g})'


class ScaleInput(_Scale):
    """Forward pre-hook: the module sees ``scale * input`` (the block's beta on the branch input)."""

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        return (args[0] * self.scale, *args[1:])


class ScaleOutput(_Scale):
    """Forward hook: the module returns ``scale * output`` (the block's alpha on the branch output)."""

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output * self.scale


def residual_scale_hooks(module: nn.Module) -> List[Tuple[int, _Scale]]:
    """``(handle id, hook)`` of the residual-scale hooks registered on ``module``."""
    hooks = list(module._forward_pre_hooks.items()) + list(module._forward_hooks.items())
    return [(k, h) for k, h in hooks if isinstance(h, _Scale)]


_HOOK_DICTS = ('_forward_pre_hooks', '_forward_pre_hooks_with_kwargs', '_forward_hooks',
               '_forward_hooks_with_kwargs', '_forward_hooks_always_called')


def transfer_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` (a module replacing ``old``, e.g. a fused conv) the forward hooks of ``old``."""
    for name in _HOOK_DICTS:
        source, target = getattr(old, name, None), getattr(new, name, None)
        if source and target is not None:
            target.update(source)
    return new


def fold_residual_scale_hooks(conv: nn.Module) -> bool:
    """Fold the residual-scale hooks of a plain ``nn.Conv2d`` into its weights (exact: a conv is linear in its
    input, zero padding included) and remove them. Returns whether anything was folded."""
    if type(conv) is not nn.Conv2d:
        return False
    folded = False
    with torch.no_grad():
        for hooks, kind in ((conv._forward_pre_hooks, ScaleInput), (conv._forward_hooks, ScaleOutput)):
            for key, hook in list(hooks.items()):
                if isinstance(hook, kind):
                    conv.weight.mul_(hook.scale)  # conv(s * x) = (s * W) x + b; s * (W x + b)
                    if kind is ScaleOutput and conv.bias is not None:
                        conv.bias.mul_(hook.scale)
                    del hooks[key]
                    folded = True
    return folded
