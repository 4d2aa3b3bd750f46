"""Auto-PGD (Croce & Hein, ICML 2020): step-size-free PGD with momentum and checkpointed step halving.

Written from the paper's algorithm. Per example: step size eta starts at 2 * eps; the iterate moves with
momentum 0.75, ``x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))`` with ``z = P(x_k + eta * step)``.
At checkpoints ``w_j = ceil(p_j N)`` (``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``)
eta is halved, and the iterate restarts from the best point, when fewer than 75 % of the steps since the
last checkpoint increased the loss, or when neither eta nor the best loss changed since then.
``APGD(loss='ce')`` is APGD-CE, ``loss='dlr'`` APGD-DLR, and ``APGDTargeted`` APGD-T (targeted DLR on the
``n_target_classes`` highest-ranked wrong classes).
"""
import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .base import Attack, check_positive_int, project, random_delta, steepest_step
from .losses import get_loss, targeted_dlr

__all__ = ['APGD', 'APGDTargeted', 'apgd_checkpoints']


def apgd_checkpoints(n_iter: int) -> List[int]:
    """Iterations at which APGD checks whether to halve the step size."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(v * n_iter) for v in p[1:] if v <= 1})


class APGD(Attack):
    """APGD-CE (``loss='ce'``) or APGD-DLR (``loss='dlr'``), L-inf or L2, with restarts."""
    name = 'apgd'

    def __init__(
            self,
            model: nn.Module,
            eps: Union[float, str] = 8 / 255,
            steps: int = 100,
            norm: str = 'Linf',
            loss: str = 'ce',
            restarts: int = 1,
            rho: float = 0.75,
            momentum: float = 0.75,
            **kwargs,
    ):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        check_positive_int('steps', steps)
        check_positive_int('restarts', restarts)
        self.steps = steps
        self.restarts = restarts
        self.rho = rho
        self.momentum = momentum
        self.loss_name = loss
        self.loss_fn = get_loss(loss)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> Tuple[torch.Tensor, float]:
        generator = self.generator(x.device)
        best = x.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        zeros = total = 0
        for _ in range(self.restarts):
            todo = ~fooled
            if not todo.any():
                break
            idx = todo.nonzero()[:, 0]
            x_adv, ok, z, t = self._run(x[idx], y[idx], None if target is None else target[idx], generator)
            zeros, total = zeros + z, total + t
            best[idx] = x_adv
            fooled[idx] = ~ok
        return best, zeros / max(total, 1)

    def _run(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
             generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
        n = x.shape[0]
        eps = self.eps_tensor(x)
        view = (-1, 1, 1, 1)
        checkpoints = set(apgd_checkpoints(self.steps))
        eta = 2 * eps.clone()

        x_cur = x + random_delta(x, eps, self.norm, generator)
        loss, grad, logits = self.input_grad(x_cur, y, target, self.loss_fn)
        zeros, total = int((grad == 0).sum()), grad.numel()
        best_loss = loss.clone()
        x_best = x_cur.clone()  # highest loss so far: restart point after a step-size halving
        x_adv = x_cur.clone()  # returned: a fooling point as soon as one is found, else the highest loss
        fooled = self._fooled(logits, y, target)
        x_adv[fooled] = x_cur[fooled]

        x_prev = x_cur.clone()
        loss_prev = loss.clone()
        n_increase = torch.zeros(n, device=x.device)
        eta_at_check = eta.clone()
        best_at_check = best_loss.clone()
        last_check = 0
        for k in range(self.steps):
            with torch.no_grad():
                z = x + project(x_cur + eta.view(view) * steepest_step(grad, self.norm) - x, x, eps, self.norm)
                a = 1.0 if k == 0 else self.momentum
                x_next = x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev)
                x_next = x + project(x_next - x, x, eps, self.norm)
            x_prev = x_cur
            x_cur = x_next
            loss, grad, logits = self.input_grad(x_cur, y, target, self.loss_fn)
            zeros, total = zeros + int((grad == 0).sum()), total + grad.numel()

            now_fooled = self._fooled(logits, y, target)
            newly = now_fooled & ~fooled
            x_adv[newly] = x_cur[newly]
            fooled |= now_fooled
            n_increase += (loss > loss_prev).float()
            loss_prev = loss
            improved = loss > best_loss
            x_best[improved] = x_cur[improved]
            best_loss = torch.where(improved, loss, best_loss)
            not_fooled = ~fooled
            x_adv[not_fooled & improved] = x_cur[not_fooled & improved]

            if k + 1 in checkpoints:
                window = k + 1 - last_check
                cond1 = n_increase < self.rho * window
                cond2 = (eta_at_check == eta) & (best_at_check == best_loss)
                halve = cond1 | cond2
                eta_at_check = eta.clone()
                best_at_check = best_loss.clone()
                eta = torch.where(halve, eta / 2, eta)
                if halve.any():
                    # restart halved examples from their best point, with that point's gradient
                    x_cur = torch.where(halve.view(view), x_best, x_cur)
                    x_prev = x_cur.clone()
                    _, grad_best, _ = self.input_grad(x_cur, y, target, self.loss_fn)
                    grad = torch.where(halve.view(view), grad_best, grad)
                n_increase.zero_()
                last_check = k + 1
        return x_adv, ~fooled, zeros, total

    @staticmethod
    def _fooled(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        pred = logits.argmax(dim=1)
        return pred == target if target is not None else pred != y


class APGDTargeted(APGD):
    """APGD-T: APGD on the targeted DLR loss, once per target among the top wrong classes."""
    name = 'apgd-t'

    def __init__(self, model: nn.Module, eps: Union[float, str] = 8 / 255, steps: int = 100,
                 n_target_classes: int = 9, **kwargs):
        kwargs.pop('loss', None)
        super().__init__(model, eps=eps, steps=steps, loss='dlr', **kwargs)
        self.n_target_classes = n_target_classes
        self.loss_fn = lambda logits, y, target: targeted_dlr(logits, y, target)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> Tuple[torch.Tensor, float]:
        with torch.no_grad():
            ranked = self.logits(x).sort(dim=1, descending=True).indices
        n_classes = ranked.shape[1]
        best = x.clone()
        robust = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        zeros = total = 0
        for i in range(min(self.n_target_classes, n_classes - 1)):
            idx = robust.nonzero()[:, 0]
            if idx.numel() == 0:
                break
            # the (i+2)-th ranked class, skipping the true class when it is not ranked first
            candidates = ranked[idx]
            others = candidates[candidates != y[idx, None]].view(idx.numel(), n_classes - 1)
            tgt = others[:, i]
            generator = torch.Generator(device=x.device).manual_seed(self.seed + i)
            x_adv, _, z, t = self._run(x[idx], y[idx], tgt, generator)
            zeros, total = zeros + z, total + t
            with torch.no_grad():
                pred = self.logits(x_adv).argmax(dim=1)
            fooled = pred != y[idx]
            best[idx[fooled]] = x_adv[fooled]
            robust[idx[fooled]] = False
        return best, zeros / max(total, 1)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None):
        if target is not None:
            raise ValueError('APGDTargeted chooses its own targets (top wrong classes); do not pass target.')
        return super().__call__(x, y)
