"""The official AutoAttack (Croce & Hein, 2020), standard version, through the ``pyautoattack`` package."""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .base import Attack

__all__ = ['AutoAttack', 'autoattack_available']

_INSTALL_HINT = ("AutoAttack needs the optional 'pyautoattack' package (the official implementation): "
                 "pip install 'timm-nofrost[eval]' or pip install pyautoattack.")


def autoattack_available() -> bool:
    try:
        import autoattack  # noqa: F401
        return True
    except ImportError:
        return False


class AutoAttack(Attack):
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) from the official implementation."""
    name = 'autoattack'

    def __init__(self, model: nn.Module, eps: Union[float, str] = 8 / 255, norm: str = 'Linf',
                 version: str = 'standard', **kwargs):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        try:
            from autoattack import AutoAttack as _OfficialAutoAttack
        except ImportError:
            raise ImportError(_INSTALL_HINT) from None
        self.version = version
        self._official = _OfficialAutoAttack(
            self.model, norm=norm, eps=self.eps, version=version, seed=self.seed, verbose=False)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> Tuple[torch.Tensor, float]:
        if target is not None:
            raise ValueError('AutoAttack is untargeted in its standard version; do not pass target.')
        self._official.device = x.device
        for attack in (getattr(self._official, n, None) for n in ('apgd', 'apgd_targeted', 'fab', 'square')):
            if attack is not None and hasattr(attack, 'device'):
                attack.device = x.device
        x_adv = self._official.run_standard_evaluation(x, y, bs=x.shape[0])
        return x_adv.detach(), 0.0
