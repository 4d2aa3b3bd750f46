"""The official AutoAttack (Croce & Hein, 2020) through the ``pyautoattack`` package.

Two spellings of the official code exist and both are accepted:

* ``pyautoattack`` on PyPI (``pip install pyautoattack``, imported as ``pyautoattack``): keyword-only
  constructor without ``verbose`` (it logs to the ``auto-attack`` logger), ``device`` defaulting to CPU,
  ``run_standard_evaluation(x, y, *, batch_size=...)`` returning ``(x_adv, y_adv)``;
* the GitHub package (``pip install git+https://github.com/fra31/auto-attack``, imported as ``autoattack``):
  ``verbose`` prints to stdout, ``device`` defaults to CUDA, ``run_standard_evaluation(x, y, bs=...)``
  returning ``x_adv``.

The wrapper moves the official attacks to the inputs' device at every call, seeds them with ``seed`` (the
official code reseeds torch's global generator; the caller's generator state is restored afterwards),
keeps them quiet unless ``verbose=True``, and limits the targeted attacks (APGD-T, FAB-T: 9 target classes
in the standard version) to the ``num_classes - 1`` classes that exist, as the official code indexes
past the logits otherwise.
"""
import importlib
import inspect
import sys
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .base import Attack, check_inputs, check_positive_int

__all__ = ['AutoAttack', 'autoattack_available', 'OFFICIAL_PARTS']

_INSTALL_HINT = ("AutoAttack needs the optional 'pyautoattack' package (the official implementation): "
                 "pip install 'timm-nofrost[eval]' or pip install pyautoattack.")
_VERSIONS = ('standard', 'plus', 'rand')
OFFICIAL_PARTS = ('apgd-ce', 'apgd-t', 'fab-t', 'square')  # the standard version's attacks, in its order


def _official_class() -> Any:
    """The official ``AutoAttack`` class: ``pyautoattack`` (PyPI) first, then ``autoattack`` (GitHub)."""
    for module in ('pyautoattack', 'autoattack'):
        try:
            return importlib.import_module(module).AutoAttack
        except ImportError:
            pass
    raise ImportError(_INSTALL_HINT)


def autoattack_available() -> bool:
    try:
        _official_class()
        return True
    except ImportError:
        return False


