"""Shared attack machinery: the ``Attack`` base class, ``attack_mode``, the geometry of the ball, ``check_inputs``.

Attacks take images in [0, 1] and normalise inside ``PixelModel``, the convention of the field (RobustBench,
AutoAttack).
"""
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import WS_CONV_TYPES, standardized_weight
from ..pixels import PixelModel, unwrap_model  # re-exported: PixelModel lives in timm_nofrost.pixels
from .losses import get_loss
from .threat import ThreatModel

__all__ = ['PixelModel', 'AttackResult', 'Attack', 'BestIterate', 'attack_mode', 'check_inputs', 'check_labels',
           'count_passes', 'deterministic_device', 'unwrap_model']


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum`` (1: a positive integer), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{name} must be ' + ('a positive integer' if minimum == 1 else f'an integer >= {minimum}')
                         + f', got {value!r}.')
    return value


def _fixed_ws_forward(conv: nn.Conv2d, weight: torch.Tensor):
    from timm.layers.padding import pad_same

    def forward(x: torch.Tensor) -> torch.Tensor:
        if getattr(conv, 'same_pad', False):
            x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
        return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return forward


@contextlib.contextmanager
def attack_mode(model: nn.Module, cache_standardized_weights: bool = True) -> Iterator[nn.Module]:
    """Eval mode, frozen parameters (backward computes input gradients only: no weight-gradient work, no DDP
    all-reduce) and, optionally, each weight-standardised kernel computed once instead of at every step (the
    weights do not change during an attack); all restored afterwards."""
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


@contextlib.contextmanager
def count_passes(model: nn.Module) -> Iterator[List[int]]:
    """``[forward, backward]``: the images ``model`` ran forward and the images whose gradient flowed back through
    its output, counted by hooks while the context is open (any attack, ours or the official code, counts the
    same way; a batch of n images counts n)."""
    passes = [0, 0]

    def backward(grad: torch.Tensor) -> None:
        passes[1] += grad.shape[0]

    def forward(module: nn.Module, args: Tuple, output: torch.Tensor) -> None:
        passes[0] += output.shape[0]
        if output.requires_grad:
            output.register_hook(backward)

    handle = model.register_forward_hook(forward)
    try:
        yield passes
    finally:
        handle.remove()


def deterministic_device(device: torch.device) -> bool:
    """Whether the same input gives bit-identical logits and gradients on ``device``: on CPUs, or where
    ``torch.use_deterministic_algorithms(True)`` forbids non-deterministic kernels (CUDA's atomics in pooling
    backward, some cuDNN algorithms). Early stopping relies on it."""
    return device.type == 'cpu' or (torch.are_deterministic_algorithms_enabled()
                                    and not torch.is_deterministic_algorithms_warn_only_enabled())


def rng_state(device: torch.device) -> List[torch.Tensor]:
    """torch's global generator states that a model's forward could draw from (CPU, and ``device``'s)."""
    states = [torch.random.get_rng_state()]
    if device.type == 'cuda':
        states.append(torch.cuda.get_rng_state(device))
    return states


class IterateHashes:
    """Per example, the iterates seen so far, as two 64-bit hashes of the perturbation's bits (exact equality
    of the bits, not closeness: -0.0 and 0.0 differ, which can only miss a repeat, never invent one).

    Each hash sums the perturbation's 16-bit pieces times fixed random odd 64-bit weights, modulo 2^64. Two
    different perturbations differ in some piece by less than 2^16, so they share a hash with probability at most
    2^-48, both with at most 2^-96. (Whole float words would not do: L-inf iterates flip between +eps and -eps,
    a difference of 2^31 or 2^63 in the bits, and an even number of such flips would cancel.)
    """

    def __init__(self, delta: torch.Tensor, capacity: int):
        pieces = delta[0].numel() * delta.element_size() // 2
        generator = torch.Generator().manual_seed(0x5eed)
        self.weights = (torch.randint(-2 ** 62, 2 ** 62, (2, pieces), generator=generator) * 2 + 1).to(delta.device)
        self.seen = torch.zeros((delta.shape[0], capacity, 2), dtype=torch.int64, device=delta.device)
        self.count = 0
        self.add(delta)

    def _hash(self, delta: torch.Tensor) -> torch.Tensor:
        values = delta.contiguous().view(torch.int16).flatten(1).to(torch.int64)
        return torch.stack([(values * w).sum(1) for w in self.weights], dim=1)

    def add(self, delta: torch.Tensor) -> torch.Tensor:
        """Record the rows' next iterate ``delta``; returns, per row, whether it repeats an earlier one."""
        h = self._hash(delta)
        repeated = (self.seen[:, :self.count] == h[:, None]).all(-1).any(1)
        self.seen[:, self.count] = h
        self.count += 1
        return repeated

    def keep(self, rows: torch.Tensor) -> None:
        self.seen = self.seen[rows]


