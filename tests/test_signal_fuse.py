"""Signal propagation through converted networks, and fusing weight standardisation for deployment."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from timm.models import reparameterize_model

from timm_nofrost import convert_to_normfree, fuse_weight_standardization, signal_propagation
from timm_nofrost.layers import WS_CONV_TYPES, FusedNormFreeBlock

from conftest import randomize_gains

# documented band (docs/converter.md): average channel variance and squared channel mean of every residual
# block output of a converted ResNet-50 / 101 at initialisation, for N(0, 1) inputs
VAR_BAND = (0.1, 2.0)
MEAN_SQ_MAX = 2.0


@pytest.fixture(scope='module')
def gaussian_batch():
    return torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('name', ['resnet50', 'resnet101'])
@pytest.mark.parametrize('init,zero_init_last', [('fresh', True), ('keep', True), ('fresh', False)])
def test_converted_resnets_stay_in_band(name, init, zero_init_last, gaussian_batch):
    torch.manual_seed(0)
    model = convert_to_normfree(timm.create_model(name), init=init, zero_init_last=zero_init_last)
    stats = signal_propagation(model, gaussian_batch)
    assert len(stats) == len(model.normfree_report.blocks) == (16 if name == 'resnet50' else 33)
    variances = [s.var for s in stats]
    assert VAR_BAND[0] <= min(variances) and max(variances) <= VAR_BAND[1], variances
    assert max(s.mean_sq for s in stats) <= MEAN_SQ_MAX


def test_band_detects_missing_scaling(gaussian_batch):
    """Without the alpha scaling (alpha=1, active branches) the residual variance grows through each stage."""
    torch.manual_seed(0)
    model = convert_to_normfree(timm.create_model('resnet50'), init='fresh', zero_init_last=False, alpha=1.0)
    variances = [s.var for s in signal_propagation(model, gaussian_batch)]
    assert max(variances) > VAR_BAND[1]
    assert variances[12] > variances[8] > variances[7]  # growth along stage 3


def test_signal_propagation_on_nofrost_models_and_errors(gaussian_batch):
    stats = signal_propagation(timm.create_model('nf_resnet26_nofrost'), gaussian_batch[:, :, :64, :64])
    assert [s.depth for s in stats] == list(range(8))
    with pytest.raises(ValueError, match='No normalizer-free residual blocks'):
        signal_propagation(nn.Sequential(nn.Conv2d(3, 3, 1)), gaussian_batch)
    with pytest.raises(ValueError, match="Unknown block name"):
        signal_propagation(nn.Sequential(nn.Conv2d(3, 3, 1)), gaussian_batch, blocks=['nope'])


def _outputs_match(a, b, x):
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)


def test_fuse_nf_resnet50_nofrost():
    model = randomize_gains(timm.create_model('nf_resnet50_nofrost')).eval()
    fused = fuse_weight_standardization(model)
    assert not any(isinstance(m, WS_CONV_TYPES) for m in fused.modules())
    assert any(isinstance(m, WS_CONV_TYPES) for m in model.modules())  # not in place by default
    # the alpha / beta scalings of all 16 blocks fold into their (now plain) convs
    assert sum(isinstance(m, FusedNormFreeBlock) for m in fused.modules()) == 16
    x = torch.rand(2, 3, 96, 96)
    _outputs_match(model, fused, x)
    training = fuse_weight_standardization(copy.deepcopy(model).train())
    assert not any(isinstance(m, FusedNormFreeBlock) for m in training.modules())  # drop-path still active
    # timm's reparameterize_model finds the fuse() method of the NoFrost convs
    reparam = reparameterize_model(model)
    assert not any(isinstance(m, WS_CONV_TYPES) for m in reparam.modules())
    _outputs_match(model, reparam, x)


def test_fuse_converted_models():
    for source in (torchvision.models.resnet18(), timm.create_model('seresnet18'), timm.create_model('resnet26d')):
        model = randomize_gains(convert_to_normfree(source, init='fresh'))
        x = torch.rand(2, 3, 64, 64)
        _outputs_match(model, fuse_weight_standardization(model), x)
        _outputs_match(model, reparameterize_model(model), x)
        fused = fuse_weight_standardization(copy.deepcopy(model), inplace=True)
        assert not any(isinstance(m, WS_CONV_TYPES) for m in fused.modules())


def test_fuse_same_padding_conv():
    conv = randomize_gains(nn.Sequential(timm.layers.ScaledStdConv2dSame(3, 4, 3, stride=2))).eval()
    fused = fuse_weight_standardization(conv)
    assert type(fused[0]).__name__ == 'Conv2dSame'
    _outputs_match(conv, fused, torch.rand(1, 3, 15, 15))