class AutoAttack(Attack):
    """AutoAttack from the official implementation; ``version='standard'``: APGD-CE, APGD-T, FAB-T, Square.

    Args:
        model, eps, norm, threat, mean, std, seed: As for every ``Attack``.
        version: ``'standard'`` (the reported one), ``'plus'`` or ``'rand'`` (randomised defences).
        parts: Run only these attacks of the standard version, in its order and with its settings (e.g.
            ``('fab-t', 'square')``: FAB-T with 9 targets, Square with 5,000 queries).
        square_queries: Square's query budget (5,000 in the standard version).
        batch_size: Images per official batch; defaults to the whole input.
        verbose: Let the official code report its progress.
    """
    name = 'autoattack'

    def __init__(self, model: nn.Module, eps: Optional[Union[float, str]] = None, norm: Optional[str] = None,
                 version: str = 'standard', batch_size: Optional[int] = None, verbose: bool = False,
                 parts: Optional[Sequence[str]] = None, square_queries: Optional[int] = None, **kwargs):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        official = _official_class()
        if version not in _VERSIONS:
            raise ValueError(f'Unknown AutoAttack version {version!r}; accepted: {", ".join(_VERSIONS)}.')
        unknown = sorted(set(parts or ()) - set(OFFICIAL_PARTS))
        if unknown or parts is not None and not parts:
            raise ValueError(f'Unknown AutoAttack parts {unknown or list(parts)}; accepted: a non-empty subset of '
                             f'{", ".join(OFFICIAL_PARTS)}.')
        if batch_size is not None:
            check_positive_int('batch_size', batch_size)
        self.version = version
        self.batch_size = batch_size
        self.verbose = verbose
        options = dict(norm=self.norm, eps=self.eps, version=version, seed=self.seed, device='cpu')
        accepted = inspect.signature(official.__init__).parameters
        if 'verbose' in accepted:  # GitHub package
            options['verbose'] = verbose
        if parts:  # the custom version with the standard one's settings (set below)
            options['version'] = 'custom'
            options['attacks' if 'attacks' in accepted else 'attacks_to_run'] = \
                [p for p in OFFICIAL_PARTS if p in parts]
        self._official = official(self.model, **options)
        if parts:
            self._official.apgd.n_restarts = self._official.fab.n_restarts = 1
            self._official.apgd_targeted.n_target_classes = self._official.fab.n_target_classes = 9
            self._official.square.n_queries = 5000
        if square_queries is not None:
            self._official.square.n_queries = check_positive_int('square_queries', square_queries)
        self._official.verbose = verbose  # pyautoattack: attribute only (debug-level log messages)
        run_parameters = inspect.signature(self._official.run_standard_evaluation).parameters
        self._batch_arg = 'batch_size' if 'batch_size' in run_parameters else 'bs'
        self._n_targets = {name: getattr(self._official, name).n_target_classes
                           for name in ('apgd_targeted', 'fab') if hasattr(getattr(self._official, name, None),
                                                                          'n_target_classes')}

    def _prepare(self, x: torch.Tensor) -> int:
        """Put the official attacks on ``x``'s device; fit the number of targets to the classes. The official code
        casts images to float32, so ``x`` (of the model's dtype) must be float32."""
        if x.dtype != torch.float32 and not torch.is_autocast_enabled(x.device.type):  # x has the model's dtype
            raise TypeError(f'AutoAttack (the official code) computes in float32, got {x.dtype} images and model: '
                            f'cast both with .float().')
        official = self._official
        official.device = x.device
        for name in ('apgd', 'apgd_targeted', 'fab', 'square'):
            attack = getattr(official, name, None)
            if attack is not None and hasattr(attack, 'device'):
                attack.device = x.device
        n_classes = self.num_classes(x)
        runs = set(getattr(official, 'attacks_to_run', None) or ())
        need = 4 if 'apgd-t' in runs else 3 if 'apgd-dlr' in runs else 2
        if n_classes < need:
            raise ValueError(f'AutoAttack ({self.version}) needs at least {need} classes (its DLR losses divide by '
                             f'gaps between the top-3 or top-4 logits); the model has {n_classes}.')
        for name, default in self._n_targets.items():
            getattr(official, name).n_target_classes = max(1, min(default, n_classes - 1))
        return n_classes

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
                active: torch.Tensor) -> Tuple[torch.Tensor, float]:
        if target is not None:
            raise ValueError('AutoAttack is untargeted (it picks its own targets); do not pass target.')
        check_inputs(x, y, self._prepare(x))  # label range: the official code would fail deep inside
        # the official code draws its own random starts for the rows it is given, so rows run alone or in a
        # cascade may start elsewhere than in a full run (our own attacks do not have this caveat)
        idx = active.nonzero()[:, 0]
        x_adv = x.clone()
        x_adv[idx] = self._official_run(x[idx], y[idx])
        return x_adv, 0.0

    def _official_run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = {self._batch_arg: self.batch_size or x.shape[0]}
        cuda = [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
            if x.device.type == 'cuda' else []
        trace = sys.gettrace()  # the official dynamic-defence check calls sys.settrace(None)
        try:
            with torch.random.fork_rng(devices=cuda):  # the official code reseeds the global generators
                out = self._official.run_standard_evaluation(x.float(), y.long(), **batch)
        finally:
            if sys.gettrace() is not trace:
                sys.settrace(trace)
        return (out[0] if isinstance(out, (tuple, list)) else out).detach().to(x.dtype)  # pyautoattack: (x, y)
