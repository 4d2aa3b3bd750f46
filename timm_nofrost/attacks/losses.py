"""Per-example attack losses on logits (larger is better for the attacker)."""
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ['LOSSES', 'get_loss', 'cross_entropy', 'margin', 'dlr', 'targeted_dlr']


def _top_other(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Largest logit among the classes other than ``y``."""
    return logits.scatter(1, y[:, None], float('-inf')).max(dim=1).values


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CE of the true class (untargeted), or minus the CE of the target class (targeted)."""
    if target is not None:
        return -F.cross_entropy(logits, target, reduction='none')
    return F.cross_entropy(logits, y, reduction='none')


def margin(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Carlini-Wagner margin: best other logit minus the true logit (target logit minus the rest if targeted)."""
    if target is not None:
        return logits.gather(1, target[:, None])[:, 0] - _top_other(logits, target)
    return _top_other(logits, y) - logits.gather(1, y[:, None])[:, 0]


def dlr(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein, 2020): the margin, divided by z_pi1 - z_pi3 (scale invariant)."""
    if target is not None:
        return targeted_dlr(logits, y, target)
    if logits.shape[1] < 3:
        raise ValueError(f'DLR needs at least 3 classes, the model has {logits.shape[1]}.')
    sorted_logits = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, y[:, None])[:, 0]
    return -(true - _top_other(logits, y)) / (sorted_logits[:, 0] - sorted_logits[:, 2] + 1e-12)


def targeted_dlr(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    if logits.shape[1] < 4:
        raise ValueError(f'targeted DLR needs at least 4 classes, the model has {logits.shape[1]}.')
    sorted_logits = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, y[:, None])[:, 0]
    tgt = logits.gather(1, target[:, None])[:, 0]
    return -(true - tgt) / (sorted_logits[:, 0] - 0.5 * (sorted_logits[:, 2] + sorted_logits[:, 3]) + 1e-12)


LossFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
LOSSES: Dict[str, LossFn] = {'ce': cross_entropy, 'margin': margin, 'dlr': dlr}


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f'Unknown attack loss {name!r}; accepted: {", ".join(LOSSES)}.')
    return LOSSES[name]
