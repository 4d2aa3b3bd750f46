"""``ThreatModel``: an attack's radius and norm, parsed, checked and labelled in one place. Step sizes and
N-FGSM's radius are fractions of its eps, so a scaled threat model (eps warm-up, eps curves) scales them."""
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Union

__all__ = ['NORMS', 'ThreatModel', 'parse_eps']

NORMS = ('Linf', 'L2')


@dataclass(frozen=True)
class ThreatModel:
    """The ``norm`` ball of radius ``eps`` around an image, in pixels in [0, 1]; ``eps`` may be text (``'8/255'``)."""
    eps: float
    norm: str = 'Linf'

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f'Unknown norm {self.norm!r}; accepted: {", ".join(NORMS)}.')
        eps = self.parse_radius(self.eps)
        if self.norm == 'Linf' and eps > 1:
            raise ValueError(f'Linf eps {eps:g} is above 1, the whole pixel range; give pixels in [0, 1] units, '
                             f'e.g. 8/255.')
        object.__setattr__(self, 'eps', eps)

    @staticmethod
    def parse_radius(value: Union[float, str], name: str = 'eps', positive: bool = False) -> float:
        """A length in pixels (radius, step size): a number or a fraction (``'8/255'``, ``'0.5/255'``), finite, >= 0
        (> 0 if ``positive``)."""
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            if isinstance(value, str) and '/' in value:
                numerator, denominator = value.split('/')
                length = float(Fraction(numerator) / Fraction(denominator))
            else:
                length = float(value)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f'Invalid {name} {value!r}: expected a number or a fraction like 8/255.') from None
        if positive and not 0 < length < math.inf:
            raise ValueError(f'{name} must be > 0 and finite, got {value!r}.')
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
        """A length (default: eps) as every report writes it: ``k/255`` on the L-inf 1/255 grid, else ``%g``."""
        value = self.eps if length is None else length
        if self.norm == 'Linf' and value > 0 and abs(value * 255 - round(value * 255)) < 1e-6:
            return f'{round(value * 255)}/255'
        return f'{value:g}'

    label = property(format, doc="The radius as reports and results JSON key it: ``'8/255'``, ``'0.1'``.")

    def __str__(self) -> str:
        return f'{self.norm} eps {self.label}'


parse_eps = ThreatModel.parse_radius  # the older name: a radius (``0.03137`` or ``'8/255'``) as a float
