"""Projected gradient descent (Madry et al., 2018) and FGSM with random start (Wong et al., 2020)."""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .base import (Attack, BestIterate, IterateHashes, deterministic_device, project, random_delta, rng_state,
                   steepest_step)
from .threat import ThreatModel

__all__ = ['PGD', 'FGSM', 'default_step_size', 'nofrost_step_size']


def default_step_size(eps: float, steps: int, norm: str = 'Linf') -> float:
    """``2.5 * eps / steps`` (Madry et al.): enough travel to reach any point of the ball from any start."""
    return 2.5 * eps / steps


def nofrost_step_size(eps: float, steps: int) -> float:
    """The NoFrost authors' training step: ``min(1.25 * eps, eps + 4/255) / steps`` (1/255 for PGD-10 at 8/255).

    It is tuned for training; for evaluation it is weak (from a random start it cannot reach the far corner
    of the ball), which is why ``PGD`` defaults to ``default_step_size``.
    """
    return min(1.25 * eps, eps + 4 / 255) / steps


class PGD(Attack):
    """L-inf / L2 PGD: random start, restarts, untargeted or targeted, CE / margin / DLR loss.

    Each example keeps its strongest iterate across steps and restarts: a misclassification if one was
    found (the target class, if targeted), else the highest loss. The step is a fraction of eps (``step_fraction``,
    or ``step_size`` / eps; default ``default_step_size``): it scales with per-example radii and scaled threat models.
    """
    name = 'pgd'

    def __init__(
            self,
            model: nn.Module,
            eps: Optional[Union[float, str]] = None,
            steps: int = 10,
            step_size: Optional[Union[float, str]] = None,
            norm: Optional[str] = None,
            random_start: bool = True,
            restarts: int = 1,
            loss: str = 'ce',
            step_fraction: Optional[float] = None,
            **kwargs,
    ):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        self._iterative(steps, restarts, loss)
        if step_size is not None and step_fraction is not None:
            raise ValueError(f'Give step_size ({step_size!r}) or step_fraction ({step_fraction!r}), not both.')
        if step_fraction is None:
            step = default_step_size(self.eps, steps) if step_size is None else \
                ThreatModel.parse_radius(step_size, 'step_size', positive=self.eps > 0)
            step_fraction = self.threat.fraction(step)
        self.step_fraction = float(step_fraction)
        if not self.step_fraction > 0 and self.eps > 0:
            raise ValueError(f'step_size must be > 0, got {step_size if step_size is not None else step_fraction!r}.')
        self.random_start = random_start

    step_size = property(lambda self: self.step_fraction * self.eps, doc="The step at the attack's own eps.")

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], active: torch.Tensor) -> Tuple:
        best = BestIterate(x)
        generator = self.generator(x.device)  # restarts continue one seeded stream
        eps = self.eps_tensor(x)
        zeros = torch.zeros((), device=x.device)
        computed = 0
        starts = (random_delta(x, eps, self.norm, generator) if self.random_start else torch.zeros_like(x)
                  for _ in range(self.restarts))
        for delta, idx in self.restart_rows(active, best, starts):
            _, restart_zeros, restart_computed = self._run(
                x[idx], y[idx], None if target is None else target[idx], eps[idx], delta[idx], best, idx)
            zeros += restart_zeros
            computed += restart_computed
        return best.x, zeros.item() / max(computed, 1), best.logits

    def generate(self, x: torch.Tensor, y: torch.Tensor, eps: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, delta: Optional[torch.Tensor] = None,
                 radius: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Training path: the last iterate of one PGD run, as adversarial training uses it (Madry et al.).

        Unlike ``__call__``: no validation, no host syncs, no best iterate, every example for every step (a
        training batch needs them all), and ``y`` may be soft targets (``(N, num_classes)`` probabilities: mixup,
        TRADES' p(x)) with the ``'ce'`` loss. The caller holds ``attack_mode(attack.model)``. Random starts come
        from ``generator``, or torch's global generator (seeded per process by training scripts) when None.

        Args:
            delta: The start ``x + delta``, used as given (TRADES' 0.001 Gaussian, N-FGSM's 2 eps noise); None:
                uniform in the eps ball with ``random_start``, else ``x``.
            radius: Per-example radius projected onto after each step (default ``eps``; N-FGSM: 3 eps, i.e. no
                projection back onto the eps ball). The step still scales with ``eps``.

        Returns:
            ``(x_adv, zero_count)``: the adversarial images, and the exactly-zero input-gradient entries (0-dim).
        """
        self._labels_checked = True
        x = x.detach()
        eps = self.eps_tensor(x) if eps is None else eps
        if delta is None:
            delta = random_delta(x, eps, self.norm, generator) if self.random_start else torch.zeros_like(x)
        delta, zeros, _ = self._run(x, y, None, eps, delta, None, None, radius=radius)
        return (x + delta).detach(), zeros

    def _run(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], eps: torch.Tensor,
             delta: torch.Tensor, best: Optional[BestIterate], idx: Optional[torch.Tensor],
             radius: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """The one PGD loop: ``steps`` steps of ``step_fraction`` times each row's ``eps`` from ``x + delta``, each
        projected onto the ball of ``radius`` (per row; default ``eps``) and [0, 1].

        Evaluation (``best`` given, ``idx`` the batch rows of ``x``): every iterate, and the last one, is scored
        into ``best``; with the active set, rows leave at their first fooling iterate. Training (``best`` None):
        all rows, all steps, no host syncs. Returns ``(final delta, zero input-gradient entries (0-dim tensor),
        input-gradient entries computed)``.
        """
        zeros = torch.zeros((), device=x.device)
        computed = 0
        # early stopping (evaluation only): a row whose iterate repeats an earlier one would repeat the whole cycle
        # after it, every point of which is already scored into ``best``, so it leaves with the full run's outcome
        seen = IterateHashes(delta, self.steps + 1) if best is not None and self.early_stop and \
            deterministic_device(x.device) else None
        for k in range(self.steps):
            before = rng_state(x.device) if seen is not None and k == 0 else None
            loss, grad, logits = self.input_grad(x + delta, y, target, self.loss_fn)
            if before is not None and not all(map(torch.equal, before, rng_state(x.device))):
                seen = None  # the model draws random numbers: an iterate's future is not determined by it
            zeros += (grad == 0).sum()
            computed += grad.numel()
            leave = None
            if best is not None:
                fooled = best.update(idx, x + delta, loss, logits, self.is_fooled(logits, y, target))
                leave = fooled if self.active_set else None  # with the active set, rows leave once fooled
            step = (eps * self.step_fraction).view(-1, 1, 1, 1)  # scales with each example's radius
            delta = project(delta + step * steepest_step(grad, self.norm), x, eps if radius is None else radius,
                            self.norm)
            if seen is not None:
                repeated = seen.add(delta)
                leave = repeated if leave is None else leave | repeated
            if leave is not None and bool(leave.any()):
                keep = (~leave).nonzero()[:, 0]
                if keep.numel() == 0:
                    return delta, zeros, computed
                x, y, eps, delta, idx = x[keep], y[keep], eps[keep], delta[keep], idx[keep]
                target = None if target is None else target[keep]
                radius = None if radius is None else radius[keep]
                if seen is not None:
                    seen.keep(keep)
        if best is not None:
            with torch.no_grad():
                logits = self.logits(x + delta)
                loss = self.loss_fn(logits, y, target)
            best.update(idx, x + delta, loss, logits, self.is_fooled(logits, y, target))
        return delta, zeros, computed


class FGSM(PGD):
    """Single-step attack; with ``random_start`` it is "FGSM-RS" (uniform start, step 1.25 eps)."""
    name = 'fgsm'

    def __init__(self, model: nn.Module, eps: Optional[Union[float, str]] = None, random_start: bool = False,
                 step_size: Optional[Union[float, str]] = None, **kwargs):
        kwargs.pop('steps', None)
        super().__init__(model, eps=eps, steps=1, random_start=random_start, step_size=step_size, **kwargs)
        if step_size is None and kwargs.get('step_fraction') is None:
            self.step_fraction = self.threat.fraction(1.25 * self.eps) if random_start else 1.0