def check_inputs(x: torch.Tensor, y: Optional[torch.Tensor] = None, num_classes: Optional[int] = None, *,
                 pixels: bool = True, model: Optional[nn.Module] = None, eps: Optional[object] = None,
                 soft_labels: bool = False) -> torch.Tensor:
    """The one check of a batch for attacks, training and evaluation: a ValueError / TypeError naming the problem
    instead of a wrong score or a torch traceback, with one host sync. Returns ``x``, uint8 pixels as floats / 255.

    Args:
        x: Images (N, C, H, W), N >= 1, finite floats: pixels in [0, 1] (``pixels``; uint8 0-255 pixels are
            converted) or normalised inputs (``pixels=False``: floats only, no range).
        y: Labels: (N,) integers, within ``[0, num_classes)`` if given; with ``soft_labels`` also (N, K) floats.
        model: The model ``x`` goes to: ``x`` must have its parameters' dtype, unless autocast is on.
        eps: Per-example radii: finite and >= 0.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f'Images must be a non-empty (N, C, H, W) tensor, got {type(x).__name__}'
                         f'{tuple(x.shape) if isinstance(x, torch.Tensor) else ""}.')
    dtype = None if model is None or torch.is_autocast_enabled(x.device.type) else \
        next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if pixels and x.dtype == torch.uint8:
        x = x.to(dtype or torch.float32) / 255  # the package's one rule: uint8 images are 0-255 pixels
    if not x.is_floating_point():
        raise TypeError(f'Images must be floats or uint8 pixels (0-255), got {x.dtype}: for 0-255 values use '
                        f'x.float() / 255.' if pixels else f'Normalised inputs must be floats, got {x.dtype}: convert '
                        f'0-255 images with x.float() / 255 and normalise them (or pass pixels with '
                        f'input_normalized=False).')
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f'Images are {x.dtype} but the model computes in {dtype}: cast one to the other.')
    n, hard = x.shape[0], isinstance(y, torch.Tensor) and y.dtype in (torch.int64, torch.int32)
    if y is not None and not (hard and y.shape == (n,) or soft_labels and isinstance(y, torch.Tensor)
                              and y.is_floating_point() and y.ndim == 2 and y.shape[0] == n):
        raise ValueError(f'Labels must be an integer tensor of shape ({n},){" or (N, K) soft targets" * soft_labels}, '
                         f'got {getattr(y, "dtype", type(y).__name__)} {tuple(getattr(y, "shape", ()))}.')
    stats = [*torch.aminmax(x.detach())]  # NaN and inf show in the extremes: one pass, one sync for everything
    if eps is not None:
        stats += torch.aminmax(torch.as_tensor(eps, dtype=torch.float32, device=x.device))
    lo, hi, *rest = torch.stack([s.to(x.device, torch.float32) for s in stats]).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f'Images must be finite, got values in [{lo}, {hi}] (NaN or inf pixels).')
    if pixels and (lo < 0 or hi > 1):
        raise ValueError(f'Images must be pixels in [0, 1], got values in [{lo:.3g}, {hi:.3g}]: divide 0-255 '
                         f'images by 255; normalisation happens inside the model (AdversarialTrainer: '
                         f'input_normalized=True takes normalised inputs).')
    if eps is not None:
        low, high = rest
        if not (math.isfinite(high) and low >= 0):
            raise ValueError(f'Per-example eps must be finite and >= 0, got values in [{low:g}, {high:g}].')
    if num_classes is not None and hard:
        check_labels(y, num_classes)
    return x


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """Hard labels within ``[0, num_classes)``: the class count is known after the first forward, so this is
    checked then, without scanning the images again."""
    if y.dtype in (torch.int64, torch.int32) and y.numel():
        low, high = (int(v) for v in torch.aminmax(y))
        if low < 0 or high >= num_classes:
            raise ValueError(f'Labels must lie in [0, {num_classes - 1}], got values in [{low}, {high}].')


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
    like = dict(generator=generator, device=x.device, dtype=x.dtype)
    if norm == 'Linf':
        delta = 2 * torch.rand(x.shape, **like) - 1
    else:  # a normalised Gaussian (uniform direction) times a uniform radius
        delta = steepest_step(torch.randn(x.shape, **like), 'L2') * torch.rand((x.shape[0], 1, 1, 1), **like)
    return project(delta * eps.view(-1, 1, 1, 1), x, eps, norm)


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
    # model work, in images: forward passes and input-gradient (backward) passes, comparable across machines
    forward_passes: int = 0
    backward_passes: int = 0
    seconds: float = 0.0  # wall time of the call

    @property
    def accuracy(self) -> float:
        return self.correct.float().mean().item() if self.correct.numel() else float('nan')


class Attack:
    """Base class: validates inputs, wraps the model in pixel space, runs ``perturb`` in ``attack_mode``.

    Args:
        model: Classifier taking normalised images (a timm model) or a ``PixelModel``.
        eps, norm: Radius (float or ``'8/255'``; default 8/255) and norm (``'Linf'``, default, or ``'L2'``) of the
            threat model; or give ``threat`` instead.
        mean, std: Normalisation of the model's inputs; default: its timm ``pretrained_cfg`` (a ValueError if
            it has none: pass ``mean=(0, 0, 0), std=(1, 1, 1)`` for a model that takes [0, 1] pixels).
        seed: Seeds the random starts (results are deterministic for a given seed on a given device).
        amp_dtype: Run forwards under autocast in this dtype (``torch.bfloat16`` / ``torch.float16``).
        cache_standardized_weights: Compute each weight-standardised kernel once per attack.
        active_set: Stop spending forwards and backwards on an example once it is fooled (a fooled example can
            never count as robust again). Per-example outcomes are identical either way; ``False`` runs every
            step on every example (the reference the active set is tested against).
        early_stop: Stop attacking an example once its iterate repeats an earlier one (PGD, FGSM): the rest of
            the run would repeat too, so the outcome is exactly the full run's. Applied only where the model is
            deterministic (see ``deterministic_device``; a model that draws random numbers turns it off).
        threat: The ``ThreatModel`` (radius and norm) to attack in.
    """
    name = 'attack'

    def __init__(
            self,
            model: nn.Module,
            eps: Optional[Union[float, str]] = None,
            norm: Optional[str] = None,
            mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None,
            seed: int = 0,
            amp_dtype: Optional[torch.dtype] = None,
            cache_standardized_weights: bool = True,
            active_set: bool = True,
            early_stop: bool = True,
            threat: Optional[ThreatModel] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f'Attacks need a torch.nn.Module, got {type(model).__name__}.')
        if threat is None:  # the older keywords: the one place they become a threat model
            threat = ThreatModel(8 / 255 if eps is None else eps, 'Linf' if norm is None else norm)
        elif not isinstance(threat, ThreatModel) or eps is not None or norm is not None:
            raise ValueError(f'Give threat a ThreatModel, or eps / norm, not both; got threat={threat!r}, eps={eps!r}, '
                             f'norm={norm!r}.')
        self.threat = threat
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f'amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}.')
        # mean/std: given, or the model's timm pretrained_cfg, or a ValueError saying how (never a silent default)
        pixel = PixelModel.from_model(unwrap_model(model), mean, std)
        self.model = PixelModel(unwrap_model(pixel.model), pixel.mean.flatten().tolist(), pixel.std.flatten().tolist())
        self.seed = seed
        self.amp_dtype = amp_dtype
        self.cache_standardized_weights = cache_standardized_weights
        self.active_set = bool(active_set)
        self.early_stop = bool(early_stop)

    eps = property(lambda self: self.threat.eps, doc='The radius of the threat model.')
    norm = property(lambda self: self.threat.norm, doc="The threat model's norm.")

    def _iterative(self, steps: int, restarts: int, loss: str) -> None:
        """The settings PGD and APGD share: ``steps`` and ``restarts`` (checked) and the attack loss by name."""
        self.steps = check_positive_int('steps', steps)
        self.restarts = check_positive_int('restarts', restarts)
        self.loss_name, self.loss_fn = loss, get_loss(loss)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
                active: torch.Tensor) -> Tuple:
        """Attack the rows of ``x`` where ``active`` is True; the others are left as they are. Random starts are
        drawn for the whole batch, so a row's start does not depend on which rows are attacked (a cascade and a
        full run attack each row identically).

        Returns:
            ``(adversarial images, fraction of zero input-gradient entries[, logits at them])``; logits of
            inactive rows are ignored.
        """
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.amp_dtype is None:
            return self.model(x)
        with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
            return self.model(x).float()

    def is_fooled(self, logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        """Per example: the attack succeeded (untargeted: misclassified; targeted: the target class reached)."""
        pred = logits.argmax(dim=1)
        return pred == target if target is not None else pred != y

    def input_grad(self, x_adv: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
                   loss_fn) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example loss, its gradient w.r.t. the input only, and the logits."""
        x_adv = x_adv.detach().requires_grad_(True)
        logits = self.logits(x_adv)
        if not getattr(self, '_labels_checked', True):
            # label range needs the class count: checked on the first forward instead of an extra one
            for labels in (y,) if target is None else (y, target):
                check_labels(labels, logits.shape[1])
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
                 eps: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> AttackResult:
        """Attack ``x`` (pixels in [0, 1], or uint8 0-255: see ``check_inputs``) with labels ``y``; ``target`` for
        targeted attacks; ``eps`` to give each example its own radius (e.g. for a decision-margin search).

        ``mask`` (bool, one per example) attacks only those rows: the others are returned unchanged and count
        as not robust (``correct`` False), as for examples already misclassified or broken by an earlier attack.
        Each attacked row gets the same random start as without a mask, so masking never changes its outcome.
        """
        x = check_inputs(x, y, model=None if self.amp_dtype else self.model, eps=eps)
        if target is not None:
            check_inputs(x, target)
        if eps is not None:
            eps = torch.as_tensor(eps, device=x.device, dtype=x.dtype).expand(x.shape[0]).clone()
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (x.shape[0],):
                raise ValueError(f'mask must be a bool tensor of shape ({x.shape[0]},), got '
                                 f'{getattr(mask, "dtype", type(mask).__name__)} {tuple(getattr(mask, "shape", ()))}.')
            mask = mask.to(x.device)
        self._batch_eps = eps
        try:
            return self._call(x, y, target, mask)
        finally:
            self._batch_eps = None

    def _call(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
              mask: Optional[torch.Tensor] = None) -> AttackResult:
        x, start = x.detach(), time.perf_counter()
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if mask is None else mask
        if not bool(active.any()):  # nothing to attack: no model work at all
            return AttackResult(x_adv=x.clone(), logits=x.new_zeros((x.shape[0], 0)),
                                correct=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
        with attack_mode(self.model, self.cache_standardized_weights), count_passes(self.model) as passes:
            self._labels_checked = False
            x_adv, zero_frac, *logits = self.perturb(x, y, target, active)
            logits = logits[0] if logits else None
            if logits is None:
                idx = active.nonzero()[:, 0]
                with torch.no_grad():
                    rows = self.logits(x_adv[idx])
                logits = rows.new_zeros((x.shape[0], rows.shape[1]))
                logits[idx] = rows
        correct = ~self.is_fooled(logits, y, target) & active
        return AttackResult(x_adv=x_adv.detach(), logits=logits, correct=correct, zero_grad_frac=zero_frac,
                            forward_passes=passes[0], backward_passes=passes[1], seconds=time.perf_counter() - start)

    def generator(self, device: torch.device, offset: int = 0) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed + offset)

    def restart_rows(self, active: torch.Tensor, best: 'BestIterate',
                     starts: Iterable) -> Iterator[Tuple[Any, torch.Tensor]]:
        """``(start, rows)`` per restart (starts drawn for the whole batch, see ``perturb``): the rows ``active``
        and, with the active set, not fooled yet; stops when none is left."""
        for start in starts:
            idx = ((active & ~best.fooled) if self.active_set else active).nonzero()[:, 0]
            if idx.numel() == 0:
                return
            yield start, idx

    def eps_tensor(self, x: torch.Tensor) -> torch.Tensor:
        batch_eps = getattr(self, '_batch_eps', None)
        if batch_eps is not None and batch_eps.shape[0] == x.shape[0]:
            return batch_eps
        return torch.full((x.shape[0],), self.eps, device=x.device, dtype=x.dtype)


