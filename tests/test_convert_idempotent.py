"""Conversion leaves alone what it does not own: normalizer-free models, models converted before, models without
BatchNorm and convs outside residual blocks with no normalizer after them stay bit-identical, and say so."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import timm_nofrost.convert.normfree as normfree
from timm_nofrost import NormFreeConversionError, convert_to_normfree, normfree_blocks
from timm_nofrost.cli import main

from conftest import TINY_ARGS, randomize_gains
from custom_resnets import PreActBlock, TinyResNet
from test_convert import _WithUnsupported
from test_convert_identity import (
    MODELS, DataDependentBlock, DictBlock, FunctionalInputBlock, UntraceableFunctionalBlock)
from tiny_models import TinyCNN


def _nf(name: str, **kwargs):
    return lambda: randomize_gains(timm.create_model(name, **kwargs))  # active last gains: a second alpha shows


def _seq(block: type):
    return lambda: nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), block(), block())


NOTHING_TO_CONVERT = [  # normalizer-free or without BatchNorm; the names the report lists as skipped
    ('nf_resnet18_cifar_nofrost', _nf('nf_resnet18_cifar_nofrost', **TINY_ARGS), ['stem.conv'] + [
        f'stages.{s}.{b}' for s in range(4) for b in range(2)]),
    ('timm nf_resnet26', _nf('nf_resnet26', num_classes=5), ['stem.conv'] + [
        f'stages.{s}.{b}' for s in range(4) for b in range(2)]),
    ('vit', lambda: timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=5), ['patch_embed.proj']),
    ('tiny_cnn', TinyCNN, ['features.0', 'features.3']),
]

# every model the converter tests cover, and those with nothing to convert
TWICE = MODELS + [(n, m) for n, m, _ in NOTHING_TO_CONVERT] + [
    ('vgg11_bn', lambda: torchvision.models.vgg11_bn(num_classes=3)),
    ('mobilenet_v2', lambda: torchvision.models.mobilenet_v2(num_classes=3)),
    ('resnet26d features_only', lambda: timm.create_model('resnet26d', features_only=True, out_indices=(1, 3))),
    ('unsupported layers', _WithUnsupported),
    ('group norm', lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU())),
    *[(f'custom {b.__name__}', _seq(b)) for b in (
        DictBlock, FunctionalInputBlock, DataDependentBlock, UntraceableFunctionalBlock)],
    ('rewritten custom PreActBlock', lambda: TinyResNet(PreActBlock)),  # blocks become GraphModules
]


def _run(model: nn.Module) -> torch.Tensor:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(x)
    return torch.cat([t.flatten() for t in out]) if isinstance(out, list) else out


_ALREADY_NF = 'already normalizer-free'


def _assert_state_equal(model: nn.Module, state: dict) -> None:
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize('name,make', TWICE, ids=[n for n, _ in TWICE])
def test_converting_twice_is_converting_once(name, make, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(normfree, '_FORCE_REWRITE', name.startswith('rewritten'))
    once = convert_to_normfree(make(), zero_init_last=False)  # active branches: a second alpha / beta would show
    monkeypatch.setattr(normfree, '_FORCE_REWRITE', False)
    state = {k: v.clone() for k, v in once.state_dict().items()}
    expected = _run(once)
    # the same scalings a second time; then fresh weights and zero last gains, were anything converted
    for kwargs in (dict(zero_init_last=False), dict(init='fresh')):
        twice = convert_to_normfree(once, **kwargs)
        report = twice.normfree_report
        assert twice is once
        _assert_state_equal(twice, state)
        assert torch.equal(_run(twice), expected)
        assert (report.norms_removed, report.convs, report.blocks) == ([], [], [])
        assert {n for n, _ in normfree_blocks(twice)} <= {n for n, why in report.skipped if why == _ALREADY_NF}


@pytest.mark.parametrize('make,skipped', [c[1:] for c in NOTHING_TO_CONVERT], ids=[c[0] for c in NOTHING_TO_CONVERT])
def test_models_with_nothing_to_convert_stay_bit_identical_and_strict_refuses_them(make, skipped):
    torch.manual_seed(0)
    model = make()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _run(model)
    report = convert_to_normfree(model, init='fresh').normfree_report
    _assert_state_equal(model, state)
    assert torch.equal(_run(model), expected)
    assert not report.changed and 'nothing to convert' in report.summary()
    assert [n for n, _ in report.skipped] == skipped
    assert [why for _, why in report.skipped] == [
        'no normalization to remove' if n in ('patch_embed.proj', 'features.0', 'features.3') else
        _ALREADY_NF for n in skipped]
    with pytest.raises(NormFreeConversionError, match=rf'^strict conversion of {type(model).__name__}: nothing to '
                                                      r'convert, no batch normalization layer to remove'):
        convert_to_normfree(model, strict=True)
    _assert_state_equal(model, state)


def test_a_stem_with_no_norm_to_remove_stays_plain():
    torch.manual_seed(0)
    model = _seq(DictBlock)()
    stem = model[0].weight.clone()
    report = convert_to_normfree(model).normfree_report
    assert type(model[0]) is nn.Conv2d and torch.equal(model[0].weight, stem)
    assert report.skipped == [('0', 'no normalization to remove')]
    assert [b.name for b in report.blocks] == ['1', '2']
    assert report.convs == ['1.ops.a', '1.ops.b', '2.ops.a', '2.ops.b']


def test_convert_cli_refuses_a_model_with_nothing_to_convert(tmp_path, capsys):
    out = tmp_path / 'nf'
    assert main(['convert', '--model', 'nf_resnet18_cifar_nofrost', '--out', str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == '' and captured.err == (
        'timm-nofrost convert: error: nf_resnet18_cifar_nofrost: nothing to convert, no batch normalization layer '
        'to remove.\n')
    assert not out.exists()
