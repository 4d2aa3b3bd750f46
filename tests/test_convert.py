"""``convert_to_normfree``: timm, torchvision and custom ResNets, the generic path, weights and bad input."""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

from timm.layers import ScaledStdConv2d
from timm_nofrost import ConversionReport, NormFreeConversionError, convert_to_normfree, normfree_blocks

from custom_resnets import AttributeBlock, PreActBlock, SequentialBlock, TinyResNet, color_stripes

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _norms(model):
    return [n for n, m in model.named_modules() if isinstance(m, NORMS)]


def _plain_convs(model, report: ConversionReport):
    kept = tuple(name for name, _ in report.kept)
    return [n for n, m in model.named_modules()
            if type(m) is nn.Conv2d and not n.startswith(kept) and not any(f'.{k}.' in f'.{n}.' for k in kept)]


def _check_converted(model, source_state, blocks, transitions, x):
    report = model.normfree_report
    assert _norms(model) == []
    assert len(report.blocks) == blocks and sum(b.transition for b in report.blocks) == transitions
    assert report.unchanged == []
    # conv parameter names are where they were; only the normalizers' parameters are gone
    for name in report.convs:
        assert f'{name}.weight' in source_state
        assert f'{name}.weight' in model.state_dict() and f'{name}.gain' in model.state_dict()
    with torch.no_grad():
        out = model.eval()(x)
    assert torch.isfinite(out).all()
    return out


TIMM_CASES = [  # name, residual blocks, transition blocks, attention modules kept
    ('resnet18', 8, 3, 0),
    ('resnet50', 16, 4, 0),
    ('resnet26d', 8, 4, 0),  # deep stem, avg-pool downsample
    ('seresnet18', 8, 3, 8),
    ('ecaresnet26t', 8, 4, 8),
    ('resnext50_32x4d', 16, 4, 0),
    ('wide_resnet50_2', 16, 4, 0),
]


@pytest.mark.parametrize('name,blocks,transitions,attention', TIMM_CASES)
def test_timm_resnets(name, blocks, transitions, attention):
    model = timm.create_model(name, num_classes=7)
    source = copy.deepcopy(model.state_dict())
    converted = convert_to_normfree(model)
    assert converted is model  # converted in place, like timm's convert_sync_batchnorm
    x = torch.rand(2, 3, 64, 64)
    out = _check_converted(converted, source, blocks, transitions, x)
    assert len(converted.normfree_report.kept) == attention
    assert _plain_convs(converted, converted.normfree_report) == []
    # the timm API keeps working
    with torch.no_grad():
        assert torch.allclose(converted.forward_head(converted.forward_features(x)), out, atol=1e-5)
    assert converted.pretrained_cfg['architecture'] == name
    converted.reset_classifier(3)
    assert converted(x).shape == (2, 3)


def test_timm_features_only_model():
    model = timm.create_model('resnet26d', features_only=True, out_indices=(1, 3))
    convert_to_normfree(model)
    assert _norms(model) == [] and len(model.normfree_report.blocks) == 6  # layer4 pruned by out_indices
    assert [f.shape[1] for f in model(torch.rand(1, 3, 64, 64))] == model.feature_info.channels()


