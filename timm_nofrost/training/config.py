"""Adversarial training settings (the NoFrost recipe by default) and their validation.

Training methods (``AdversarialConfig.method``); ``x'`` is the adversarial example, ``p = softmax(f(x))``,
``q = softmax(f(x'))``, ``B`` the batch size, ``loss`` the trainer's criterion (timm's: label smoothing, mixup):
  nofrost: ``(1 - lambda) * loss(f(x), y) + lambda * loss(f(x'), y)`` (the NoFrost recipe, lambda = adv_weight);
  madry:   ``loss(f(x'), y)`` (Madry et al. 2018; the same as nofrost with lambda 1, no clean forward);
  trades:  ``loss(f(x), y) + beta * (1/B) * sum_i KL(p_i || q_i)`` (Zhang et al. 2019; the published natural
           term is plain CE, here it is the criterion); the attack maximises the KL from ``x + 0.001 * N(0, I)``
           with p from the eval-mode model;
  mart:    ``CE(f(x'), y) + NLL(log(1.0001 - q + 1e-12), y') + beta * (1/B) * sum_i KL(p_i || q_i + 1e-12)
           * (1.0000001 - p_y)`` with ``y'`` the most likely wrong class under q (Wang et al. 2020, as their code);
           its terms need a hard label: soft targets (mixup, label smoothing) use their argmax and plain CE.
           The attack is PGD on CE from ``x + 0.001 * N(0, I)``.
Training attacks (``AdversarialConfig.attack``), all run by the attacks' one PGD loop:
  pgd:     ``steps`` projected steps (uniform start in the eps ball; trades/mart: the 0.001 Gaussian start);
  fgsm-rs: uniform start in the eps ball, one signed step of 1.25 eps, projected onto the ball and [0, 1]
           (Wong et al. 2020);
  n-fgsm:  uniform noise in the 2 eps ball, one signed step of eps, NOT projected back onto the eps ball (the
           perturbation reaches up to 3 eps), only clamped to [0, 1] (de Jorge et al. 2022; L-inf only).
"""
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Union

from ..attacks.base import NORMS, parse_eps
from ..attacks.pgd import default_step_size, nofrost_step_size
from ..pixels import amp_dtype

__all__ = ['ATTACK_DTYPES', 'BATCH_MODES', 'METHODS', 'TRAIN_ATTACKS', 'SINGLE_STEP_ATTACKS', 'AdversarialConfig']

# How clean and adversarial examples go through the training forward:
#   concat:   one forward on cat([clean, adv]); needs a model whose layers never mix batch statistics
#   separate: two forwards through the same model (shared BatchNorm: the paper's BN-AT baseline)
#   split:    one forward through timm's split BatchNorm, one BN for each half (the paper's MBN-AT)
#   auto:     concat when the model has no batch-statistics layer, else separate
BATCH_MODES = ('auto', 'concat', 'separate', 'split')
ATTACK_DTYPES = ('bfloat16', 'float16')  # also accepted: the other AMP_DTYPES names (bf16, fp16)
METHODS = ('nofrost', 'madry', 'trades', 'mart')  # training losses (see the module docstring)
BETA_METHODS = ('trades', 'mart')  # methods with a beta (robust-term weight) and no lambda
DEFAULT_BETA = 6.0  # both papers' CIFAR-10 value
TRAIN_ATTACKS = ('pgd', 'fgsm-rs', 'n-fgsm')
SINGLE_STEP_ATTACKS = ('fgsm-rs', 'n-fgsm')
NFGSM_NOISE = 2.0  # N-FGSM's noise radius, in eps (k = 2)


