"""Shared attack machinery: pixel-space model wrapper, attack mode, threat-model geometry, input checks.

Attacks take images in [0, 1] and normalise inside ``PixelModel``, the convention of the field (RobustBench,
AutoAttack). While an attack runs, ``attack_mode`` puts the model in eval mode, freezes its parameters (so
backward computes input gradients only, with no weight-gradient work and no DDP all-reduce) and computes
each weight-standardised kernel once instead of at every step (the weights do not change during an attack).
Everything is restored afterwards.
"""
import contextlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import WS_CONV_TYPES, standardized_weight

__all__ = [
    'NORMS', 'PixelModel', 'AttackResult', 'Attack', 'attack_mode', 'parse_eps', 'check_inputs', 'unwrap_model',
]

NORMS = ('Linf', 'L2')


def parse_eps(value: Union[str, float, int]) -> float:
    """Parse an epsilon: a number (``0.03137``) or a fraction (``'8/255'``), finite and >= 0.

    Raises:
        ValueError: malformed text, or a negative / non-finite value.
    """
    if isinstance(value, bool):
        raise ValueError(f'Invalid eps {value!r}: expected a number or a fraction like 8/255.')
    if isinstance(value, (int, float)):
        eps = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            eps = float(Fraction(text)) if '/' in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f'Invalid eps {value!r}: expected a number or a fraction like 8/255.') from None
    else:
        raise ValueError(f'Invalid eps {value!r}: expected a number or a fraction like 8/255.')
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f'Invalid eps {value!r}: must be a finite number >= 0.')
    return eps


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an integer >= 1, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}.')
    return value


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers: attacks never run through DDP hooks."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == 'OptimizedModule' and hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


class PixelModel(nn.Module):
    """``model((x - mean) / std)`` for images ``x`` in [0, 1]."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer('mean', torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_model(cls, model: nn.Module, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None) -> 'PixelModel':
        """Wrap ``model``, taking mean/std from its timm pretrained config unless given."""
        if isinstance(model, PixelModel):
            return model
        cfg = getattr(unwrap_model(model), 'pretrained_cfg', None) or {}
        mean = mean if mean is not None else cfg.get('mean', (0.485, 0.456, 0.406))
        std = std if std is not None else cfg.get('std', (0.229, 0.224, 0.225))
        return cls(model, mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(device=x.device, dtype=x.dtype), self.std.to(device=x.device, dtype=x.dtype)
        return self.model((x - mean) / std)


def _fixed_ws_forward(conv: nn.Conv2d, weight: torch.Tensor):
    from timm.layers.padding import pad_same

    def forward(x: torch.Tensor) -> torch.Tensor:
        if getattr(conv, 'same_pad', False):
            x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
        return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return forward


@contextlib.contextmanager
def attack_mode(model: nn.Module, cache_standardized_weights: bool = True) -> Iterator[nn.Module]:
    """Eval mode, frozen parameters and (optionally) weight standardisation computed once; all restored."""
    modules = list(model.modules())
    training = [m.training for m in modules]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    patched: List[nn.Module] = []
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        if cache_standardized_weights:
            for m in modules:
                if isinstance(m, WS_CONV_TYPES) and 'forward' not in m.__dict__:
                    with torch.no_grad():
                        weight = standardized_weight(m)
                    m.forward = _fixed_ws_forward(m, weight)
                    patched.append(m)
        yield model
    finally:
        for m in patched:
            del m.forward
        for p, flag in zip(params, requires_grad):
            p.requires_grad_(flag)
        for m, flag in zip(modules, training):
            m.training = flag


def check_inputs(x: torch.Tensor, y: torch.Tensor, num_classes: Optional[int] = None) -> None:
    """Images in [0, 1] as (N, C, H, W) floats, one integer label per image within range."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4:
        raise ValueError(f'Attack inputs must be a float tensor (N, C, H, W), got '
                         f'{type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ""}.')
    if x.numel() and (x.min().item() < 0 or x.max().item() > 1):
        raise ValueError(f'Attack inputs must be pixels in [0, 1] (normalisation happens inside the model), got '
                         f'values in [{x.min().item():.3g}, {x.max().item():.3g}]. Pass un-normalised images.')
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32) or y.shape != (x.shape[0],):
        raise ValueError(f'Labels must be an integer tensor of shape ({x.shape[0]},), got '
                         f'{getattr(y, "dtype", type(y).__name__)} {tuple(getattr(y, "shape", ()))}.')
    if num_classes is not None and y.numel() and (y.min().item() < 0 or y.max().item() >= num_classes):
        raise ValueError(f'Labels must lie in [0, {num_classes - 1}], got values in '
                         f'[{y.min().item()}, {y.max().item()}].')


def lp_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    flat = t.flatten(1)
    return flat.abs().amax(dim=1) if norm == 'Linf' else flat.norm(p=2, dim=1)


def project(delta: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Project ``delta`` onto the eps-ball and keep ``x + delta`` in [0, 1]."""
    eps = eps.view(-1, 1, 1, 1)
    if norm == 'Linf':
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    else:
        norms = delta.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(eps / (norms + 1e-12), max=1.0)
    return (x + delta).clamp_(0, 1) - x


def random_delta(x: torch.Tensor, eps: torch.Tensor, norm: str, generator: torch.Generator) -> torch.Tensor:
    """Uniform start in the Linf ball; uniform direction and radius in the L2 ball."""
    if norm == 'Linf':
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta = (2 * u - 1) * eps.view(-1, 1, 1, 1)
    else:
        g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        g = g / (g.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1) + 1e-12)
        r = torch.rand((x.shape[0], 1, 1, 1), generator=generator, device=x.device, dtype=x.dtype)
        delta = g * r * eps.view(-1, 1, 1, 1)
    return project(delta, x, eps, norm)


def steepest_step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest ascent direction of unit norm: sign for Linf, normalised gradient for L2."""
    if norm == 'Linf':
        return grad.sign()
    return grad / (grad.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1) + 1e-12)