class BestIterate:
    """Per example, the strongest iterate so far: a fooling one if any, else the highest loss (no host syncs).

    ``update`` takes the batch rows ``idx`` an attack is working on, so attacks that drop fooled rows (the
    active set) and attacks that keep them all record their outcome in the same place.
    """

    def __init__(self, x: torch.Tensor):
        self.x = x.clone()
        self.logits: Optional[torch.Tensor] = None
        self.loss: Optional[torch.Tensor] = None
        self.fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def update(self, idx: torch.Tensor, x_adv: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor,
               fooled: torch.Tensor) -> torch.Tensor:
        """Record the iterate ``x_adv`` of rows ``idx``; returns ``fooled`` (the rows this iterate fools)."""
        n = self.x.shape[0]
        if self.logits is None:
            self.logits = logits.new_zeros((n, logits.shape[1]))
            self.loss = torch.full((n,), float('-inf'), device=loss.device, dtype=loss.dtype)
        was_fooled, best_loss = self.fooled[idx], self.loss[idx]
        better = (fooled & ~was_fooled) | ((fooled == was_fooled) & (loss > best_loss))
        self.x[idx] = torch.where(better.view(-1, 1, 1, 1), x_adv.detach(), self.x[idx])
        self.logits[idx] = torch.where(better[:, None], logits.detach(), self.logits[idx])
        self.loss[idx] = torch.where(better, loss.to(self.loss.dtype), best_loss)
        self.fooled[idx] = was_fooled | fooled
        return fooled
