"""Attacks: threat-model geometry, strength ordering, determinism, attack mode, AMP, bad input."""
import copy

import pytest
import timm
import torch

from timm_nofrost.attacks import (
    APGD, FGSM, PGD, APGDTargeted, apgd_checkpoints, build_attack, nofrost_step_size,
    parse_attack, parse_eps)
from timm_nofrost.layers import WS_CONV_TYPES

from tiny_models import MEAN, STD, eval_data, trained_tiny_cnn

EPS = 4 / 255


@pytest.fixture(scope='module')
def model():
    return trained_tiny_cnn()


@pytest.fixture(scope='module')
def data():
    return eval_data(128)


@pytest.mark.parametrize('make', [
    lambda m: PGD(m, eps=EPS, steps=5), lambda m: FGSM(m, eps=EPS, random_start=True),
    lambda m: APGD(m, eps=EPS, steps=10), lambda m: APGD(m, eps=EPS, steps=10, loss='dlr'),
    lambda m: APGDTargeted(m, eps=EPS, steps=5, n_target_classes=2), lambda m: PGD(m, eps=EPS, steps=5, loss='margin'),
])
def test_linf_ball_and_pixel_range(model, data, make):
    x, y = data
    result = make(model)(x, y)
    assert (result.x_adv - x).abs().max().item() <= EPS + 1e-6
    assert result.x_adv.min().item() >= 0 and result.x_adv.max().item() <= 1
    assert result.correct.shape == y.shape


def _l2_pgd_transcribed(model, x, y, eps, steps, alpha):
    """L2 PGD as published (Madry et al. 2018): from x, step alpha along the L2-normalised gradient of the CE,
    project onto the L2 ball of radius eps, then onto [0, 1]. An example is robust if no iterate (including the
    last) is misclassified."""
    delta = torch.zeros_like(x)
    fooled = torch.zeros(len(y), dtype=torch.bool)
    for _ in range(steps):
        xt = (x + delta).requires_grad_(True)
        logits = model(xt)
        fooled |= logits.argmax(1) != y
        grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y, reduction='sum'), xt)
        delta = delta + alpha * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(-1, 1, 1, 1)
        delta = (x + delta).clamp(0, 1) - x
    with torch.no_grad():
        fooled |= model(x + delta).argmax(1) != y
    return ~fooled, delta


def test_l2_ball(model, data):
    x, y = data
    result = PGD(model, eps=0.5, steps=5, norm='L2')(x, y)
    assert (result.x_adv - x).flatten(1).norm(dim=1).max().item() <= 0.5 + 1e-5
    # the outcome of every example equals the published algorithm's, transcribed (float64, no random start)
    m64 = copy.deepcopy(model).double().eval()
    for p in m64.parameters():
        p.requires_grad_(False)
    x64 = x.double()
    ours = PGD(m64, eps=0.5, steps=5, norm='L2', random_start=False, mean=MEAN, std=STD)(x64, y)
    pixel_model = lambda t: m64((t - torch.tensor(MEAN, dtype=t.dtype).view(1, 3, 1, 1)) /  # noqa: E731
                                torch.tensor(STD, dtype=t.dtype).view(1, 3, 1, 1))
    correct, _ = _l2_pgd_transcribed(pixel_model, x64, y, 0.5, 5, 2.5 * 0.5 / 5)
    assert torch.equal(ours.correct, correct)
    clean = (pixel_model(x64).argmax(1) == y).float().mean().item()
    assert ours.accuracy <= clean - 0.25  # the L2 ball of 0.5 holds adversarial examples for many images


def test_strength_ordering(model, data):
    """Single step >= iterative >= more steps >= APGD, on an undefended model; large eps -> ~0 %."""
    x, y = data
    fgsm = FGSM(model, eps=EPS)(x, y).accuracy
    pgd10 = PGD(model, eps=EPS, steps=10)(x, y).accuracy
    pgd20 = PGD(model, eps=EPS, steps=20, restarts=2)(x, y).accuracy
    apgd = APGD(model, eps=EPS, steps=20)(x, y).accuracy
    assert 0.3 < fgsm < 1.0  # the eps is in the interesting range for this model
    assert pgd10 <= fgsm and pgd20 <= pgd10 + 1 / 128 and apgd <= pgd10 + 1 / 128
    assert PGD(model, eps=16 / 255, steps=10)(x, y).accuracy <= 0.01  # undefended: ~0 % at a moderate eps


def test_targeted_pgd_reaches_targets(model, data):
    x, y = data
    target = (y + 1) % 4
    result = PGD(model, eps=16 / 255, steps=20)(x, y, target=target)
    assert (result.logits.argmax(1) == target).float().mean() > 0.9
    assert result.accuracy < 0.1  # for targeted attacks, 'correct' means the target was not reached


def test_determinism_and_seed(model, data):
    x, y = data
    a = PGD(model, eps=EPS, steps=5, seed=3)(x, y).x_adv
    b = PGD(model, eps=EPS, steps=5, seed=3)(x, y).x_adv
    c = PGD(model, eps=EPS, steps=5, seed=4)(x, y).x_adv
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_attack_mode_restores_training_and_grad_flags():
    model = timm.create_model('nf_resnet18_cifar_nofrost', channels=(8, 16, 32, 64), stem_chs=8)
    model.train()
    model.head.fc.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    seen = {}

    def spy(module, inputs, output):
        seen['training'] = module.training
        seen['frozen'] = not any(p.requires_grad for p in module.parameters())
        seen['ws_cached'] = 'forward' in model.stem.conv.__dict__
    handle = model.register_forward_hook(spy)
    PGD(model, eps=EPS, steps=2)(x, y)
    handle.remove()
    assert seen == {'training': False, 'frozen': True, 'ws_cached': True}
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert 'forward' not in model.stem.conv.__dict__
    assert all(p.grad is None for p in model.parameters())  # input gradients only


