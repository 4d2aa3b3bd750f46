"""What an evaluation measures and on which images, as data: ``Protocol`` and ``EvalSubset``.

Each field carries its ``timm-nofrost eval`` flag (``timm_nofrost.settings``); the study and the train command's
final evaluation build the same objects.
"""
from dataclasses import dataclass
from typing import Optional

from ..attacks import ATTACK_NAMES, NORMS
from ..settings import setting

__all__ = ['Protocol', 'EvalSubset']


@dataclass
class Protocol:
    """The attacks, threat models and checks of one evaluation, the same for every model it compares."""
    attacks: str = setting('clean,pgd-20,apgd-ce', group='protocol', metavar='LIST',
                           help=f'comma-separated attacks: {", ".join(ATTACK_NAMES)}')
    eps: str = setting('8/255', group='protocol', metavar='LIST',
                       help='comma-separated radii, numbers or fractions like 4/255')
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
    analysis: bool = setting(False, group='protocol',
                             help="add decision-margin and local-smoothness statistics (the paper's analysis)")


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