@pytest.mark.parametrize('name,blocks', [
    ('resnet18', 8), ('resnet34', 16), ('resnet50', 16), ('resnet101', 33), ('resnet152', 50),
    ('resnext50_32x4d', 16), ('wide_resnet50_2', 16),
])
def test_torchvision_resnets(name, blocks):
    model = getattr(torchvision.models, name)(num_classes=5)
    source = copy.deepcopy(model.state_dict())
    convert_to_normfree(model)
    _check_converted(model, source, blocks, 3 if name in ('resnet18', 'resnet34') else 4, torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize('block', [PreActBlock, SequentialBlock, AttributeBlock])
def test_custom_resnets(block):
    model = TinyResNet(block)
    source = copy.deepcopy(model.state_dict())
    convert_to_normfree(model)
    _check_converted(model, source, 4, 1, torch.rand(2, 3, 32, 32))
    report = model.normfree_report
    alpha = 0.2
    # beta = 1/sqrt(expected variance): 1, 1/sqrt(1+a^2), transition 1/sqrt(1+2a^2), then reset to 1+a^2
    assert [b.beta for b in report.blocks] == pytest.approx(
        [1.0, (1 + alpha ** 2) ** -0.5, (1 + 2 * alpha ** 2) ** -0.5, (1 + alpha ** 2) ** -0.5])
    assert [b.transition for b in report.blocks] == [False, False, True, False]


def test_preact_blocks_start_as_identity():
    """Zero-initialised last gain: a converted pre-activation identity block returns its input exactly."""
    model = convert_to_normfree(TinyResNet(PreActBlock))
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.layer1[1](x), x)
    assert model.normfree_report.blocks[1].last_conv == 'conv2'
    assert float(model.layer1[1].conv2.gain.abs().sum()) == 0.0


def test_identity_shortcut_is_not_scaled_and_branch_is():
    """With active gains, block(x) == x + alpha * branch(beta * x) for a pre-activation identity block."""
    model = convert_to_normfree(TinyResNet(PreActBlock), zero_init_last=False).eval()
    block = model.layer1[1]
    x = torch.randn(2, 16, 8, 8)
    beta, alpha = block.nf_beta, block.nf_alpha
    with torch.no_grad():
        h = torch.relu(x * beta)
        branch = block.conv2.forward(torch.relu(block.conv1.forward(h)))  # .forward: without the scale hooks
        assert torch.allclose(block(x), x + alpha * branch, atol=1e-6)
    assert type(block) is PreActBlock and block.nf_scaled_modules == {'beta': ['bn1'], 'alpha': 'conv2'}


def test_generic_path_vgg_and_mobilenet():
    vgg = convert_to_normfree(torchvision.models.vgg11_bn(num_classes=3))
    report = vgg.normfree_report
    assert _norms(vgg) == [] and len(report.convs) == 8 and report.blocks == []
    assert 'no residual blocks found' in report.summary()
    mobilenet = convert_to_normfree(torchvision.models.mobilenet_v2(num_classes=3))
    assert _norms(mobilenet) == [] and len(mobilenet.normfree_report.blocks) == 10  # use_res_connect blocks
    for model in (vgg, mobilenet):
        with torch.no_grad():
            assert torch.isfinite(model.eval()(torch.rand(1, 3, 32, 32))).all()


