"""``ThreatModel``: an attack's radius and norm, parsed, checked and labelled in one place.

Radii are lengths in pixel units (images in [0, 1]), given as numbers (``0.03``) or fractions (``'8/255'``).
Attacks, the training config, the evaluation and every report hold a ``ThreatModel``; step sizes and
N-FGSM's projection radius are fractions of its ``eps``, so a scaled threat model (eps warm-up, the study's
eps curve) scales them too.
"""
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Union

__all__ = ['NORMS', 'ThreatModel', 'parse_eps']

NORMS = ('Linf', 'L2')


@dataclass(frozen=True)
class ThreatModel:
    """The ball around an image that adversarial examples may reach: radius ``eps`` in the ``norm``.

    ``eps`` may be given as text (``ThreatModel('8/255')``); it is stored as a float, finite and >= 0, at most
    1 (the whole pixel range) for L-inf.
    """
    eps: float
    norm: str = 'Linf'

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f'Unknown norm {self.norm!r}; accepted: {", ".join(NORMS)}.')
        eps = self.parse_radius(self.eps)
        if self.norm == 'Linf' and eps > 1:
            raise ValueError(f'Linf eps {eps:g} is above 1, the whole pixel range; give pixels in [0, 1] '
                             f'units, e.g. 8/255.')
        object.__setattr__(self, 'eps', eps)

    @classmethod
    def parse(cls, eps: Union[float, str], norm: str = 'Linf') -> 'ThreatModel':
        """``ThreatModel.parse('8/255', 'Linf')``: the same as the constructor, spelled for text."""
        return cls(eps, norm)

    @classmethod
    def resolve(cls, threat: Optional['ThreatModel'] = None, eps: Optional[Union[float, str]] = None,
                norm: Optional[str] = None) -> 'ThreatModel':
        """``threat``, or one from the older ``eps=`` / ``norm=`` keywords (default L-inf 8/255); not both."""
        if threat is None:
            return cls(8 / 255 if eps is None else eps, 'Linf' if norm is None else norm)
        if not isinstance(threat, cls):
            raise TypeError(f'threat must be a ThreatModel, got {type(threat).__name__}.')
        if eps is not None or norm is not None:
            raise ValueError(f'Give threat ({threat}) or eps / norm, not both (got eps={eps!r}, norm={norm!r}).')
        return threat

    @staticmethod
    def parse_radius(value: Union[float, int, str], name: str = 'eps') -> float:
        """A length in pixel units (a radius, a step size): a number or a fraction like ``'8/255'`` or
        ``'0.5/255'``, finite and >= 0. ``name`` is what error messages call it."""
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f'Invalid {name} {value!r}: expected a number or a fraction like 8/255.')
        try:
            if isinstance(value, str) and '/' in value:
                numerator, denominator = value.split('/')  # more than one '/': a ValueError
                length = float(Fraction(numerator) / Fraction(denominator))
            else:
                length = float(value)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f'Invalid {name} {value!r}: expected a number or a fraction like 8/255.') from None
        if not math.isfinite(length) or length < 0:
            raise ValueError(f'Invalid {name} {value!r}: must be a finite number >= 0.')
        return length

    def scaled(self, factor: float) -> 'ThreatModel':
        """The same norm at ``factor`` times the radius (eps warm-up, multiples of eps)."""
        return ThreatModel(self.eps * factor, self.norm)

    def fraction(self, length: float) -> float:
        """``length`` (e.g. a step size) as a fraction of eps, so it scales with the radius; 0 for eps 0."""
        return length / self.eps if self.eps > 0 else 0.0

    def format(self, length: Optional[float] = None) -> str:
        """A length in this threat model's units (default: eps): ``k/255`` for L-inf multiples of 1/255, else
        ``%g``. It names the radii in reports and results JSON (``'8/255'``, ``'0.1'``, ``'0.5'``)."""
        value = self.eps if length is None else length
        if self.norm == 'Linf' and value > 0 and abs(value * 255 - round(value * 255)) < 1e-6:
            return f'{round(value * 255)}/255'
        return f'{value:g}'

    @property
    def label(self) -> str:
        """The radius as reports key it: ``'8/255'``."""
        return self.format()

    def __str__(self) -> str:
        return f'{self.norm} eps {self.label}'


def parse_eps(value: Union[float, int, str]) -> float:
    """A radius (``0.03137`` or ``'8/255'``); see ``ThreatModel.parse_radius``."""
    return ThreatModel.parse_radius(value)
