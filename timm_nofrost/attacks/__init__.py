"""Adversarial attacks in pixel space: PGD, FGSM, APGD (CE / DLR / targeted), official AutoAttack.

One attack loop serves evaluation and adversarial training: every attack runs the model in eval mode with
frozen parameters and input-only gradients (``attack_mode``), on images in [0, 1] normalised inside
``PixelModel``, in a ``ThreatModel`` (radius and norm).
"""
from .threat import NORMS, ThreatModel, parse_eps
from .base import Attack, AttackResult, PixelModel, attack_mode, check_inputs, unwrap_model
from .losses import LOSSES, cross_entropy, dlr, margin, targeted_dlr
from .pgd import FGSM, PGD, default_step_size, nofrost_step_size
from .apgd import APGD, APGDTargeted, apgd_checkpoints
from .autoattack import AutoAttack, autoattack_available
from .worst_case import ESCALATION, FAST_STAGES, FAST_TARGETS, FastWorstCase
from .spec import ATTACK_NAMES, AttackSpec, build_attack, parse_attack