def test_cached_weight_standardisation_is_exact():
    model = timm.create_model('nf_resnet18_cifar_nofrost', channels=(8, 16, 32, 64), stem_chs=8).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith('gain'):
                p.uniform_(0.5, 1.5)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    cached = PGD(model, eps=EPS, steps=3, cache_standardized_weights=True)(x, y)
    plain = PGD(model, eps=EPS, steps=3, cache_standardized_weights=False)(x, y)
    assert torch.allclose(cached.x_adv, plain.x_adv, atol=1e-6)
    assert any(isinstance(m, WS_CONV_TYPES) for m in model.modules())


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_amp_attacks_keep_working(model, data, dtype):
    x, y = data
    result = PGD(model, eps=EPS, steps=5, amp_dtype=dtype)(x, y)
    full = PGD(model, eps=EPS, steps=5)(x, y)
    assert abs(result.accuracy - full.accuracy) <= 0.1
    assert result.zero_grad_frac < 0.01  # fp16 loss scaling keeps gradients from underflowing to 0


def test_zero_gradients_are_counted(data):
    class Quantised(torch.nn.Module):
        """Rounds its input: gradients are exactly zero everywhere (gradient masking)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.pretrained_cfg = inner.pretrained_cfg

        def forward(self, x):
            return self.inner(torch.round(x * 4) / 4)
    x, y = data
    result = PGD(Quantised(trained_tiny_cnn()), eps=EPS, steps=3, random_start=False)(x, y)
    assert result.zero_grad_frac == 1.0


def test_apgd_checkpoints_follow_the_paper():
    assert apgd_checkpoints(100) == [22, 41, 58, 70, 80, 87, 93, 99]


def test_nofrost_training_step():
    assert nofrost_step_size(8 / 255, 10) == pytest.approx(1 / 255)


def test_attack_names():
    assert parse_attack('pgd-20').steps == 20 and parse_attack('PGD').steps == 10
    assert parse_attack('pgd-20-margin').loss == 'margin'
    assert parse_attack('apgd-ce').steps == 100 and parse_attack('apgd-dlr-50').name == 'apgd-dlr-50'
    assert parse_attack('apgd-t').kind == 'apgd-t' and parse_attack('autoattack').kind == 'autoattack'
    assert parse_eps('8/255') == pytest.approx(8 / 255) and parse_eps(0.5) == 0.5 and parse_eps(' 4/255 ') > 0


@pytest.mark.parametrize('name', ['pgdd', 'pgd-0', 'apgd-xx', 'cw', ''])
def test_unknown_attack_names(name):
    with pytest.raises(ValueError, match='attack'):
        parse_attack(name)


@pytest.mark.parametrize('eps,match', [
    ('8/0', 'Invalid eps'), ('eight', 'Invalid eps'), (-0.1, 'must be a finite number >= 0'),
    (float('nan'), 'must be a finite number'), (True, 'Invalid eps'),
])
def test_malformed_eps(eps, match):
    with pytest.raises(ValueError, match=match):
        parse_eps(eps)


def test_bad_inputs(model, data):
    x, y = data
    with pytest.raises(ValueError, match='above 1'):
        PGD(model, eps=1.5)
    with pytest.raises(ValueError, match="Unknown norm 'L1'"):
        PGD(model, norm='L1')
    with pytest.raises(ValueError, match='steps must be a positive integer'):
        PGD(model, steps=0)
    with pytest.raises(ValueError, match=r'pixels in \[0, 1\]'):
        PGD(model, eps=EPS, steps=1)(x * 255, y)
    with pytest.raises(ValueError, match=r'Labels must lie in \[0, 3\]'):
        PGD(model, eps=EPS, steps=1)(x, torch.full_like(y, 7))
    with pytest.raises(ValueError, match='integer tensor'):
        PGD(model, eps=EPS, steps=1)(x, y.float())
    with pytest.raises(TypeError, match='torch.nn.Module'):
        PGD('not a model')
    with pytest.raises(ValueError, match='non-empty'):  # an empty batch is refused, not scored (accuracy nan)
        PGD(model, eps=EPS, steps=1)(x[:0], y[:0])


def test_autoattack_missing_package_message(monkeypatch, model):
    import sys
    for name in ('pyautoattack', 'autoattack'):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail, even if already imported
    with pytest.raises(ImportError, match=r"pip install 'timm-nofrost\[eval\]'"):
        build_attack(parse_attack('autoattack'), model, EPS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_attacks_on_cuda_match_cpu_accuracy(model, data):
    x, y = data
    cpu = PGD(model, eps=EPS, steps=10, random_start=False)(x, y).accuracy
    gpu_model = copy.deepcopy(model).cuda()
    gpu = PGD(gpu_model, eps=EPS, steps=10, random_start=False)(x.cuda(), y.cuda())
    assert gpu.x_adv.is_cuda and abs(gpu.accuracy - cpu) <= 2 / len(y)
    bf16 = PGD(gpu_model, eps=EPS, steps=10, amp_dtype=torch.bfloat16)(x.cuda(), y.cuda())
    assert bf16.zero_grad_frac < 0.01
