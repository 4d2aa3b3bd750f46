"""The BatchNorm twin of a NoFrost model, for the paper's BN-AT baseline trained the same way."""
from typing import Any, Dict, Optional, Tuple

import timm
import torch.nn as nn

__all__ = ['bn_twin_name', 'create_bn_twin']

_TWINS = {**{f'nf_resnet{depth}_nofrost': f'resnet{depth}' for depth in (18, 26, 34, 50, 101)},
          'nf_resnet18_cifar_nofrost': 'resnet18'}


def bn_twin_name(model_name: str) -> Optional[str]:
    """timm's BatchNorm ResNet with the same depth as a NoFrost model, or None if there is no known twin."""
    return _TWINS.get(model_name.split('.', 1)[0])


def create_bn_twin(model_name: str, num_classes: int, model_kwargs: Optional[Dict[str, Any]] = None,
                   baseline: Optional[str] = None) -> Tuple[nn.Module, str]:
    """The BN-AT baseline for ``model_name``: its BatchNorm twin (or ``baseline``), with the same widths.

    The CIFAR-stem NoFrost ResNet-18 gets timm's ``resnet18`` with the same 3x3 stride-1 stem (of the NF model's
    ``stem_chs`` width when given) and no max-pool, so that both see 32x32 images at the same resolution.
    """
    name = baseline or bn_twin_name(model_name)
    if name is None:
        raise ValueError(f'No BatchNorm twin known for {model_name!r} (known: {", ".join(_TWINS)}); '
                         f'name one with --baseline-model.')
    kwargs: Dict[str, Any] = {'num_classes': num_classes}
    model_kwargs = model_kwargs or {}
    if baseline is None and 'channels' in model_kwargs:
        kwargs['channels'] = tuple(model_kwargs['channels'])
    model = timm.create_model(name, **kwargs)
    if baseline is None and model_name.startswith('nf_resnet18_cifar_nofrost'):
        stem = model.layer1[0].conv1.in_channels  # timm's stem width for its single-conv stem (64)
        if 'stem_chs' in model_kwargs:  # the NF model's stem width: rebuild the first block's input side
            stem = int(model_kwargs['stem_chs'])
            block, width = model.layer1[0], model.layer1[0].conv1.out_channels
            block.conv1 = nn.Conv2d(stem, width, kernel_size=3, stride=1, padding=1, bias=False)
            block.downsample = None if stem == width else nn.Sequential(
                nn.Conv2d(stem, width, kernel_size=1, bias=False), nn.BatchNorm2d(width))
        model.conv1 = nn.Conv2d(3, stem, kernel_size=3, stride=1, padding=1, bias=False)
        model.bn1 = nn.BatchNorm2d(stem)
        model.maxpool = nn.Identity()
        model.pretrained_cfg = {**model.pretrained_cfg, 'input_size': (3, 32, 32), 'mean': (0.4914, 0.4822, 0.4465),
                                'std': (0.2471, 0.2435, 0.2616), 'crop_pct': 1.0}
    return model, name
