"""The converter keeps the user's model: block classes, attributes, containers and methods stay; the residual
scalings are hooks on the block's own modules, visible as ``nf_alpha`` / ``nf_beta``. Where hooks cannot be
exact the forward is rewritten (reported; ``strict`` refuses)."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import timm_nofrost.convert.normfree as normfree
from timm_nofrost import NormFreeConversionError, convert_to_normfree, fuse_weight_standardization
from timm_nofrost.layers import ScaleInput, ScaleOutput

from custom_resnets import AttributeBlock, PreActBlock, SequentialBlock, TinyResNet

# every model the converter tests cover
MODELS = [
    *[(f'timm {n}', lambda n=n: timm.create_model(n, num_classes=5, drop_rate=0.2)) for n in (
        'resnet18', 'resnet50', 'resnet26d', 'seresnet18', 'ecaresnet26t', 'resnext50_32x4d', 'wide_resnet50_2')],
    *[(f'torchvision {n}', lambda n=n: getattr(torchvision.models, n)(num_classes=5)) for n in (
        'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d', 'wide_resnet50_2')],
    *[(f'custom {b.__name__}', lambda b=b: TinyResNet(b)) for b in (PreActBlock, SequentialBlock, AttributeBlock)],
]


def _convert(make, rewrite: bool, monkeypatch=None):
    if rewrite:
        monkeypatch.setattr(normfree, '_FORCE_REWRITE', True)
    torch.manual_seed(0)
    model = convert_to_normfree(make(), init='keep', zero_init_last=False)  # active branches: alpha matters
    if rewrite:
        monkeypatch.setattr(normfree, '_FORCE_REWRITE', False)
    return model


@pytest.mark.parametrize('make', [m for _, m in MODELS], ids=[n for n, _ in MODELS])
def test_hooked_conversion_computes_what_the_rewritten_one_did(make, monkeypatch):
    hooked, rewritten = _convert(make, False, monkeypatch), _convert(make, True, monkeypatch)
    blocks = hooked.normfree_report.blocks
    assert blocks and all(b.scaled_by == 'hooks' for b in blocks)
    assert all(b.scaled_by == 'rewrite' for b in rewritten.normfree_report.blocks)
    state, reference = hooked.state_dict(), rewritten.state_dict()
    assert set(state) == set(reference)  # the same parameter names (a GraphModule may reorder them)
    assert all(torch.equal(state[k], reference[k]) for k in state)
    source = [k for k in make().state_dict() if k in state]
    assert [k for k in state if k in source] == source  # and the hooked model keeps the user's order
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hooked.eval()(x), rewritten.eval()(x), rtol=1e-5, atol=1e-6)
        torch.manual_seed(1)
        train_out = hooked.train()(x)  # dropout: the same draws in the same order
        torch.manual_seed(1)
        torch.testing.assert_close(train_out, rewritten.train()(x), rtol=1e-5, atol=1e-6)


def test_torchvision_blocks_keep_class_attributes_and_containers():
    model = convert_to_normfree(torchvision.models.resnet18(num_classes=5))
    block, transition = model.layer1[0], model.layer2[0]
    assert isinstance(block, torchvision.models.resnet.BasicBlock) and type(block).__name__ == 'BasicBlock'
    assert transition.stride == 2 and type(transition.downsample) is nn.Sequential
    assert isinstance(transition.downsample[0], nn.Conv2d)
    # the scalings are visible on the block and the hooks read them there
    assert (transition.nf_alpha, transition.nf_beta) == (0.2, pytest.approx((1 + 2 * 0.2 ** 2) ** -0.5))
    assert transition.nf_scaled_modules == {'beta': ['conv1', 'downsample.0'], 'alpha': 'bn2'}
    assert any(isinstance(h, ScaleInput) for h in transition.conv1._forward_pre_hooks.values())
    assert any(isinstance(h, ScaleOutput) for h in transition.bn2._forward_hooks.values())
    report = model.normfree_report.summary()
    assert 'beta on conv1, downsample.0, alpha on bn2' in report


def test_timm_blocks_keep_their_methods_and_init_weights_works():
    model = convert_to_normfree(timm.create_model('resnet18', num_classes=5))
    block = model.layer1[0]
    assert type(block) is timm.models.resnet.BasicBlock and callable(block.zero_init_last)
    before = model.layer1[0].conv1.weight.clone()
    model.init_weights()  # timm's own re-initialisation: walks the blocks and calls zero_init_last()
    assert not torch.equal(before, model.layer1[0].conv1.weight)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.rand(1, 3, 32, 32))).all()


class DictBlock(nn.Module):
    """Layers in an nn.ModuleDict, a method of its own."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.ops = nn.ModuleDict({'a': nn.Conv2d(c, c, 3, 1, 1), 'bn': nn.BatchNorm2d(c), 'b': nn.Conv2d(c, c, 3, 1, 1)})

    def width(self) -> int:
        return self.ops['a'].out_channels

    def forward(self, x):
        return x + self.ops['b'](F.relu(self.ops['bn'](self.ops['a'](x))))