@dataclass
class AttackResult:
    """Adversarial examples and what they did."""
    x_adv: torch.Tensor
    logits: torch.Tensor  # at x_adv
    correct: torch.Tensor  # bool per example: still classified correctly (targeted: target not reached)
    zero_grad_frac: float = 0.0  # fraction of input-gradient entries that were exactly 0
    stats: Dict[str, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct.float().mean().item() if self.correct.numel() else float('nan')


class Attack:
    """Base class: validates inputs, wraps the model in pixel space, runs ``perturb`` in ``attack_mode``.

    Args:
        model: Classifier taking normalised images (a timm model) or a ``PixelModel``.
        eps: Radius of the threat model (float or ``'8/255'``).
        norm: ``'Linf'`` or ``'L2'``.
        mean, std: Normalisation; defaults to the model's timm pretrained config.
        seed: Seeds the random starts (results are deterministic for a given seed on a given device).
        amp_dtype: Run forwards under autocast in this dtype (``torch.bfloat16`` / ``torch.float16``).
        cache_standardized_weights: Compute each weight-standardised kernel once per attack.
    """
    name = 'attack'

    def __init__(
            self,
            model: nn.Module,
            eps: Union[float, str] = 8 / 255,
            norm: str = 'Linf',
            mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None,
            seed: int = 0,
            amp_dtype: Optional[torch.dtype] = None,
            cache_standardized_weights: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f'Attacks need a torch.nn.Module, got {type(model).__name__}.')
        if norm not in NORMS:
            raise ValueError(f'Unknown norm {norm!r}; accepted: {", ".join(NORMS)}.')
        self.eps = parse_eps(eps)
        if norm == 'Linf' and self.eps > 1:
            raise ValueError(f'Linf eps {eps!r} is above 1, the whole pixel range.')
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f'amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}.')
        if isinstance(model, PixelModel):
            self.model = PixelModel(unwrap_model(model.model), model.mean.flatten().tolist(), model.std.flatten().tolist())
        else:
            self.model = PixelModel.from_model(unwrap_model(model), mean, std)
        self.norm = norm
        self.seed = seed
        self.amp_dtype = amp_dtype
        self.cache_standardized_weights = cache_standardized_weights

    # -- to implement -------------------------------------------------------------------------------------
    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> Tuple:
        """Return ``(adversarial images, fraction of zero input-gradient entries[, their logits])``."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.amp_dtype is None:
            return self.model(x)
        with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
            return self.model(x).float()

    def input_grad(self, x_adv: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
                   loss_fn) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example loss, its gradient w.r.t. the input only, and the logits."""
        x_adv = x_adv.detach().requires_grad_(True)
        logits = self.logits(x_adv)
        if not getattr(self, '_labels_checked', True):
            # label range needs the class count: checked on the first forward instead of an extra one
            for labels in (y,) if target is None else (y, target):
                check_inputs(x_adv.detach(), labels, logits.shape[1])
            self._labels_checked = True
        loss = loss_fn(logits, y, target)
        # fp16 gradients underflow to exactly 0 (sign(0) = 0, no step): scale the loss; the direction is unchanged
        scale = 1024.0 if self.amp_dtype == torch.float16 else 1.0
        grad, = torch.autograd.grad(loss.sum() * scale, x_adv)
        return loss.detach(), grad.detach(), logits.detach()

    def num_classes(self, x: torch.Tensor) -> int:
        with torch.no_grad():
            return int(self.logits(x[:1]).shape[1])

    def __call__(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None,
                 eps: Optional[torch.Tensor] = None) -> AttackResult:
        """Attack ``x`` (pixels in [0, 1]) with labels ``y``; ``target`` for targeted attacks; ``eps`` to give
        each example its own radius (e.g. for a decision-margin search)."""
        if eps is not None:
            eps = torch.as_tensor(eps, device=x.device, dtype=x.dtype).expand(x.shape[0]).clone()
        self._batch_eps = eps
        try:
            return self._call(x, y, target)
        finally:
            self._batch_eps = None

    def _call(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> AttackResult:
        with attack_mode(self.model, self.cache_standardized_weights):
            check_inputs(x, y)
            if target is not None:
                check_inputs(x, target)
            x = x.detach()
            if x.shape[0] == 0:
                return AttackResult(x_adv=x, logits=x.new_zeros((0, 0)), correct=torch.zeros(0, dtype=torch.bool))
            self._labels_checked = False
            out = self.perturb(x, y, target)
            x_adv, zero_frac = out[0], out[1]
            logits = out[2] if len(out) > 2 else None
            if logits is None:
                with torch.no_grad():
                    logits = self.logits(x_adv)
        pred = logits.argmax(dim=1)
        correct = pred != target if target is not None else pred == y
        return AttackResult(x_adv=x_adv.detach(), logits=logits, correct=correct, zero_grad_frac=zero_frac)

    def generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    def eps_tensor(self, x: torch.Tensor) -> torch.Tensor:
        batch_eps = getattr(self, '_batch_eps', None)
        if batch_eps is not None and batch_eps.shape[0] == x.shape[0]:
            return batch_eps
        return torch.full((x.shape[0],), self.eps, device=x.device, dtype=x.dtype)
