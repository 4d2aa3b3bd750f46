"""The NoFrost paper's analysis tools: decision margin and local smoothness, per example.

Decision margin: the smallest L-inf (or L2) radius at which an attack flips the prediction, found by
bisection: each example keeps an interval [lo, hi] (lo robust, hi fooled, hi starting at ``eps_max``), and
each of ``iters`` rounds attacks every example with PGD at the midpoint of its own interval and halves it.
The result is an upper bound on the true margin (a stronger attack can only lower it); examples still robust
at ``eps_max`` are reported at ``eps_max`` and counted.

Local smoothness, within the eps-ball: the loss increase an attack achieves, ``L(x + delta) - L(x)``, and the
dual norm of the input gradient at ``x`` (L1 for L-inf, L2 for L2). Smoother models show smaller values.
"""
from typing import Any, Dict

import torch
import torch.nn.functional as F

from ..attacks import PGD
from ..attacks.base import attack_mode
from ..pixels import PixelModel

__all__ = ['decision_margin', 'local_smoothness', 'margin_and_smoothness']


def decision_margin(model: PixelModel, x: torch.Tensor, y: torch.Tensor, eps_max: float, norm: str = 'Linf',
                    iters: int = 8, steps: int = 10, seed: int = 0) -> torch.Tensor:
    """Per-example smallest radius (upper bound) at which PGD-``steps`` flips the prediction."""
    lo = torch.zeros(x.shape[0], device=x.device)
    hi = torch.full((x.shape[0],), float(eps_max), device=x.device)
    attack = PGD(model, eps=eps_max, steps=steps, norm=norm, seed=seed)
    fooled_at_max = ~attack(x, y).correct
    for _ in range(iters):
        mid = (lo + hi) / 2
        fooled = ~attack(x, y, eps=mid).correct
        hi = torch.where(fooled, mid, hi)
        lo = torch.where(fooled, lo, mid)
    return torch.where(fooled_at_max, hi, torch.full_like(hi, float(eps_max)))


def local_smoothness(model: PixelModel, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = 'Linf',
                     steps: int = 10, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Loss increase within the eps-ball (PGD) and the dual norm of the input gradient at ``x``."""
    model = PixelModel.from_model(model)  # the gradient at x is taken in pixel space, like the attack's
    with attack_mode(model):
        x0 = x.detach().requires_grad_(True)
        loss0 = F.cross_entropy(model(x0), y, reduction='none')
        grad, = torch.autograd.grad(loss0.sum(), x0)
    loss_adv = F.cross_entropy(PGD(model, eps=eps, steps=steps, norm=norm, seed=seed)(x, y).logits, y, reduction='none')
    dual = grad.flatten(1).abs().sum(1) if norm == 'Linf' else grad.flatten(1).norm(p=2, dim=1)
    return {'loss_increase': loss_adv - loss0.detach(), 'grad_dual_norm': dual}


def margin_and_smoothness(model: PixelModel, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = 'Linf',
                          seed: int = 0) -> Dict[str, Any]:
    """Summary statistics for reports: margins searched up to ``4 * eps``, smoothness within ``eps``."""
    margins = decision_margin(model, x, y, 4 * eps, norm, seed=seed)
    smooth = local_smoothness(model, x, y, eps, norm, seed=seed)
    return {
        'n_examples': int(x.shape[0]),
        'decision_margin_mean': margins.mean().item(),
        'decision_margin_median': margins.median().item(),
        'decision_margin_search_max': 4 * eps,
        'robust_beyond_search_max': int((margins >= 4 * eps).sum()),
        'loss_increase_mean': smooth['loss_increase'].mean().item(),
        'input_grad_dual_norm_mean': smooth['grad_dual_norm'].mean().item(),
    }
