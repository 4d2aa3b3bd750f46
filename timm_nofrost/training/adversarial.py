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

from ..attacks.base import check_positive_int
from ..attacks.pgd import default_step_size, nofrost_step_size
from ..attacks.threat import NORMS, ThreatModel
from ..pixels import amp_dtype
from ..settings import setting

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
    ``(1 - adv_weight) * loss(clean) + adv_weight * loss(adv)`` with ``adv_weight`` 0.5. ``method`` and
    ``attack`` select other published recipes (see the module docstring for what each optimises).

    Args:
        eps: Radius of the threat model (a number or a fraction such as ``'8/255'``), in [0, 1] for L-inf.
        steps: Attack steps per batch; None: 10 for ``'pgd'``, 1 for the single-step attacks (which refuse
            more). 0 only with ``adv_weight=0`` (standard training).
        step_size: Step per attack iteration; None: the authors' rule above for nofrost/madry, ``2.5 * eps /
            steps`` for trades/mart (2/255 for PGD-10 at 8/255, their codes' 0.007), 1.25 eps for
            ``'fgsm-rs'`` and eps for ``'n-fgsm'``. At most ``eps`` for PGD, 2 eps for fgsm-rs.
        norm: ``'Linf'`` or ``'L2'``.
        random_start: Start from a random point (each attack's, see above). Required by the single-step attacks
            and by trades (the KL's input gradient is zero at the clean point).
        adv_weight: lambda, for ``method='nofrost'`` only; None: 0.5 (1.0 for ``'madry'``). 1.0 is Madry-style
            AT on adversarial examples only, 0.0 standard training. Stays None for trades/mart (refused there).
        eps_warmup_steps: Ramp eps linearly from 0 over this many training batches (0: no warm-up).
        batch_mode: One of ``BATCH_MODES`` (see above).
        attack_dtype: Run the attack's forwards and backwards under autocast in this dtype (``'bfloat16'``
            or ``'float16'``) while the training step keeps its own precision. The attack only needs the
            sign of the input gradient; None follows the caller's autocast.
        method: Training loss, one of ``METHODS``: ``'nofrost'`` (default), ``'madry'``, ``'trades'``, ``'mart'``.
        beta: Weight of the trades/mart robust term; None: 6.0 for those (refused for nofrost/madry).
        attack: Training attack, one of ``TRAIN_ATTACKS``: ``'pgd'`` (default), ``'fgsm-rs'``, ``'n-fgsm'``.
    """
    eps: Union[float, str] = setting(
        '8/255', group='adversarial', flag='--adv-eps', metavar='EPS',
        help='threat-model radius in pixel units [0, 1], a number or a fraction')
    steps: Optional[int] = setting(
        None, group='adversarial', flag='--adv-steps', type=int, metavar='N',
        help='attack steps per training batch, for pgd; fgsm-rs and n-fgsm take 1 and no more')
    step_size: Optional[Union[float, str]] = setting(
        None, group='adversarial', flag='--adv-step-size', metavar='SIZE',
        help='attack step size, a number or a fraction',
        default_help="nofrost/madry the authors' min(1.25*eps, eps+4/255)/steps, 1/255 for PGD-10 at 8/255; "
                     'trades/mart 2.5*eps/steps, 2/255 for PGD-10; fgsm-rs 1.25*eps; n-fgsm eps')
    norm: str = setting('Linf', group='adversarial', flag='--adv-norm', choices=NORMS, help='threat model')
    random_start: bool = setting(
        True, group='adversarial', flag='--adv-no-random-start', negate=True,
        help='start PGD from the clean image instead of a random point (refused with trades and the single-step '
             'attacks, which need the noise)')
    adv_weight: Optional[float] = setting(
        None, group='adversarial', flag='--adv-weight', type=float, metavar='LAMBDA',
        help='lambda in (1-lambda)*loss(clean) + lambda*loss(adv), with --adv-method nofrost; 1 is Madry AT, 0 '
             'standard training (with --adv-steps 0); refused with trades and mart, which take --adv-beta',
        default_help='0.5; madry: 1')
    eps_warmup_steps: int = setting(
        0, group='adversarial', flag='--adv-eps-warmup-steps', type=int, metavar='N',
        help='ramp eps linearly from 0 over this many training batches (0: no warm-up)')
    batch_mode: str = setting(
        'auto', group='adversarial', flag='--adv-batch-mode', choices=BATCH_MODES,
        help='how clean and adversarial halves go through the model: concat (one forward, normalizer-free '
             'models), separate (two forwards, shared BN: BN-AT), split (split BN: MBN-AT); auto picks concat for '
             'models without BatchNorm')
    attack_dtype: Optional[str] = setting(
        None, group='adversarial', flag='--adv-attack-dtype', choices=ATTACK_DTYPES,
        help='run only the attack under autocast in this dtype, the training step keeps its precision (faster on '
             'hardware with bf16)', default_help='follow the training autocast')
    method: str = setting(
        'nofrost', group='adversarial', flag='--adv-method', metavar='METHOD',
        help="training loss, one of: nofrost: (1-lambda)*loss(clean) + lambda*loss(adv), the paper's recipe; "
             'madry: loss(adv) only (Madry et al. 2018); trades: loss(clean) + beta*KL(p(clean) || p(adv)), '
             'trading clean accuracy for smoothness, with an attack that maximises the KL (Zhang et al. 2019); '
             'mart: boosted CE(adv) + beta*KL weighted by 1 - p_y(clean), stressing misclassified examples '
             '(Wang et al. 2020)')
    beta: Optional[float] = setting(
        None, group='adversarial', flag='--adv-beta', type=float, metavar='BETA',
        help="weight of the robust (KL) term of trades and mart; refused with nofrost and madry, which take "
             '--adv-weight', default_help="6, both papers' value")
    attack: str = setting(
        'pgd', group='adversarial', flag='--adv-attack', metavar='ATTACK',
        help='training attack, one of: pgd: --adv-steps projected gradient steps (steps+1 forward-backward passes '
             'per training step); fgsm-rs: one step of 1.25*eps from a uniform random start, projected (Wong et '
             'al. 2020; 2 passes, can overfit catastrophically); n-fgsm: one step of eps from uniform noise in the '
             '2*eps ball, not projected back (de Jorge et al. 2022; 2 passes, Linf only, no catastrophic '
             'overfitting reported)')

    def __post_init__(self) -> None:
        for what, value, accepted in (('method', self.method, METHODS), ('training attack', self.attack, TRAIN_ATTACKS),
                                      ('batch_mode', self.batch_mode, BATCH_MODES)):
            if value not in accepted:
                raise ValueError(f'Unknown {what} {value!r}; accepted: {", ".join(accepted)}.')
        self.eps = ThreatModel(self.eps, self.norm).eps  # parsed and checked (norm too) by the threat model
        if self.attack == 'n-fgsm' and self.norm != 'Linf':
            raise ValueError(f"attack='n-fgsm' is defined for the Linf norm only (de Jorge et al. 2022), got "
                             f"norm={self.norm!r}; use attack='fgsm-rs' or 'pgd' with L2.")
        self._check_steps()
        (self._check_beta if self.method in BETA_METHODS else self._check_adv_weight)()
        if self.attack in SINGLE_STEP_ATTACKS and not self.random_start:
            raise ValueError(f'attack={self.attack!r} starts from random noise by definition, got random_start=False; '
                             f"for plain FGSM use attack='pgd' with steps=1.")
        if self.step_size is not None:
            self.step_size = ThreatModel.parse_radius(self.step_size, 'step_size')
            limit = {'pgd': 1.0, 'fgsm-rs': 2.0}.get(self.attack)
            if limit is not None and self.step_size > limit * self.eps:
                bound = f'eps {self.eps:g}' if limit == 1 else f'{limit:g} eps = {limit * self.eps:g}'
                raise ValueError(f'step_size {self.step_size:g} is above {bound}: a larger step is only clipped '
                                 f'back onto the ball. Leave step_size unset for the default.')
            if self.step_size == 0 and self.eps > 0 and self.steps > 0:
                raise ValueError('step_size must be > 0.')
        check_positive_int('eps_warmup_steps', self.eps_warmup_steps, minimum=0)
        if self.attack_dtype is not None:
            try:  # any AMP name (bf16, fp16, ...), kept as torch's: the spelling args.yaml and checkpoints record
                dtype = amp_dtype(self.attack_dtype)
            except ValueError:
                raise ValueError(f'Unknown attack_dtype {self.attack_dtype!r}; accepted: {", ".join(ATTACK_DTYPES)} '
                                 f'(or None to follow the caller\'s autocast).') from None
            self.attack_dtype = None if dtype is None else str(dtype).replace('torch.', '')
        if not isinstance(self.random_start, bool):
            raise ValueError(f'random_start must be True or False, got {self.random_start!r}.')

    def _check_steps(self) -> None:
        """Default ``steps`` (1 for the single-step attacks, else 10) and check it."""
        single_step = self.attack in SINGLE_STEP_ATTACKS
        if self.steps is None:
            self.steps = 1 if single_step else 10
        check_positive_int('steps', self.steps, minimum=0)
        if single_step and self.steps > 1:
            raise ValueError(f'attack={self.attack!r} takes one step, got steps={self.steps}; leave steps unset, '
                             f"or use attack='pgd' for multi-step attacks.")

    def _check_beta(self) -> None:
        """trades / mart: weighted by ``beta`` (default 6), never by ``adv_weight``; both need adversarial examples,
        and trades a random start."""
        if self.adv_weight is not None:
            raise ValueError(f'adv_weight (lambda) {self.adv_weight!r} does not apply to method={self.method!r}, '
                             f'whose loss is weighted by beta; drop adv_weight (accepted with nofrost and madry).')
        if self.beta is None:
            self.beta = DEFAULT_BETA
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) \
                or not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f'beta must be a finite number >= 0, got {self.beta!r}.')
        self.beta = float(self.beta)
        if self.steps == 0:
            raise ValueError(f'steps=0 makes no adversarial examples, which method={self.method!r} needs; '
                             f'use steps >= 1.')
        if self.method == 'trades' and not self.random_start:
            raise ValueError("method='trades' needs random_start=True: the KL's input gradient is exactly zero "
                             "at the clean input, so an attack from it never moves.")

    def _check_adv_weight(self) -> None:
        """nofrost / madry: weighted by ``adv_weight`` (lambda; default 0.5, madry's 1), never by ``beta``."""
        if self.beta is not None:
            raise ValueError(f'beta {self.beta!r} does not apply to method={self.method!r}; beta is accepted '
                             f'with {" and ".join(BETA_METHODS)} (nofrost weights its loss by adv_weight).')
        if self.adv_weight is None:
            self.adv_weight = 1.0 if self.method == 'madry' else 0.5
        if isinstance(self.adv_weight, bool) or not isinstance(self.adv_weight, (int, float)) \
                or not math.isfinite(self.adv_weight) or not 0 <= self.adv_weight <= 1:
            raise ValueError(f'adv_weight (lambda) must be in [0, 1], got {self.adv_weight!r}.')
        self.adv_weight = float(self.adv_weight)
        if self.method == 'madry' and self.adv_weight != 1:
            raise ValueError(f"method='madry' trains on adversarial examples only (adv_weight 1), got "
                             f"adv_weight={self.adv_weight:g}; use method='nofrost' to mix in clean examples.")
        if self.steps == 0 and self.adv_weight > 0:
            raise ValueError(f'steps=0 makes no adversarial examples, but adv_weight={self.adv_weight:g} > 0 '
                             f'weights them; use steps >= 1, or adv_weight=0 for standard training.')

    @property
    def threat(self) -> ThreatModel:
        """The threat model: ``eps`` (parsed) in ``norm``."""
        return ThreatModel(self.eps, self.norm)

    @property
    def attack_step_size(self) -> float:
        """The attack step at the full eps: ``step_size`` or the method's / attack's default (see ``step_size``)."""
        if self.step_size is not None:
            return float(self.step_size)
        if self.attack in SINGLE_STEP_ATTACKS:
            return 1.25 * self.eps if self.attack == 'fgsm-rs' else self.eps
        rule = default_step_size if self.method in BETA_METHODS else nofrost_step_size
        return rule(self.eps, max(self.steps, 1))

    @property
    def step_fraction(self) -> float:
        """The attack step as a fraction of eps: what the attack holds, so it scales with the warmed-up eps."""
        return self.threat.fraction(self.attack_step_size)

    @property
    def attack_radius(self) -> float:
        """The radius the attack projects onto: eps, or for N-FGSM noise plus step (no projection back)."""
        return NFGSM_NOISE * self.eps + self.attack_step_size if self.attack == 'n-fgsm' else self.eps

    @property
    def radius_fraction(self) -> float:
        """``attack_radius`` as a fraction of eps (N-FGSM: 3 with the default step; else 1)."""
        return self.threat.fraction(self.attack_radius) if self.attack == 'n-fgsm' else 1.0

    @property
    def uses_clean_forward(self) -> bool:
        """Whether the training loss needs the clean examples' outputs (all but Madry-style training)."""
        return self.method in BETA_METHODS or self.adv_weight < 1

    def describe(self) -> str:
        """One line for logs: method, attack and weights."""
        if self.method == 'nofrost' and self.adv_weight == 0:
            return 'standard training (lambda 0)'
        attack = f'PGD-{self.steps}' if self.attack == 'pgd' else self.attack.upper()
        weight = f'beta {self.beta:g}' if self.method in BETA_METHODS else f'lambda {self.adv_weight:g}'
        threat = self.threat
        return f'{self.method}, {threat}, {attack} step {threat.format(self.attack_step_size)}, {weight}'

    def eps_at(self, step: int) -> float:
        """eps after ``step`` training batches (linear warm-up: the threat model scaled)."""
        warmup = min(1.0, step / self.eps_warmup_steps) if self.eps_warmup_steps > 0 else 1.0
        return self.threat.scaled(warmup).eps

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
