"""What an evaluation measures and on which images, as data: ``Protocol`` and ``EvalSubset``.

Each field carries its ``timm-nofrost eval`` flag (``timm_nofrost.settings``); the study and the train command's
final evaluation build the same objects.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from ..attacks import ATTACK_NAMES, NORMS, AttackSpec, ThreatModel, parse_attack
from ..attacks.base import check_positive_int
from ..settings import setting

__all__ = ['Protocol', 'EvalSubset']


@dataclass
class Protocol:
    """The attacks, threat models and checks of one evaluation, the same for every model it compares."""
    attacks: Union[str, Sequence[str]] = setting('clean,pgd-20,apgd-ce', group='protocol', metavar='LIST',
                                                 help=f'comma-separated attacks: {", ".join(ATTACK_NAMES)}')
    eps: Union[str, float, Sequence[Union[str, float]]] = setting(
        '8/255', group='protocol', metavar='LIST', help='comma-separated radii, numbers or fractions like 4/255')
    norm: str = setting('Linf', group='protocol', choices=NORMS, help='threat model')
    cascade: bool = setting(False, group='protocol', flag='--worst-case-only',
                            help="cascade (AutoAttack's protocol): each attack runs only on the images that survived "
                                 'the previous ones, so later attacks cost less; the worst case is identical to the '
                                 'full run, per-attack columns say "not measured"')
    batch_size: int = setting(64, group='protocol', type=int, metavar='N',
                              help='images per batch (random starts are drawn per batch)')
    seed: int = setting(0, group='protocol', type=int, metavar='SEED', help='seed for the subset and random starts')
    sanity: bool = setting(True, group='protocol', negate=True,
                           help='skip the sanity checks (not recommended)')
    sanity_examples: int = setting(32, group='protocol', type=int, metavar='N',
                                   help='correctly classified images the sanity checks attack')
    active_set: bool = setting(True, group='protocol', negate=True,
                               help='attack every image for every step, even once it is fooled (same outcomes, more '
                                    'work; for timing comparisons)')
    early_stop: bool = setting(True, group='protocol', negate=True,
                               help="keep attacking an image after its PGD iterate repeats an earlier one (same "
                                    'outcomes, more work; early stopping is off by itself on non-deterministic '
                                    'devices and for models that draw random numbers)')
    escalate: bool = setting(False, group='protocol',
                             help="fast-worst-case: run AutoAttack's FAB-T and Square on its survivors even when no "
                                  'sanity check flags the model (they always run when one does)')
    analysis: bool = setting(False, group='protocol',
                             help="add decision-margin and local-smoothness statistics (the paper's analysis)")

    def __post_init__(self) -> None:
        if not self.specs:
            raise ValueError('No attacks given.')
        if not self.threats:
            raise ValueError('No eps given.')
        for name in ('batch_size', 'sanity_examples'):
            check_positive_int(name, getattr(self, name))

    @property
    def specs(self) -> List[AttackSpec]:
        """The attacks, parsed (a ValueError names an unknown one)."""
        return [parse_attack(a) for a in _as_list(self.attacks)]

    @property
    def threats(self) -> Tuple[ThreatModel, ...]:
        """The threat models, smallest radius first."""
        return tuple(sorted({ThreatModel(e, self.norm) for e in _as_list(self.eps)}, key=lambda t: t.eps))


def _as_list(value: Union[str, float, Sequence]) -> List:
    if isinstance(value, str):
        return [v for v in (s.strip() for s in value.split(',')) if v]
    if isinstance(value, (int, float)):
        return [value]
    return list(value)


@dataclass
class EvalSubset:
    """Which images of a data source are evaluated."""
    split: str = setting('validation', group='data', metavar='SPLIT',
                         help='split to evaluate: validation, train, or a subfolder name such as test')
    n_examples: Optional[int] = setting(None, group='data', type=int, metavar='N',
                                        help='evaluate a fixed seeded random subset of N images (indices recorded in '
                                             'the report)', default_help='all')
    subset_ids: Optional[str] = setting(None, group='data', metavar='FILE',
                                        help="file with one dataset index or relative image path per line, e.g. "
                                             "RobustBench's 5,000-image ImageNet list; overrides --n-examples")
