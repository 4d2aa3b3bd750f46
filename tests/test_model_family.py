"""The NoFrost model family behaves as native timm models and matches the authors' architecture."""
import pytest
import timm
import torch

from timm_nofrost import HF_HUB_ORG, NOFROST_RECIPE_DEFAULTS, NormFreeBasicResNet
from timm.models.nfnet import NormFreeNet

from conftest import TINY_ARGS, TINY_MODEL, randomize_gains, tiny_model

FAMILY = {
    'nf_resnet18_nofrost', 'nf_resnet26_nofrost', 'nf_resnet34_nofrost', 'nf_resnet50_nofrost',
    'nf_resnet101_nofrost', 'nf_resnet18_cifar_nofrost',
}
PRETRAINED = {'nf_resnet50_nofrost.at_in1k', 'nf_resnet50_nofrost.at_deepaug_in1k'}


def test_family_is_registered():
    assert set(timm.list_models('*nofrost*')) == FAMILY
    assert set(timm.list_pretrained('*nofrost*')) == PRETRAINED
    for name in PRETRAINED:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id == f'{HF_HUB_ORG}/{name}'


def test_default_tag_is_the_authors_best_robust_checkpoint():
    model = timm.create_model('nf_resnet50_nofrost')
    assert model.pretrained_cfg['tag'] == 'at_in1k'


def test_nf_resnet50_nofrost_is_timm_nf_resnet50():
    """Same class, 25,557,032 parameters, no buffers, identical logits given the same weights."""
    ours = timm.create_model('nf_resnet50_nofrost').eval()
    reference = timm.create_model('nf_resnet50').eval()
    assert type(ours) is NormFreeNet
    assert sum(p.numel() for p in ours.parameters()) == 25_557_032
    assert len(list(ours.buffers())) == 0
    reference = randomize_gains(reference)
    ours.load_state_dict(reference.state_dict())
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


def test_recipe_regularisation_defaults_and_override():
    model = timm.create_model('nf_resnet50_nofrost')
    assert NOFROST_RECIPE_DEFAULTS == dict(drop_rate=0.25, drop_path_rate=0.1)
    assert model.drop_rate == 0.25 and model.head.drop.p == 0.25
    last_block = model.stages[-1][-1]
    assert last_block.drop_path.drop_prob == pytest.approx(0.1)
    plain = timm.create_model('nf_resnet50_nofrost', drop_rate=0.0, drop_path_rate=0.0)
    assert plain.drop_rate == 0.0
    assert isinstance(plain.stages[-1][-1].drop_path, torch.nn.Identity)


def test_pretrained_cfg_matches_authors_eval_transforms():
    cfg = timm.create_model('nf_resnet50_nofrost').pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224)
    assert cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bilinear'
    assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)
    assert cfg['first_conv'] == 'stem.conv' and cfg['classifier'] == 'head.fc'
    assert cfg['license'] == 'apache-2.0' and cfg['paper_ids'] == 'arXiv:2207.01156'
    data_cfg = timm.data.resolve_data_config({}, model=timm.create_model('nf_resnet50_nofrost'))
    transform = timm.data.create_transform(**data_cfg)
    assert 'Resize(size=256' in str(transform) and 'CenterCrop(size=(224, 224))' in str(transform)


@pytest.mark.parametrize('name,params', [
    ('nf_resnet18_nofrost', 11_689_512),  # same count as torchvision's resnet18: gains replace BN affines
    ('nf_resnet34_nofrost', 21_797_672),
    ('nf_resnet26_nofrost', 15_995_176),
    ('nf_resnet101_nofrost', 44_549_160),
    ('nf_resnet18_cifar_nofrost', 11_173_962),
])
def test_family_sizes(name, params):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in model.modules())


def test_cifar_variant_keeps_resolution_in_stem():
    model = tiny_model().eval()
    assert isinstance(model, NormFreeBasicResNet)
    assert [f['reduction'] for f in model.feature_info] == [1, 1, 2, 4, 8]
    assert model.forward_features(torch.rand(1, 3, 32, 32)).shape == (1, 64, 4, 4)
    assert model.pretrained_cfg['input_size'] == (3, 32, 32) and model.num_classes == 10


def test_basic_blocks_start_as_identity_residuals(sample_batch):
    """Zero-initialised branch gains: at init every non-transition block returns its input."""
    model = tiny_model().eval()
    block = model.stages[0][1]
    x = torch.randn(2, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(block(x), x)
    betas = [b.beta for stage in model.stages for b in stage]
    alpha = model.stages[0][0].alpha
    assert alpha == 0.2
    # beta = 1/sqrt(expected variance of the block input); the variance grows by alpha^2 per block and is
    # reset to 1 after each stage's transition block, whose shortcut is computed from the normalised input
    a2 = alpha ** 2
    assert betas == pytest.approx([1.0, (1 + a2) ** -0.5] + [(1 + 2 * a2) ** -0.5, (1 + a2) ** -0.5] * 3)


def test_timm_api_features_intermediates_head(sample_batch):
    model = randomize_gains(tiny_model()).eval()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(sample_batch)
        assert [t.shape[1] for t in intermediates] == [8, 8, 16, 32, 64]
        assert torch.allclose(model.forward_head(final), model(sample_batch))
        assert model.forward_head(final, pre_logits=True).shape == (2, 64)
    features = timm.create_model(TINY_MODEL, features_only=True, out_indices=(1, 4), **TINY_ARGS)
    assert features.feature_info.channels() == [8, 64]
    assert [t.shape[-1] for t in features(sample_batch)] == [32, 4]
    model.reset_classifier(5)
    assert model(sample_batch).shape == (2, 5)
    model.reset_classifier(0)
    assert model(sample_batch).shape == (2, 64)


def test_grad_checkpointing_gives_same_gradients(sample_batch):
    model = randomize_gains(tiny_model(drop_rate=0., drop_path_rate=0.))
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(sample_batch).sum().backward()
        grads.append(model.stem.conv.weight.grad.clone())
    assert model.grad_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_torchscript_and_fx_match_eager(sample_batch):
    model = randomize_gains(tiny_model()).eval()
    with torch.no_grad():
        expected = model(sample_batch)
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(sample_batch), expected, atol=1e-6)
    from timm.models import create_feature_extractor
    extractor = create_feature_extractor(model, return_nodes={'stages.3': 'last', 'head.fc': 'logits'})
    with torch.no_grad():
        out = extractor(sample_batch)
        assert torch.allclose(out['last'], model.stages(model.stem(sample_batch)), atol=1e-6)
        assert torch.allclose(out['logits'], expected, atol=1e-6)
