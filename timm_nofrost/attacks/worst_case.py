"""The fast worst case: AutoAttack's white-box verdict at a fraction of its cost, and its black-box attacks only
when they are needed.

``FastWorstCase`` (attack name ``fast-worst-case``) runs APGD-CE (100 iterations) on the images it is given,
then targeted APGD (100 iterations) on the survivors, with the ``FAST_TARGETS`` targets ranked by linearised
distance to the decision boundary (MALT, Melamed et al. 2024) instead of AutoAttack's 9 ranked by logit; the
active set and early stopping apply throughout. ``escalate`` runs AutoAttack's own FAB-T and Square (the
official code, ``pyautoattack``) on what survives: the evaluation does that when a sanity check flags the
model, or when asked. The result is never AutoAttack's: reports name it ``fast-worst-case``.
"""
from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .apgd import APGD, APGDTargeted
from .autoattack import AutoAttack
from .base import Attack, AttackResult

__all__ = ['FastWorstCase', 'FAST_TARGETS', 'FAST_STAGES', 'ESCALATION']

FAST_TARGETS = 3  # targets of the targeted stage (chosen on half of benchmarks/bench_worst_case.py's pool)
FAST_STAGES = ('apgd-ce', f'apgd-t-100-{FAST_TARGETS}-linear')
ESCALATION = ('fab-t', 'square')  # AutoAttack's remaining attacks, official code, standard settings


class FastWorstCase(Attack):
    """APGD-CE, then linearly targeted APGD-T on its survivors; ``escalate`` adds official FAB-T and Square.

    Takes every ``Attack`` keyword (threat model, seed, AMP, active set, early stopping); ``targets``: the
    targeted stage's target count (``FAST_TARGETS``). ``ledger`` keeps, per stage, the images attacked and broken,
    forward and backward passes and seconds over all calls.
    """
    name = 'fast-worst-case'

    def __init__(self, model: nn.Module, eps: Optional[Any] = None, norm: Optional[str] = None,
                 targets: int = FAST_TARGETS, **kwargs: Any):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        self._kwargs = dict(kwargs, threat=self.threat)
        self._source = model
        self.stages: List[Tuple[str, Attack]] = [
            (FAST_STAGES[0], APGD(model, steps=100, loss='ce', **self._kwargs)),
            (f'apgd-t-100-{targets}-linear', APGDTargeted(model, steps=100, n_target_classes=targets,
                                                          ranking='linear', **self._kwargs))]
        self._escalation: Optional[List[Tuple[str, Attack]]] = None
        self.ledger: Dict[str, Dict[str, float]] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None,
                 eps: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                 first: Optional[AttackResult] = None) -> AttackResult:
        """Attack the rows of ``mask`` (default all); ``first``: APGD-CE's result on exactly these rows with
        these settings, already computed (an ``apgd-ce`` column of the same evaluation), reused instead of rerun
        (each row's outcome is the same alone or in any batch, so it is the result the stage would return)."""
        if target is not None:
            raise ValueError('fast-worst-case is untargeted (it picks its own targets); do not pass target.')
        return self._chain(self.stages, x, y, eps, mask, first)

    def escalate(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> AttackResult:
        """AutoAttack's FAB-T, then Square, official code and standard settings, on the rows of ``mask``."""
        if self._escalation is None:
            options = {k: v for k, v in self._kwargs.items() if k not in ('amp_dtype', 'cache_standardized_weights',
                                                                          'early_stop')}
            self._escalation = [(part, AutoAttack(self._source, parts=(part,), **options)) for part in ESCALATION]
        return self._chain(self._escalation, x, y, None, mask)

    def _chain(self, stages: List[Tuple[str, Attack]], x: torch.Tensor, y: torch.Tensor,
               eps: Optional[torch.Tensor], mask: Optional[torch.Tensor],
               first: Optional[AttackResult] = None) -> AttackResult:
        """Each stage on the survivors of the ones before; a row keeps the first stage's example that broke it."""
        alive = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if mask is None else mask.to(x.device)
        out: Optional[AttackResult] = None
        for i, (name, attack) in enumerate(stages):
            attacked = int(alive.sum())
            result = first if i == 0 and first is not None else attack(x, y, eps=eps, mask=alive)
            broken = alive & ~result.correct
            entry = self.ledger.setdefault(name, dict.fromkeys(('attacked', 'broken', 'forward', 'backward',
                                                                'seconds'), 0))
            for key, value in (('attacked', attacked), ('broken', int(broken.sum())),
                               ('forward', result.forward_passes), ('backward', result.backward_passes),
                               ('seconds', result.seconds)):
                entry[key] += value
            if out is None:  # a copy: a reused ``first`` belongs to its own column
                out = replace(result, correct=result.correct & alive)
            else:
                out.x_adv = torch.where(broken.view(-1, 1, 1, 1), result.x_adv, out.x_adv)
                if result.logits.shape == out.logits.shape:
                    out.logits = torch.where(broken[:, None], result.logits, out.logits)
                out.correct = out.correct & ~broken
                out.forward_passes += result.forward_passes
                out.backward_passes += result.backward_passes
                out.seconds += result.seconds
            alive = alive & ~broken
        return out
