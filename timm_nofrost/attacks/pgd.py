"""Projected gradient descent (Madry et al., 2018) and FGSM with random start (Wong et al., 2020)."""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .base import Attack, check_positive_int, project, random_delta, steepest_step
from .losses import get_loss

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
    found (the target class, if targeted), else the highest loss.
    """
    name = 'pgd'

    def __init__(
            self,
            model: nn.Module,
            eps: Union[float, str] = 8 / 255,
            steps: int = 10,
            step_size: Optional[Union[float, str]] = None,
            norm: str = 'Linf',
            random_start: bool = True,
            restarts: int = 1,
            loss: str = 'ce',
            **kwargs,
    ):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        check_positive_int('steps', steps)
        check_positive_int('restarts', restarts)
        from .base import parse_eps
        self.step_size = parse_eps(step_size) if step_size is not None else default_step_size(self.eps, steps, norm)
        if self.step_size <= 0 and self.eps > 0:
            raise ValueError(f'step_size must be > 0, got {step_size!r}.')
        self.steps = steps
        self.random_start = random_start
        self.restarts = restarts
        self.loss_name = loss
        self.loss_fn = get_loss(loss)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> Tuple:
        best = _Best(x)
        generator = self.generator(x.device)  # restarts continue one seeded stream
        zeros = torch.zeros((), device=x.device)
        for _ in range(self.restarts):
            delta, restart_zeros = self._run(x, y, target, self.eps_tensor(x), generator, best)
            zeros += restart_zeros
            with torch.no_grad():
                logits = self.logits(x + delta)
                loss = self.loss_fn(logits, y, target)
            best.update(x + delta, loss, logits, y, target)
        total = x.numel() * self.steps * self.restarts
        return best.x, zeros.item() / max(total, 1), best.logits

    def generate(self, x: torch.Tensor, y: torch.Tensor, eps: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Training path: the last iterate of one PGD run, as adversarial training uses it (Madry et al.).

        Unlike ``__call__``, nothing is validated and nothing waits on the device (no host syncs), no best
        iterate is kept, and ``y`` may be soft targets (``(N, num_classes)`` probabilities, e.g. from mixup)
        with the ``'ce'`` loss. The caller must hold ``attack_mode(attack.model)``. Random starts come from
        ``generator``, or torch's global generator (seeded per process by training scripts) when None.

        Returns:
            ``(x_adv, zero_count)``: adversarial images and the number of exactly-zero input-gradient
            entries (a 0-dim tensor on the device).
        """
        self._labels_checked = True
        eps = self.eps_tensor(x) if eps is None else eps
        delta, zeros = self._run(x.detach(), y, None, eps, generator, None)
        return (x.detach() + delta).detach(), zeros

    def _run(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], eps: torch.Tensor,
             generator: Optional[torch.Generator], best: Optional['_Best']) -> Tuple[torch.Tensor, torch.Tensor]:
        """One restart: ``steps`` signed-gradient steps from a random (or zero) start; the final delta."""
        # the step scales with each example's radius (per-example eps keeps the configured step / eps ratio)
        step = (eps * (self.step_size / self.eps) if self.eps > 0 else torch.zeros_like(eps)).view(-1, 1, 1, 1)
        zeros = torch.zeros((), device=x.device)
        if self.random_start:
            delta = random_delta(x, eps, self.norm, generator)
        else:
            delta = torch.zeros_like(x)
        for _ in range(self.steps):
            loss, grad, logits = self.input_grad(x + delta, y, target, self.loss_fn)
            if best is not None:
                best.update(x + delta, loss, logits, y, target)
            zeros += (grad == 0).sum()
            delta = project(delta + step * steepest_step(grad, self.norm), x, eps, self.norm)
        return delta, zeros


class _Best:
    """Per example, the strongest iterate so far: a fooling one if any, else the highest loss (no host syncs)."""

    def __init__(self, x: torch.Tensor):
        n = x.shape[0]
        self.x = x.clone()
        self.logits: Optional[torch.Tensor] = None
        self.loss = torch.full((n,), float('-inf'), device=x.device)
        self.fooled = torch.zeros(n, dtype=torch.bool, device=x.device)

    def update(self, x_adv, loss, logits, y, target) -> None:
        pred = logits.argmax(dim=1)
        fooled = pred == target if target is not None else pred != y
        better = (fooled & ~self.fooled) | ((fooled == self.fooled) & (loss > self.loss))
        self.x = torch.where(better.view(-1, 1, 1, 1), x_adv.detach(), self.x)
        self.logits = logits.detach() if self.logits is None else torch.where(better[:, None], logits.detach(), self.logits)
        self.loss = torch.where(better, loss, self.loss)
        self.fooled |= fooled


class FGSM(PGD):
    """Single-step attack; with ``random_start`` it is "FGSM-RS" (uniform start, step 1.25 eps)."""
    name = 'fgsm'

    def __init__(self, model: nn.Module, eps: Union[float, str] = 8 / 255, random_start: bool = False,
                 step_size: Optional[Union[float, str]] = None, **kwargs):
        kwargs.pop('steps', None)
        super().__init__(model, eps=eps, steps=1, random_start=random_start, step_size=step_size, **kwargs)
        if step_size is None:
            self.step_size = 1.25 * self.eps if random_start else self.eps
