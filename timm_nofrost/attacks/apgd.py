"""Auto-PGD (Croce & Hein, ICML 2020): step-size-free PGD with momentum and checkpointed step halving.

Written from the paper's algorithm. Per example: step size eta starts at 2 * eps; the iterate moves with
momentum 0.75, ``x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))`` with ``z = P(x_k + eta * step)``.
At checkpoints ``w_j = ceil(p_j N)`` (``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``)
eta is halved, and the iterate restarts from the best point, when fewer than 75 % of the steps since the
last checkpoint increased the loss, or when neither eta nor the best loss changed since then.
``APGD(loss='ce')`` is APGD-CE, ``loss='dlr'`` APGD-DLR, and ``APGDTargeted`` APGD-T (targeted DLR on the
``n_target_classes`` highest-ranked wrong classes: ranked by logit as in AutoAttack, or by the linearised distance
to the decision boundary as in MALT, Melamed, Yehudai & Shamir 2024).
"""
import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .base import Attack, BestIterate, check_positive_int, project, random_delta, steepest_step
from .losses import targeted_dlr

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
            eps: Optional[Union[float, str]] = None,
            steps: int = 100,
            norm: Optional[str] = None,
            loss: str = 'ce',
            restarts: int = 1,
            rho: float = 0.75,
            momentum: float = 0.75,
            **kwargs,
    ):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        self._iterative(steps, restarts, loss)
        self.rho = rho
        self.momentum = momentum

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
                active: torch.Tensor) -> Tuple[torch.Tensor, float, torch.Tensor]:
        eps = self.eps_tensor(x)
        best = BestIterate(x)
        counts = [0, 0]
        starts = ((random_delta(x, eps, self.norm, generator), run_target)
                  for generator, run_target in self._runs(x, y, target, active))
        for (start, run_target), idx in self.restart_rows(active, best, starts):
            self._run(x, y, run_target, eps, start, idx, best, counts)
        return best.x, counts[0] / max(counts[1], 1), best.logits

    def _runs(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
              active: torch.Tensor) -> List[Tuple[torch.Generator, Optional[torch.Tensor]]]:
        """``(generator of the random start, target)`` per run: ``restarts`` runs continuing one seeded stream."""
        return [(self.generator(x.device), target)] * self.restarts

    def _run(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], eps: torch.Tensor,
             start: torch.Tensor, idx: torch.Tensor, best: BestIterate, counts: List[int]) -> None:
        """One APGD run on the batch rows ``idx`` from ``x + start``; every iterate is scored into ``best``.

        With the active set, a row leaves the run at its first fooling iterate. Everything else is kept per
        row (step size, momentum, best point and its gradient, checkpoint counters), so the rows still
        running follow exactly the trajectory they follow in a full run.
        """
        view = (-1, 1, 1, 1)
        checkpoints = set(apgd_checkpoints(self.steps))
        x, y, eps = x[idx], y[idx], eps[idx]
        target = None if target is None else target[idx]
        eta = 2 * eps

        x_cur = x + start[idx]
        loss, grad, fooled = self._score(x_cur, y, target, idx, best, counts)
        # state tensors are replaced, never changed in place (n_increase aside), so they may start as one
        x_prev, loss_prev = x_cur, loss
        x_best, grad_best, best_loss = x_cur, grad, loss  # highest loss so far: restart point after a halving
        n_increase = torch.zeros(x.shape[0], device=x.device)
        eta_at_check, best_at_check, last_check = eta, best_loss, 0
        for k in range(self.steps):
            if self.active_set and bool(fooled.any()):
                keep = (~fooled).nonzero()[:, 0]
                if keep.numel() == 0:
                    return
                (x, y, eps, eta, x_cur, x_prev, grad, loss_prev, best_loss, x_best, grad_best, n_increase,
                 eta_at_check, best_at_check, idx) = (
                    t[keep] for t in (x, y, eps, eta, x_cur, x_prev, grad, loss_prev, best_loss, x_best, grad_best,
                                      n_increase, eta_at_check, best_at_check, idx))
                target = None if target is None else target[keep]
            x_prev, x_cur = x_cur, self._step(x, x_cur, x_prev, grad, eta, eps, 1.0 if k == 0 else self.momentum)
            loss, grad, fooled = self._score(x_cur, y, target, idx, best, counts)

            n_increase += (loss > loss_prev).float()
            loss_prev = loss
            improved = loss > best_loss
            x_best = torch.where(improved.view(view), x_cur, x_best)
            grad_best = torch.where(improved.view(view), grad, grad_best)
            best_loss = torch.where(improved, loss, best_loss)

            if k + 1 in checkpoints:
                # halve where fewer than rho of the steps since the last checkpoint raised the loss, or where
                # neither the step size nor the best loss changed since then
                halve = (n_increase < self.rho * (k + 1 - last_check)) | (
                    (eta_at_check == eta) & (best_at_check == best_loss))
                eta_at_check, best_at_check = eta, best_loss
                eta = torch.where(halve, eta / 2, eta)
                # halved rows go on from their best point, with that point's gradient (kept, not recomputed)
                x_cur = torch.where(halve.view(view), x_best, x_cur)
                grad = torch.where(halve.view(view), grad_best, grad)
                n_increase.zero_()
                last_check = k + 1

    def _score(self, x_adv: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], idx: torch.Tensor,
               best: BestIterate, counts: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss and input gradient at ``x_adv`` (batch rows ``idx``), scored into ``best``, zero gradients counted;
        returns ``(loss, grad, fooled)``."""
        loss, grad, logits = self.input_grad(x_adv, y, target, self.loss_fn)
        counts[0] += int((grad == 0).sum())
        counts[1] += grad.numel()
        return loss, grad, best.update(idx, x_adv, loss, logits, self.is_fooled(logits, y, target))

    @torch.no_grad()
    def _step(self, x: torch.Tensor, x_cur: torch.Tensor, x_prev: torch.Tensor, grad: torch.Tensor,
              eta: torch.Tensor, eps: torch.Tensor, a: float) -> torch.Tensor:
        """The next iterate: a steepest-ascent step of size ``eta`` projected onto the ball, mixed with the last
        move by momentum (``a`` = 1: no momentum), projected again."""
        z = x + project(x_cur + eta.view(-1, 1, 1, 1) * steepest_step(grad, self.norm) - x, x, eps, self.norm)
        x_next = x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev)
        return x + project(x_next - x, x, eps, self.norm)


class APGDTargeted(APGD):
    """APGD-T: APGD on the targeted DLR loss, once per target among the top wrong classes.

    ``ranking='logit'`` (AutoAttack's) takes the wrong classes with the highest logits; ``ranking='linear'``
    (MALT, Melamed, Yehudai & Shamir 2024) the ones whose decision boundary is closest to the clean image in the
    model's linearisation there (``linear_scores``). As in MALT, only the ``n_candidates`` wrong classes with the
    highest logits are ranked (100: every class up to CIFAR-100, a tenth of ImageNet's), since each costs one
    forward-backward of the image; the classes after them follow in logit order.
    """
    name = 'apgd-t'
    RANKINGS = ('logit', 'linear')

    def __init__(self, model: nn.Module, eps: Optional[Union[float, str]] = None, steps: int = 100,
                 n_target_classes: int = 9, ranking: str = 'logit', n_candidates: int = 100, **kwargs):
        kwargs.pop('loss', None)
        super().__init__(model, eps=eps, steps=steps, loss='dlr', **kwargs)
        if ranking not in self.RANKINGS:
            raise ValueError(f'Unknown target ranking {ranking!r}; accepted: {", ".join(self.RANKINGS)}.')
        self.n_target_classes = check_positive_int('n_target_classes', n_target_classes)
        self.ranking = ranking
        self.n_candidates = check_positive_int('n_candidates', n_candidates)
        self.loss_fn = targeted_dlr

    def is_fooled(self, logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        """Success is a misclassification, whatever class it lands in (as in the official APGD-T)."""
        return logits.argmax(dim=1) != y

    def _runs(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
              active: torch.Tensor) -> List[Tuple[torch.Generator, Optional[torch.Tensor]]]:
        """One run per target among each row's top wrong classes, each with its own seed."""
        rows = active.nonzero()[:, 0]
        with torch.no_grad():
            top = self.logits(x[rows]).sort(dim=1, descending=True).indices
        n_classes = top.shape[1]
        ranked = torch.arange(n_classes, device=x.device).repeat(x.shape[0], 1)  # rows not attacked: any order
        ranked[rows] = top
        # the wrong classes of each row in rank order (the true class removed wherever it ranks)
        others = ranked[ranked != y[:, None]].view(x.shape[0], n_classes - 1) if n_classes > 1 else None
        if self.ranking == 'linear' and others is not None:
            candidates = others[rows, :self.n_candidates]
            # closest boundary first; equal scores keep their logit order (stable sort)
            order = self.linear_scores(x[rows], y[rows], candidates, chunk=x.shape[0]).argsort(dim=1, stable=True)
            others[rows, :candidates.shape[1]] = candidates.gather(1, order)
        return [(self.generator(x.device, i), others[:, i]) for i in range(min(self.n_target_classes, n_classes - 1))]

    def linear_scores(self, x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor,
                      chunk: Optional[int] = None) -> torch.Tensor:
        """(N, M): for each row of ``x`` and each of its ``classes`` (N, M) c, the distance from ``x`` to the
        boundary between ``y`` and c in the model's linearisation at ``x``, ``(z_y - z_c) / ||grad (z_y - z_c)||_q``
        (q the dual norm of the threat model's: L1 for L-inf, L2 for L2); +inf where the gradient is 0.

        One batched pass: each image is repeated once per class and the enlarged batch goes through one forward
        and one backward of ``sum (z_y - z_c)``, whose gradient w.r.t. each copy is that copy's vector-Jacobian
        product (replication works for any model, where vmap or batched gradients can fail on some ops). The
        copies go in chunks of ``chunk`` images (default: the rows of ``x``), so memory stays that of one attack
        step. Parameters get no gradients in ``attack_mode``, where ``perturb`` calls this.
        """
        n, m = classes.shape
        row = torch.arange(n, device=x.device).repeat_interleave(m)
        cls = classes.flatten()
        dual = 1 if self.norm == 'Linf' else 2
        # fp16 gradients underflow to exactly 0: scale the difference (as input_grad), the ratio is unchanged
        scale = 1024.0 if self.amp_dtype == torch.float16 else 1.0
        scores = []
        for part in torch.arange(n * m, device=x.device).split(chunk or n):
            copies = x[row[part]].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = self.logits(copies)
                gap = logits.gather(1, y[row[part], None])[:, 0] - logits.gather(1, cls[part, None])[:, 0]
                grad, = torch.autograd.grad(gap.sum() * scale, copies)
            norm = grad.flatten(1).norm(p=dual, dim=1) / scale
            scores.append(torch.where(norm > 0, gap.detach() / norm, float('inf')))
        return torch.cat(scores).view(n, m)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None,
                 eps: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        if target is not None:
            raise ValueError('APGDTargeted chooses its own targets (top wrong classes); do not pass target.')
        return super().__call__(x, y, eps=eps, mask=mask)