def test_keep_and_fresh_init():
    source = torchvision.models.resnet18()
    kept = convert_to_normfree(copy.deepcopy(source), init='keep')
    fresh = convert_to_normfree(copy.deepcopy(source), init='fresh')
    assert torch.equal(kept.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    assert not torch.equal(fresh.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    w = fresh.layer3[0].conv1.weight
    assert w.std().item() == pytest.approx(1 / math.sqrt(w[0].numel()), rel=0.1)  # fan-in Kaiming, linear gain
    assert fresh.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)
    for model in (kept, fresh):
        assert float(model.layer2[0].conv2.gain.abs().sum()) == 0.0  # last conv of each branch
        assert torch.all(model.layer2[0].conv1.gain == 1)
    active = convert_to_normfree(copy.deepcopy(source), init='keep', zero_init_last=False)
    assert torch.all(active.layer2[0].conv2.gain == 1)


def test_activation_gain_is_folded_into_the_convs():
    model = convert_to_normfree(torchvision.models.resnet18())
    conv = model.layer1[0].conv1
    assert isinstance(conv, ScaledStdConv2d)
    assert model.normfree_report.activation == 'relu'
    assert conv.scale == pytest.approx(1.7139588594436646 / math.sqrt(conv.weight[0].numel()))
    silu = convert_to_normfree(timm.create_model('resnet18', act_layer='silu'))
    assert silu.normfree_report.activation == 'silu'


def _train(model, steps=25, lr=0.1):
    torch.manual_seed(0)
    x, y = color_stripes()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize('make', [
    lambda: torchvision.models.resnet18(num_classes=4),
    lambda: TinyResNet(SequentialBlock),
    lambda: TinyResNet(PreActBlock),
], ids=['torchvision_resnet18', 'custom_post_act', 'custom_pre_act'])
def test_converted_models_train(make):
    torch.manual_seed(0)
    model = convert_to_normfree(make(), init='keep')
    losses = _train(model, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.25 * losses[0], losses


def test_normfree_blocks_lists_converted_and_native_blocks():
    model = convert_to_normfree(torchvision.models.resnet18())
    assert [n for n, _ in normfree_blocks(model)] == [b.name for b in model.normfree_report.blocks]
    assert len(normfree_blocks(timm.create_model('nf_resnet26_nofrost'))) == 8


# --- bad input -------------------------------------------------------------------------------------------


def test_not_a_module():
    with pytest.raises(TypeError, match='expects a torch.nn.Module, got dict'):
        convert_to_normfree({'conv': 1})


def test_model_without_normalization_is_returned_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = copy.deepcopy(model.state_dict())
    out = convert_to_normfree(model)
    assert out is model
    assert all(torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert not out.normfree_report.changed
    assert 'nothing to convert' in out.normfree_report.summary()


def test_ddp_wrapper_is_unwrapped(tmp_path):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/pg', rank=0, world_size=1)
    try:
        inner = TinyResNet(SequentialBlock)
        converted = convert_to_normfree(nn.parallel.DistributedDataParallel(inner))
        assert converted is inner and converted.normfree_report.unwrapped == 'DistributedDataParallel'
        assert _norms(converted) == [] and len(converted.normfree_report.blocks) == 4
    finally:
        dist.destroy_process_group()


def test_wrappers_are_unwrapped():
    inner = TinyResNet(SequentialBlock)
    converted = convert_to_normfree(nn.DataParallel(inner))
    assert converted is inner and converted.normfree_report.unwrapped == 'DataParallel'
    compiled = torch.compile(TinyResNet(SequentialBlock))
    converted = convert_to_normfree(compiled)
    assert isinstance(converted, TinyResNet) and 'torch.compile' in converted.normfree_report.unwrapped


class _WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.temporal = nn.Conv1d(8, 8, 3)
        self.bn1d = nn.BatchNorm1d(8)

    def forward(self, x):
        x = self.inorm(self.conv(x)).mean(dim=3)
        return self.bn1d(self.temporal(x))


def test_unsupported_structure_is_reported_and_strict_refuses():
    report = convert_to_normfree(_WithUnsupported()).normfree_report
    assert [name for name, _ in report.unchanged] == ['inorm', 'temporal']
    assert ('bn1d', 'BatchNorm1d') in report.norms_removed
    with pytest.raises(NormFreeConversionError, match=r"left 2 layer\(s\) unconverted: inorm: InstanceNorm2d"):
        convert_to_normfree(_WithUnsupported(), strict=True)


def test_group_and_layer_norm_only_when_asked():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU())
    report = convert_to_normfree(copy.deepcopy(model)).normfree_report
    assert report.unchanged == [('1', "GroupNorm kept: not a requested normalizer kind (norms=('batch',))")]
    converted = convert_to_normfree(copy.deepcopy(model), norms=('batch', 'group'))
    assert _norms(converted) == [] and converted.normfree_report.unchanged == []


@pytest.mark.parametrize('kwargs,match', [
    (dict(init='warm'), "Unknown init 'warm'; accepted: keep, fresh"),
    (dict(alpha=0.0), 'alpha must be a number in'),
    (dict(alpha=1.5), 'alpha must be a number in'),
    (dict(norms=('instance',)), r"Unknown normalizer kind\(s\) \['instance'\]"),
    (dict(act_layer='wiggle'), "Unknown activation 'wiggle'"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        convert_to_normfree(TinyResNet(SequentialBlock), **kwargs)
