"""Pixels and normalisation, in one place.

Attacks, adversarial training and evaluation all work on images in [0, 1] ("pixels": the space the threat model
lives in) and normalise inside the model with ``PixelModel``. This module owns everything about that boundary:

* ``resolve_mean_std``: the normalisation a model expects. Explicit values win, then the timm
  ``pretrained_cfg`` of the model (under any DDP / DataParallel / ``torch.compile`` wrapper). There is no
  silent ImageNet default: a model without either is an error, since attacking a model trained on [0, 1]
  pixels through ImageNet normalisation measures the robustness of a different function.
* ``normalize`` / ``denormalize``: pixels <-> normalised inputs; ``to_float_pixels``: uint8 -> [0, 1] floats.
* ``AMP_DTYPES`` / ``amp_dtype``: the autocast dtype names the CLIs and configs accept.

It imports only torch, below every other module of the package.
"""
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = [
    'AMP_DTYPES', 'PixelModel', 'amp_dtype', 'denormalize', 'normalize', 'resolve_mean_std', 'to_float_pixels',
    'unwrap_model',
]

Stats = Union[Sequence[float], torch.Tensor]

# autocast dtypes by name: the CLI spellings (bf16 / fp16) and torch's (bfloat16 / float16)
AMP_DTYPES: Dict[str, torch.dtype] = {
    'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16, 'float16': torch.float16}

_PIXEL_HINT = ('mean=(0, 0, 0), std=(1, 1, 1) for a model that takes [0, 1] pixels, or the mean/std it was '
               'trained with (ImageNet: mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))')


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers: attacks never run through DDP hooks."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return unwrap_model(model.module)
    if type(model).__name__ == 'OptimizedModule' and hasattr(model, '_orig_mod'):
        return unwrap_model(model._orig_mod)
    return model


def _as_floats(name: str, value: Stats) -> Tuple[float, ...]:
    try:
        values = tuple(float(v) for v in torch.as_tensor(value, dtype=torch.float64).flatten().tolist())
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f'{name} must be a sequence of numbers, one per channel, got {value!r}.') from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f'{name} must be a non-empty sequence of finite numbers, one per channel, got {value!r}.')
    return values


def _checked(mean: Stats, std: Stats) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    mean_t, std_t = _as_floats('mean', mean), _as_floats('std', std)
    if len(mean_t) != len(std_t):
        raise ValueError(f'mean and std must have one value per channel each, got {len(mean_t)} and {len(std_t)} '
                         f'values: mean={mean_t}, std={std_t}.')
    if any(s <= 0 for s in std_t):
        raise ValueError(f'std must be > 0 in every channel, got std={std_t}.')
    return mean_t, std_t


def resolve_mean_std(model: Optional[nn.Module], mean: Optional[Stats] = None,
                     std: Optional[Stats] = None) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The normalisation ``model`` expects on its inputs, as ``(mean, std)`` tuples of floats.

    Explicit ``mean`` / ``std`` win; what is not given comes from the timm ``pretrained_cfg`` of the model
    (unwrapped from DDP / DataParallel / ``torch.compile``), or, for a ``PixelModel``, from the normalisation
    it applies. Never a silent default: a torchvision model or a custom module has no ``pretrained_cfg``.

    Raises:
        ValueError: neither given nor known from the model (the message says how to pass them), lengths that
            differ, or a std <= 0.
    """
    if mean is None or std is None:
        net = unwrap_model(model) if isinstance(model, nn.Module) else model
        if isinstance(net, PixelModel):
            cfg = {'mean': net.mean.flatten().tolist(), 'std': net.std.flatten().tolist()}
        else:
            cfg = getattr(net, 'pretrained_cfg', None) or {}
            if not isinstance(cfg, dict):
                cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else vars(cfg)
        mean = mean if mean is not None else cfg.get('mean')
        std = std if std is not None else cfg.get('std')
        if mean is None or std is None:
            missing = ' and '.join(n for n, v in (('mean', mean), ('std', std)) if v is None)
            raise ValueError(
                f'The input normalisation of {type(net).__name__} is unknown: it has no timm pretrained_cfg with '
                f'{missing}, and none was given. Pass mean= and std= explicitly: {_PIXEL_HINT}. '
                f'(Or wrap it: PixelModel(model, mean, std).)')
    return _checked(mean, std)


def _stat_tensors(mean: Stats, std: Stats, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """mean / std shaped ``(C, 1, 1)`` (broadcasting over CHW and NCHW) on ``like``'s device and dtype."""
    kw = dict(device=like.device, dtype=like.dtype)
    return torch.as_tensor(mean, **kw).reshape(-1, 1, 1), torch.as_tensor(std, **kw).reshape(-1, 1, 1)


