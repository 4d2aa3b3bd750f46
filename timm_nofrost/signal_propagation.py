"""Signal propagation statistics of the residual stream (as in the NF-ResNet paper's SPP plots).

For each residual block output, averaged over channels: the squared channel mean and the channel
variance. A well-scaled normalizer-free network keeps both bounded through depth at initialisation; a
badly scaled one shows the variance growing (or vanishing) block after block.
"""
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ['BlockSignal', 'signal_propagation']


@dataclass
class BlockSignal:
    """Statistics of one block's output."""
    name: str
    depth: int
    mean_sq: float  # average over channels of the squared channel mean
    var: float  # average over channels of the channel variance

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


@torch.no_grad()
def signal_propagation(model: nn.Module, x: torch.Tensor, blocks: Optional[Sequence[str]] = None) -> List[BlockSignal]:
    """Run ``model`` on ``x`` (in eval mode) and return per-block residual-stream statistics.

    Args:
        model: A normalizer-free model (converted, or a NoFrost / timm NF model) or any model with ``blocks``.
        x: Input batch, e.g. ``torch.randn(8, 3, 224, 224)`` as in the NF-ResNet paper.
        blocks: Qualified module names to measure; by default every normalizer-free residual block.
    """
    from .convert import normfree_blocks
    named = dict(model.named_modules())
    if blocks is None:
        selected = normfree_blocks(model)
        if not selected:
            raise ValueError('No normalizer-free residual blocks found in the model; pass blocks=[module names].')
    else:
        missing = [b for b in blocks if b not in named]
        if missing:
            raise ValueError(f'Unknown block name(s) {missing}; use names from model.named_modules().')
        selected = [(b, named[b]) for b in blocks]

    stats: List[BlockSignal] = []
    hooks = []
    for depth, (name, module) in enumerate(selected):
        def hook(_module, _inputs, output, name=name, depth=depth):
            out = output.float()
            dims = [d for d in range(out.ndim) if d != 1]
            stats.append(BlockSignal(name=name, depth=depth,
                                     mean_sq=out.mean(dim=dims).pow(2).mean().item(),
                                     var=out.var(dim=dims).mean().item()))
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sorted(stats, key=lambda s: s.depth)