def test_module_dict_containers_and_methods_stay():
    model = convert_to_normfree(nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), DictBlock(), DictBlock()))
    block = model[1]
    assert type(block) is DictBlock and type(block.ops) is nn.ModuleDict and block.width() == 8
    assert isinstance(block.ops['a'], nn.Conv2d) and type(block.ops['bn']) is nn.Identity
    assert block.nf_scaled_modules == {'beta': ['ops.a'], 'alpha': 'ops.b'}
    with torch.no_grad():
        x = torch.rand(1, 8, 6, 6)
        branch = block.ops['b'].forward(F.relu(block.ops['a'].forward(x * block.nf_beta)))
        torch.testing.assert_close(block(x), x + block.nf_alpha * branch)


class FunctionalInputBlock(nn.Module):
    """The block input goes through a function first: a hook cannot scale what only the branch sees."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.bn1(self.conv1(F.relu(x)))))


def test_blocks_hooks_cannot_scale_are_rewritten_reported_and_refused_by_strict(monkeypatch):
    make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), FunctionalInputBlock(), FunctionalInputBlock())  # noqa
    model = _convert(make, False)
    report = model.normfree_report
    assert [b.scaled_by for b in report.blocks] == ['rewrite', 'rewrite']
    assert 'the block input goes through call_function relu' in report.blocks[0].rewrite_reason
    assert 'REWRITTEN (the block input goes through call_function relu)' in report.summary()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), _convert(make, True, monkeypatch).eval()(x))
    with pytest.raises(NormFreeConversionError, match=r'2 block\(s\) would lose their class .*1: rewritten'):
        convert_to_normfree(make(), strict=True)


class DataDependentBlock(nn.Module):
    """Python control flow on tensor values in the branch: torch.fx cannot trace it."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        if out.mean() > 0:  # data-dependent
            out = F.relu(out)
        else:
            out = -F.relu(-out)
        return x + self.bn2(self.conv2(out))


def test_data_dependent_control_flow_converts_and_keeps_its_behaviour():
    torch.manual_seed(0)
    model = convert_to_normfree(nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), DataDependentBlock(), DataDependentBlock()),
                                zero_init_last=False).eval()
    block = model[1]
    assert type(block) is DataDependentBlock and type(block.bn1) is nn.Identity
    report = model.normfree_report
    assert [b.name for b in report.blocks] == ['1', '2'] and report.unscaled == []
    assert block.nf_scaled_modules == {'beta': ['conv1'], 'alpha': 'bn2'}
    assert any('found on a sample input' in note for note in report.notes)
    # both paths of the `if` compute alpha * branch(beta * x) + x, the branch taking the path its data picks
    taken = set()
    magnitude = torch.rand(1, 8, 6, 6, generator=torch.Generator().manual_seed(0)) * 30
    for sign in (1.0, -1.0):  # conv1(-x) = -W x + b: large inputs of opposite signs take opposite paths
        x = sign * magnitude
        with torch.no_grad():
            out = block.conv1.forward(x * block.nf_beta)
            taken.add(bool(out.mean() > 0))
            out = F.relu(out) if out.mean() > 0 else -F.relu(-out)
            expected = x + block.nf_alpha * block.conv2.forward(out)
            torch.testing.assert_close(block(x), expected)
    assert taken == {True, False}  # both paths of the `if` were exercised
    assert convert_to_normfree(nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), DataDependentBlock()), strict=True)


class UntraceableFunctionalBlock(DataDependentBlock):
    """Untraceable and the branch ends in a function: neither hooks nor a rewrite can scale it."""

    def forward(self, x):
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        if out.mean() > 0:
            out = out * 0.5
        return x + torch.tanh(out)


def test_blocks_that_cannot_be_scaled_keep_their_forward_and_strict_refuses_them():
    make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), UntraceableFunctionalBlock())  # noqa: E731
    model = convert_to_normfree(make())
    block = model[1]
    assert type(block) is UntraceableFunctionalBlock and type(block.bn1) is nn.Identity
    assert not hasattr(block, 'nf_beta')
    assert [name for name, _ in model.normfree_report.unscaled] == ['1']
    assert 'the branch ends in function tanh' in model.normfree_report.summary()
    with pytest.raises(NormFreeConversionError, match='1 block\\(s\\) with convolutions have no residual scaling'):
        convert_to_normfree(make(), strict=True)


def test_fusing_folds_the_scalings_of_converted_blocks():
    model = convert_to_normfree(TinyResNet(PreActBlock), init='fresh', zero_init_last=False).eval()
    fused = fuse_weight_standardization(model)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    # alpha sat on conv2 (a conv): folded into it; beta sat on bn1 (an Identity): its hook stays, and works
    block = fused.layer1[1]
    assert not block.conv2._forward_hooks and any(isinstance(h, ScaleInput)
                                                 for h in block.bn1._forward_pre_hooks.values())