def to_float_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images as floats in [0, 1]: uint8 (timm's un-normalised eval transform) divided by 255, floats unchanged.

    Raises:
        ValueError: another integer or boolean dtype (its pixel scale is unknown).
    """
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if not x.is_floating_point():
        raise ValueError(f'Images must be uint8 (0-255) or floats in [0, 1], got {x.dtype}.')
    return x


def normalize(pixels: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """``(pixels - mean) / std`` per channel (dim -3), for pixels in [0, 1] (uint8 is converted first)."""
    pixels = to_float_pixels(pixels)
    mean_t, std_t = _stat_tensors(mean, std, pixels)
    return (pixels - mean_t) / std_t


def denormalize(x: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """``x * std + mean`` per channel (dim -3): normalised inputs back to pixels (not clamped), in ``x``'s dtype."""
    mean_t, std_t = _stat_tensors(mean, std, x)
    return x * std_t + mean_t


def amp_dtype(name: Optional[Union[str, torch.dtype]]) -> Optional[torch.dtype]:
    """The autocast dtype called ``name`` (``'bf16'`` / ``'bfloat16'`` / ``'fp16'`` / ``'float16'``); None for
    None or ``'none'`` (full precision). A ``torch.bfloat16`` / ``torch.float16`` passes through.

    Raises:
        ValueError: any other value (the message lists the accepted names).
    """
    if name is None:
        return None
    if isinstance(name, torch.dtype) and name in AMP_DTYPES.values():
        return name
    if isinstance(name, str):
        key = name.strip().lower()
        if key == 'none':
            return None
        if key in AMP_DTYPES:
            return AMP_DTYPES[key]
    raise ValueError(f'Unknown AMP dtype {name!r}; accepted: none, {", ".join(AMP_DTYPES)}.')


class PixelModel(nn.Module):
    """``model((x - mean) / std)`` for images ``x`` in [0, 1]: the model attacks and pixel-space evaluation use.

    Args:
        model: A classifier taking normalised inputs.
        mean, std: Its normalisation, one value per channel; ``(0, 0, 0), (1, 1, 1)`` for a model that takes
            [0, 1] pixels itself.
    """

    def __init__(self, model: nn.Module, mean: Stats, std: Stats):
        super().__init__()
        mean, std = _checked(mean, std)
        self.model = model
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_model(cls, model: nn.Module, mean: Optional[Stats] = None,
                   std: Optional[Stats] = None) -> 'PixelModel':
        """Wrap ``model`` with ``resolve_mean_std(model, mean, std)``; a ``PixelModel`` is returned as it is.

        Raises:
            ValueError: as ``resolve_mean_std``; or a ``PixelModel`` with a different explicit mean / std.
        """
        if isinstance(model, PixelModel):
            own = (tuple(model.mean.flatten().tolist()), tuple(model.std.flatten().tolist()))
            given = resolve_mean_std(model, mean, std)
            if not all(len(g) == len(o) and all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(g, o))
                       for g, o in zip(given, own)):
                raise ValueError(f'The model is already a PixelModel normalising with mean={own[0]}, std={own[1]}; '
                                 f'the mean/std given ({mean}, {std}) differ. Pass one or the other.')
            return model
        return cls(model, *resolve_mean_std(model, mean, std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(x, self.mean, self.std))
