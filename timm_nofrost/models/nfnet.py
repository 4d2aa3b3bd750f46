""" NoFrost model family: normalizer-free pre-activation ResNets for adversarial training.

Paper: `Removing Batch Normalization Boosts Adversarial Training` - https://arxiv.org/abs/2207.01156
Authors' code: https://github.com/amazon-research/normalizer-free-robust-training

The bottleneck models (26 / 50 / 101) are timm's own ``NormFreeNet`` with the ``nf_resnet*`` configs,
so ``nf_resnet50_nofrost`` is numerically the authors' model and loads their checkpoints as they are.
ResNet-18 / 34 need basic (two 3x3 conv) blocks, which ``NormFreeNet`` does not build:
``NormFreeBasicResNet`` builds them with the same signal-propagation rules and inherits every
forward / feature / pruning method of ``NormFreeNet``, so the timm API is the same for the whole family.
"""
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, ScaledStdConv2d, calculate_drop_path_rates, get_act_layer, get_attn
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.nfnet import DownsampleAvg, NfCfg, NormFreeNet, create_stem
from timm.models.nfnet import _nonlin_gamma, model_cfgs as timm_nf_cfgs

from ..layers import make_fusable
from ._pretrained import HF_HUB_ORG, build_nofrost_model

__all__ = ['NormFreeBasicBlock', 'NormFreeBasicResNet', 'NoFrostCfg', 'NOFROST_RECIPE_DEFAULTS', 'HF_HUB_ORG']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

# regularisation of the authors' ImageNet recipe (PGDAT.py --drop 0.25 --drop_path 0.1)
NOFROST_RECIPE_DEFAULTS: Dict[str, float] = dict(drop_rate=0.25, drop_path_rate=0.1)

@dataclass
class NoFrostCfg(NfCfg):
    """``NfCfg`` for basic-block NF-ResNets; adds a stride-1 3x3 stem for 32x32 inputs (``'3x3_s1'``)."""
    stem_type: str = '7x7_pool'
    act_layer: str = 'relu'