@dataclass
class AdversarialConfig:
    """How adversarial examples are made and weighted during training.

    Defaults are the NoFrost authors' recipe: PGD-10 at L-inf 8/255 with step
    ``min(1.25 * eps, eps + 4/255) / steps`` from a uniform random start, and the loss
    ``(1 - adv_weight) * loss(clean) + adv_weight * loss(adv)`` with ``adv_weight`` 0.5.

    Args:
        eps: Radius of the threat model (a number or a fraction such as ``'8/255'``), in [0, 1] for L-inf.
        steps: PGD steps per batch; 0 only with ``adv_weight=0`` (standard training).
        step_size: Step per PGD iteration; None uses the authors' rule above. At most ``eps``.
        norm: ``'Linf'`` or ``'L2'``.
        random_start: Start from a uniform random point of the ball.
        adv_weight: lambda; 1.0 is Madry-style AT on adversarial examples only, 0.0 standard training.
        eps_warmup_steps: Ramp eps linearly from 0 over this many training batches (0: no warm-up).
        batch_mode: One of ``BATCH_MODES`` (see above).
        attack_dtype: Run the attack's forwards and backwards under autocast in this dtype (``'bfloat16'``
            or ``'float16'``) while the training step keeps its own precision. The attack only needs the
            sign of the input gradient; None follows the caller's autocast.
    """
    eps: Union[float, str] = 8 / 255
    steps: int = 10
    step_size: Optional[Union[float, str]] = None
    norm: str = 'Linf'
    random_start: bool = True
    adv_weight: float = 0.5
    eps_warmup_steps: int = 0
    batch_mode: str = 'auto'
    attack_dtype: Optional[str] = None

    def __post_init__(self) -> None:
        self.eps = parse_eps(self.eps)
        if self.norm not in NORMS:
            raise ValueError(f'Unknown norm {self.norm!r}; accepted: {", ".join(NORMS)}.')
        if self.norm == 'Linf' and self.eps > 1:
            raise ValueError(f'Linf eps {self.eps:g} is above 1, the whole pixel range; '
                             f'give pixels in [0, 1] units, e.g. 8/255.')
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f'steps must be an integer >= 0, got {self.steps!r}.')
        if isinstance(self.adv_weight, bool) or not isinstance(self.adv_weight, (int, float)) \
                or not math.isfinite(self.adv_weight) or not 0 <= self.adv_weight <= 1:
            raise ValueError(f'adv_weight (lambda) must be in [0, 1], got {self.adv_weight!r}.')
        self.adv_weight = float(self.adv_weight)
        if self.steps == 0 and self.adv_weight > 0:
            raise ValueError(f'steps=0 makes no adversarial examples, but adv_weight={self.adv_weight:g} > 0 '
                             f'weights them; use steps >= 1, or adv_weight=0 for standard training.')
        if self.step_size is not None:
            self.step_size = parse_eps(self.step_size)
            if self.step_size > self.eps:
                raise ValueError(f'step_size {self.step_size:g} is above eps {self.eps:g}: a step larger than the '
                                 f'ball is only clipped back. Leave step_size unset for the authors\' rule.')
            if self.step_size == 0 and self.eps > 0 and self.steps > 0:
                raise ValueError('step_size must be > 0.')
        if isinstance(self.eps_warmup_steps, bool) or not isinstance(self.eps_warmup_steps, int) \
                or self.eps_warmup_steps < 0:
            raise ValueError(f'eps_warmup_steps must be an integer >= 0, got {self.eps_warmup_steps!r}.')
        if self.batch_mode not in BATCH_MODES:
            raise ValueError(f'Unknown batch_mode {self.batch_mode!r}; accepted: {", ".join(BATCH_MODES)}.')
        if self.attack_dtype is not None:
            try:  # any AMP name (bf16, fp16, ...), kept as torch's: the spelling args.yaml and checkpoints record
                dtype = amp_dtype(self.attack_dtype)
            except ValueError:
                raise ValueError(f'Unknown attack_dtype {self.attack_dtype!r}; accepted: {", ".join(ATTACK_DTYPES)} '
                                 f'(or None to follow the caller\'s autocast).') from None
            self.attack_dtype = None if dtype is None else str(dtype).replace('torch.', '')
        if not isinstance(self.random_start, bool):
            raise ValueError(f'random_start must be True or False, got {self.random_start!r}.')

    @property
    def attack_step_size(self) -> float:
        """The PGD step actually used: ``step_size`` or the authors' rule."""
        if self.step_size is not None:
            return float(self.step_size)
        return nofrost_step_size(self.eps, max(self.steps, 1))

    def eps_at(self, step: int) -> float:
        """eps after ``step`` training batches (linear warm-up)."""
        if self.eps_warmup_steps <= 0:
            return self.eps
        return self.eps * min(1.0, step / self.eps_warmup_steps)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
