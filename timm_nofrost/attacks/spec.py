"""Attacks by name, as the CLI and the evaluation harness spell them.

``clean``, ``fgsm``, ``fgsm-rs``, ``pgd`` / ``pgd-<steps>`` (optionally ``-margin`` / ``-dlr``), ``apgd-ce`` /
``apgd-dlr`` (optionally ``-<steps>``, default 100), ``apgd-t[-<steps>[-<targets>]][-logit|-linear]`` (100 steps,
9 targets ranked by logit as in AutoAttack unless given; ``-linear`` ranks them by the linearised distance to the
decision boundary, as in MALT), ``autoattack`` (official, standard), ``fab-t`` / ``square`` (one attack of the
official standard version, its settings), ``fast-worst-case`` (``FastWorstCase``: APGD-CE, then APGD-T on 3
linearly ranked targets; FAB-T and Square added by the evaluation when a sanity check flags the model).

Canonical names leave defaults out: ``apgd-t-100-9-logit`` is ``apgd-t``, ``apgd-t-50`` keeps its steps, and any
other target count or ranking is written in full, ``apgd-t-<steps>-<targets>`` plus ``-linear`` when linear.
"""
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch.nn as nn

from .apgd import APGD, APGDTargeted
from .autoattack import AutoAttack
from .base import Attack
from .pgd import FGSM, PGD
from .threat import ThreatModel
from .worst_case import FastWorstCase

__all__ = ['AttackSpec', 'parse_attack', 'build_attack', 'ATTACK_NAMES']

ATTACK_NAMES = ('clean', 'fgsm', 'fgsm-rs', 'pgd-<steps>[-margin|-dlr]', 'apgd-ce[-<steps>]', 'apgd-dlr[-<steps>]',
                'apgd-t[-<steps>[-<targets>]][-logit|-linear]', 'autoattack', 'fab-t', 'square', 'fast-worst-case')

_PGD = re.compile(r'^pgd(?:-(?P<steps>\d+))?(?:-(?P<loss>ce|margin|dlr))?$')
_APGD = re.compile(r'^apgd-(?P<loss>ce|dlr)(?:-(?P<steps>\d+))?$')
_APGDT = re.compile(r'^apgd-(?P<loss>t)(?:-(?P<steps>\d+)(?:-(?P<targets>\d+))?)?(?:-(?P<ranking>logit|linear))?$')


@dataclass(frozen=True)
class AttackSpec:
    name: str  # canonical, e.g. 'pgd-20'
    kind: str  # clean | fgsm | pgd | apgd | apgd-t | autoattack | fast
    steps: int = 0
    loss: str = 'ce'
    random_start: bool = True
    targets: int = 9  # apgd-t: target classes per example
    ranking: str = 'logit'  # apgd-t: how they are chosen, 'logit' (AutoAttack) or 'linear' (MALT)
    parts: Tuple[str, ...] = ()  # autoattack: only these of the official standard version's attacks

    @property
    def strength(self) -> int:
        """Rough ordering for sanity checks: single-step < iterative < APGD < AutoAttack."""
        return {'clean': 0, 'fgsm': 1, 'pgd': 2, 'apgd': 3, 'apgd-t': 3, 'fast': 3, 'autoattack': 4}[self.kind]


def parse_attack(name: str) -> AttackSpec:
    text = name.strip().lower()
    if text == 'clean':
        return AttackSpec('clean', 'clean')
    if text in ('fgsm', 'fgsm-rs'):
        return AttackSpec(text, 'fgsm', steps=1, random_start=text == 'fgsm-rs')
    if text in ('autoattack', 'aa'):
        return AttackSpec('autoattack', 'autoattack')
    if text in ('fab-t', 'square'):
        return AttackSpec(text, 'autoattack', parts=(text,))
    if text in ('fast-worst-case', 'fast'):
        return AttackSpec('fast-worst-case', 'fast')
    pgd, apgd = _PGD.match(text), _APGD.match(text) or _APGDT.match(text)
    if not (pgd or apgd):
        raise ValueError(f'Unknown attack {name!r}; accepted: {", ".join(ATTACK_NAMES)}.')
    match = pgd or apgd
    steps = int(match['steps'] or (10 if pgd else 100))
    loss = match['loss'] or 'ce'
    if steps < 1:
        raise ValueError(f'Invalid attack {name!r}: steps must be >= 1.')
    if pgd:
        return AttackSpec(f'pgd-{steps}' + ('' if loss == 'ce' else f'-{loss}'), 'pgd', steps=steps, loss=loss)
    canonical = f'apgd-{loss}' + ('' if steps == 100 else f'-{steps}')
    if loss == 't':
        targets, ranking = int(match['targets'] or 9), match['ranking'] or 'logit'
        if targets < 1:
            raise ValueError(f'Invalid attack {name!r}: targets must be >= 1; accepted: {", ".join(ATTACK_NAMES)}.')
        if (targets, ranking) != (9, 'logit'):
            canonical = f'apgd-t-{steps}-{targets}' + ('-linear' if ranking == 'linear' else '')
        return AttackSpec(canonical, 'apgd-t', steps=steps, loss='dlr', targets=targets, ranking=ranking)
    return AttackSpec(canonical, 'apgd', steps=steps, loss=loss)


def build_attack(spec: AttackSpec, model: nn.Module, eps: Optional[Union[float, str]] = None,
                 norm: Optional[str] = None, threat: Optional[ThreatModel] = None, **kwargs: Any) -> Optional[Attack]:
    """The attack object for ``spec`` (``None`` for ``clean``) in ``threat`` (or ``eps`` / ``norm``)."""
    options: Dict[str, Any] = dict(eps=eps, norm=norm, threat=threat, **kwargs)
    if spec.kind == 'clean':
        return None
    if spec.kind == 'fgsm':
        return FGSM(model, random_start=spec.random_start, **options)
    if spec.kind in ('pgd', 'apgd'):
        return (PGD if spec.kind == 'pgd' else APGD)(model, steps=spec.steps, loss=spec.loss, **options)
    if spec.kind == 'apgd-t':
        return APGDTargeted(model, steps=spec.steps, n_target_classes=spec.targets, ranking=spec.ranking, **options)
    if spec.kind == 'fast':
        return FastWorstCase(model, **options)
    for name in ('amp_dtype', 'cache_standardized_weights', 'early_stop'):
        options.pop(name, None)
    return AutoAttack(model, parts=spec.parts or None, **options)