class NormFreeBasicBlock(nn.Module):
    """Pre-activation normalizer-free basic block (two 3x3 convs).

    ``out = alpha * branch(beta * act(x)) + shortcut``: beta = 1/sqrt(expected variance of x) keeps the
    branch input at unit variance, alpha sets how much variance each block adds, and the zero-initialised
    gain of the last conv makes every block start as the identity.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            alpha: float = 0.2,
            beta: float = 1.0,
            attn_layer: Optional[Callable] = None,
            attn_gain: float = 2.0,
            act_layer: Callable = nn.ReLU,
            conv_layer: Callable = ScaledStdConv2d,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        first_dilation = first_dilation or dilation
        self.alpha = alpha
        self.beta = beta
        self.attn_gain = attn_gain
        if in_chs != out_chs or stride != 1 or dilation != first_dilation:
            self.downsample = DownsampleAvg(
                in_chs, out_chs, stride=stride, dilation=dilation, first_dilation=first_dilation,
                conv_layer=conv_layer, **dd)
        else:
            self.downsample = None
        self.act1 = act_layer()
        self.conv1 = conv_layer(in_chs, out_chs, 3, stride=stride, dilation=first_dilation, **dd)
        self.act2 = act_layer(inplace=True)
        self.conv2 = conv_layer(out_chs, out_chs, 3, dilation=dilation, gain_init=0., **dd)
        self.attn_last = attn_layer(out_chs, **dd) if attn_layer is not None else None
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x) * self.beta
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(out))
        if self.attn_last is not None:
            out = self.attn_gain * self.attn_last(out)
        out = self.drop_path(out)
        return out * self.alpha + shortcut


def _create_basic_stem(
        in_chs: int,
        out_chs: int,
        stem_type: str,
        conv_layer: Callable,
        act_layer: Callable,
        **dd: Any,
) -> Tuple[nn.Sequential, int, Dict[str, Any]]:
    if stem_type == '3x3_s1':
        # CIFAR-style stem: full resolution into the first stage
        stem = nn.Sequential(OrderedDict(conv=conv_layer(in_chs, out_chs, kernel_size=3, stride=1, **dd)))
        return stem, 1, dict(num_chs=out_chs, reduction=1, module='stem.conv')
    return create_stem(in_chs, out_chs, stem_type, conv_layer=conv_layer, act_layer=act_layer, **dd)


class NormFreeBasicResNet(NormFreeNet):
    """Normalizer-free pre-activation ResNet with basic blocks (NF-ResNet-18 / 34 and the 32x32 variant).

    Only construction differs from timm's ``NormFreeNet``: the module layout (``stem``, ``stages``,
    ``final_conv``, ``final_act``, ``head``) is the same, so ``forward_features``, ``forward_head``,
    ``forward_intermediates``, ``prune_intermediate_layers``, ``reset_classifier`` and gradient
    checkpointing come from ``NormFreeNet`` unchanged.
    """

    def __init__(
            self,
            cfg: NoFrostCfg,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            output_stride: int = 32,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
            **kwargs: Any,
    ):
        nn.Module.__init__(self)  # NormFreeNet.__init__ builds bottleneck blocks; the layout is built here
        dd = {'device': device, 'dtype': dtype}
        cfg = replace(cfg, **kwargs)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        if cfg.act_layer not in _nonlin_gamma:
            raise ValueError(f'Unsupported act_layer {cfg.act_layer!r}; accepted: {", ".join(sorted(_nonlin_gamma))}.')
        act_layer = get_act_layer(cfg.act_layer)
        # the activation's gain for unit-Gaussian inputs is folded into the weight-standardised conv scale
        conv_layer = partial(ScaledStdConv2d, gamma=_nonlin_gamma[cfg.act_layer], eps=cfg.std_conv_eps)
        attn_layer = partial(get_attn(cfg.attn_layer), **(cfg.attn_kwargs or {})) if cfg.attn_layer else None

        stem_chs = cfg.stem_chs or cfg.channels[0]
        self.stem, stem_stride, stem_feat = _create_basic_stem(
            in_chans, stem_chs, cfg.stem_type, conv_layer=conv_layer, act_layer=act_layer, **dd)
        self.feature_info = [stem_feat]
        self.stem_feat_idx = [n for n, _ in self.stem.named_children()].index(stem_feat['module'].split('.', 1)[1])

        self.stages, self.num_features = self._build_stages(
            cfg, stem_chs, stem_stride, output_stride, drop_path_rate,
            attn_layer=attn_layer, attn_gain=cfg.attn_gain, act_layer=act_layer, conv_layer=conv_layer, **dd)
        self.final_conv = nn.Identity()
        self.final_act = act_layer(inplace=False)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.head_hidden_size = self.head.num_features
        self._init_weights()

    def _build_stages(self, cfg: NoFrostCfg, in_chs: int, stem_stride: int, output_stride: int, drop_path_rate: float,
                      **block_kwargs: Any) -> Tuple[nn.Sequential, int]:
        """The stages of basic blocks and their output channels; each stage's ``feature_info`` is appended.

        Each block's beta is 1/sqrt of the expected variance of its input, tracked as in NF-ResNets.
        """
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, cfg.depths, stagewise=True)
        prev_chs = in_chs
        net_stride = stem_stride
        dilation = 1
        expected_var = 1.0
        stages = []
        for stage_idx, depth in enumerate(cfg.depths):
            # a pooled or full-resolution stem feeds the first stage at stride 1
            stride = 2 if stage_idx > 0 or stem_stride == 2 else 1
            if net_stride >= output_stride and stride > 1:
                dilation *= stride
                stride = 1
            net_stride *= stride
            first_dilation = 1 if dilation in (1, 2) else 2
            out_chs = cfg.channels[stage_idx]
            blocks = []
            for block_idx in range(depth):
                blocks.append(NormFreeBasicBlock(
                    prev_chs, out_chs, stride=stride if block_idx == 0 else 1, dilation=dilation,
                    first_dilation=first_dilation, alpha=cfg.alpha, beta=expected_var ** -0.5,
                    drop_path_rate=drop_path_rates[stage_idx][block_idx], **block_kwargs))
                if block_idx == 0:
                    expected_var = 1.  # a transition block's shortcut is computed from the unit-variance input
                expected_var += cfg.alpha ** 2
                first_dilation = dilation
                prev_chs = out_chs
            self.feature_info.append(dict(num_chs=prev_chs, reduction=net_stride, module=f'stages.{stage_idx}'))
            stages.append(nn.Sequential(*blocks))
        return nn.Sequential(*stages), prev_chs

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and 'fc' in name:
                nn.init.normal_(module.weight, 0., .01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_in', nonlinearity='linear')
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


_BASIC_CHANNELS = (64, 128, 256, 512)
nofrost_cfgs: Dict[str, NfCfg] = dict(
    nf_resnet18_nofrost=NoFrostCfg(depths=(2, 2, 2, 2), channels=_BASIC_CHANNELS, stem_chs=64),
    nf_resnet34_nofrost=NoFrostCfg(depths=(3, 4, 6, 3), channels=_BASIC_CHANNELS, stem_chs=64),
    nf_resnet18_cifar_nofrost=NoFrostCfg(
        depths=(2, 2, 2, 2), channels=_BASIC_CHANNELS, stem_chs=64, stem_type='3x3_s1'),
    # the authors' model is timm's nf_resnet50: reuse timm's configs so the two never drift apart
    nf_resnet26_nofrost=timm_nf_cfgs['nf_resnet26'],
    nf_resnet50_nofrost=timm_nf_cfgs['nf_resnet50'],
    nf_resnet101_nofrost=timm_nf_cfgs['nf_resnet101'],
)


def _create_nofrost(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a NoFrost model with the authors' regularisation defaults (overridable)."""
    model_cfg = nofrost_cfgs[variant]
    model_cls = NormFreeBasicResNet if isinstance(model_cfg, NoFrostCfg) else NormFreeNet
    model = build_nofrost_model(model_cls, variant, pretrained, model_cfg=model_cfg,
                                feature_cfg=dict(flatten_sequential=True), **{**NOFROST_RECIPE_DEFAULTS, **kwargs})
    return make_fusable(model)  # adds fuse() to the convs for reparameterize_model; numerics unchanged


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    """The authors' ImageNet evaluation transforms: 224 center crop of 256, bilinear."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:2207.01156',
        'paper_name': 'Removing Batch Normalization Boosts Adversarial Training',
        'origin_url': 'https://github.com/amazon-research/normalizer-free-robust-training',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # NoFrost: the authors' best-robust-accuracy checkpoint (best_RA.pth), PGD-10 AT on ImageNet-1k
    'nf_resnet50_nofrost.at_in1k': _cfg(
        hf_hub_id=f'{HF_HUB_ORG}/nf_resnet50_nofrost.at_in1k',
        description='NoFrost: normalizer-free PGD-10 adversarial training (L-inf 8/255) on ImageNet-1k.',
        notes=('Paper: 74.06% clean / 23.56% PGD-20 at L-inf 8/255 (authors\' README: 22.45%).',
               'Independent re-evaluation at 8/255: APGD-CE-20 12.0%, APGD-CE-100 5.3%, AutoAttack 1.3%.')),
    # NoFrost*: adds DeepAugment and texture-debiasing augmentations (authors' CRT training script)
    'nf_resnet50_nofrost.at_deepaug_in1k': _cfg(
        hf_hub_id=f'{HF_HUB_ORG}/nf_resnet50_nofrost.at_deepaug_in1k',
        description='NoFrost*: NoFrost with DeepAugment and texture-debiased augmentations on ImageNet-1k.'),
    'nf_resnet18_nofrost': _cfg(),
    'nf_resnet26_nofrost': _cfg(),
    'nf_resnet34_nofrost': _cfg(),
    'nf_resnet101_nofrost': _cfg(),
    'nf_resnet18_cifar_nofrost': _cfg(
        num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0,
        mean=CIFAR10_MEAN, std=CIFAR10_STD),
})


@register_model
def nf_resnet18_nofrost(pretrained: bool = False, **kwargs: Any) -> NormFreeBasicResNet:
    """NF-ResNet-18 (basic blocks, 7x7 stem + max-pool) for NoFrost training."""
    return _create_nofrost('nf_resnet18_nofrost', pretrained=pretrained, **kwargs)


@register_model
def nf_resnet26_nofrost(pretrained: bool = False, **kwargs: Any) -> NormFreeNet:
    """NF-ResNet-26 (bottleneck blocks, timm's nf_resnet26) for NoFrost training."""
    return _create_nofrost('nf_resnet26_nofrost', pretrained=pretrained, **kwargs)


@register_model
def nf_resnet34_nofrost(pretrained: bool = False, **kwargs: Any) -> NormFreeBasicResNet:
    """NF-ResNet-34 (basic blocks, 7x7 stem + max-pool) for NoFrost training."""
    return _create_nofrost('nf_resnet34_nofrost', pretrained=pretrained, **kwargs)


@register_model
def nf_resnet50_nofrost(pretrained: bool = False, **kwargs: Any) -> NormFreeNet:
    """NF-ResNet-50, the NoFrost paper's model (timm's nf_resnet50) with the authors' weights."""
    return _create_nofrost('nf_resnet50_nofrost', pretrained=pretrained, **kwargs)


@register_model
def nf_resnet101_nofrost(pretrained: bool = False, **kwargs: Any) -> NormFreeNet:
    """NF-ResNet-101 (bottleneck blocks, timm's nf_resnet101) for NoFrost training."""
    return _create_nofrost('nf_resnet101_nofrost', pretrained=pretrained, **kwargs)


@register_model
def nf_resnet18_cifar_nofrost(pretrained: bool = False, **kwargs: Any) -> NormFreeBasicResNet:
    """NF-ResNet-18 for 32x32 inputs (3x3 stride-1 stem, no max-pool), the usual CIFAR AT backbone."""
    return _create_nofrost('nf_resnet18_cifar_nofrost', pretrained=pretrained, **kwargs)
