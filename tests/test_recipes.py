"""Training recipes: Madry, TRADES and MART losses, FGSM-RS and N-FGSM training attacks.

Each method's loss and parameter gradients are checked against a transcription of the published formula (as the
reference codes compute it) on the trainer's own adversarial examples, in float64; each attack against a
transcription of its reference loop from the same random start.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy

from timm_nofrost import AdversarialConfig, AdversarialTrainer

from conftest import randomize_gains, tiny_model

EPS = 8 / 255
METHODS = ('nofrost', 'madry', 'trades', 'mart')


def nf_model() -> nn.Module:
    return randomize_gains(tiny_model(num_classes=4, drop_rate=0., drop_path_rate=0.)).double()


def batch(n: int = 6, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def trainer(model: nn.Module, **kwargs) -> AdversarialTrainer:
    """A trainer on [0, 1] pixels (no normalisation) with plain CE: the published formulas' setting."""
    kwargs = {'input_normalized': False, 'criterion': nn.CrossEntropyLoss(), 'verbose': False, **kwargs}
    return AdversarialTrainer(model, **kwargs)


def soft_target_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE with hard labels or soft targets (what timm's criteria do for mixup)."""
    return F.cross_entropy(logits, target)


def grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


# -- the published losses, transcribed ------------------------------------------------------------------------
def published_loss(method: str, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                   beta: float = 6.0, lam: float = 0.5) -> torch.Tensor:
    """Each paper's training loss, two forwards in train mode, as in the reference codes."""
    model.train()
    n = x.shape[0]
    if method == 'nofrost':
        return (1 - lam) * F.cross_entropy(model(x), y) + lam * F.cross_entropy(model(x_adv), y)
    if method == 'madry':
        return F.cross_entropy(model(x_adv), y)
    logits, logits_adv = model(x), model(x_adv)
    if method == 'trades':  # CE(f(x), y) + beta * sum_i KL(p(x_i) || p(x'_i)) / B
        p, log_q = torch.softmax(logits, dim=1), torch.log_softmax(logits_adv, dim=1)
        kl = (p * (torch.log(p) - log_q)).sum()
        return F.cross_entropy(logits, y) + beta * kl / n
    # MART (YisenWang/MART, train_wideresnet.py mart_loss)
    adv_probs = torch.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = torch.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    kl = (nat_probs * (torch.log(nat_probs) - torch.log(adv_probs + 1e-12))).sum(dim=1)
    return loss_adv + beta * (1.0 / n) * torch.sum(kl * (1.0000001 - true_probs))


def reference_attack(model: nn.Module, x: torch.Tensor, start: torch.Tensor, loss_fn, step: float, steps: int,
                     radius: float) -> torch.Tensor:
    """The reference codes' loop: sign steps on ``loss_fn``, clipped to ``x +- radius`` and [0, 1], eval mode."""
    model.eval()
    x_adv = x + start
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(model(x_adv)), x_adv)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - radius), x + radius).clamp(0, 1)
    model.train()
    return x_adv


# -- losses ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('batch_mode', ['concat', 'separate'])
@pytest.mark.parametrize('method', METHODS)
def test_loss_and_gradients_are_the_published_formula(method, batch_mode):
    x, y = batch()
    model = nf_model()
    task = trainer(model, method=method, steps=2, batch_mode=batch_mode)
    torch.manual_seed(3)
    x_adv = task.make_adversarial(x, y)['input_adv']
    torch.manual_seed(3)  # the same random start: forward attacks to the same x_adv
    out = task(x, y)
    out['loss'].backward()
    got = grads(model)
    torch.testing.assert_close(out['output_adv'].detach(), model(x_adv).detach(), rtol=1e-9, atol=1e-12)
    model.zero_grad()
    ref = published_loss(method, model, x, x_adv, y)
    ref.backward()
    assert out['loss'].item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(got, grads(model), rtol=1e-6, atol=1e-12)
    # the reported parts add up to the loss
    if method == 'nofrost':
        assert out['loss'].item() == pytest.approx(0.5 * (out['loss_clean'] + out['loss_adv']).item(), rel=1e-9)
    elif method == 'madry':
        assert 'loss_clean' not in out and out['output'] is out['output_adv']
    elif method == 'trades':
        assert out['loss'].item() == pytest.approx((out['loss_clean'] + out['loss_robust']).item(), rel=1e-9)
        assert out['loss_clean'].item() == pytest.approx(F.cross_entropy(out['output'], y).item(), rel=1e-9)
    else:
        assert out['loss'].item() == pytest.approx((out['loss_adv'] + out['loss_robust']).item(), rel=1e-9)
    assert out['acc_adv'].item() <= 1 and out['adv_eps'].item() == pytest.approx(EPS)


@pytest.mark.parametrize('method', ['trades', 'mart'])
def test_beta_weights_the_robust_term(method):
    x, y = batch()
    losses = []
    for beta in (0.0, 1.0, 6.0):
        torch.manual_seed(3)
        losses.append(trainer(nf_model(), method=method, steps=1, beta=beta)(x, y))
    base, one, six = losses
    robust = one['loss'].item() - base['loss'].item()
    assert robust > 0 and six['loss'].item() == pytest.approx(base['loss'].item() + 6 * robust, rel=1e-9)
    assert six['loss_robust'].item() == pytest.approx(6 * robust, rel=1e-9)
    assert AdversarialConfig(method=method).beta == 6.0


@pytest.mark.parametrize('method', METHODS)
def test_one_forward_for_normalizer_free_models(method):
    """Attack forwards in eval mode with frozen parameters, then ONE training forward on clean + adversarial."""
    x, y = batch(n=4)
    calls = []
    model = nf_model()
    model.register_forward_pre_hook(
        lambda m, i: calls.append((m.training, any(p.requires_grad for p in m.parameters()), i[0].shape[0])))
    task = trainer(model, method=method, steps=3)
    out = task(x, y)
    attack_forwards = 3 + (method == 'trades')  # TRADES' p(x) from the eval-mode model
    train = [(True, True, 4)] if method == 'madry' else [(True, True, 8)]
    assert calls == [(False, False, 4)] * attack_forwards + train
    assert all(p.grad is None for p in model.parameters())  # the attack left no parameter gradients
    out['loss'].backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('method', ['trades', 'mart'])
def test_batchnorm_models_keep_separate_or_split_forwards(method):
    x, y = batch(n=4, size=32)
    task = trainer(timm.create_model('resnet18', num_classes=4).double(), method=method, steps=1)
    assert task.batch_mode == 'separate'
    out = task(x, y)
    out['loss'].backward()
    split = trainer(timm.create_model('resnet18', num_classes=4).double(), method=method, steps=1,
                    batch_mode='split')
    assert math.isfinite(split(x, y)['loss'].item())
    with pytest.raises(ValueError, match="batch_mode='concat'"):
        trainer(timm.create_model('resnet18', num_classes=4), method=method, batch_mode='concat')


def test_trades_natural_term_uses_the_criterion():
    """The published natural term is plain CE; timm users get their criterion (label smoothing 0.1 here)."""
    x, y = batch()
    task = AdversarialTrainer(nf_model(), method='trades', steps=1, input_normalized=False, verbose=False)
    assert isinstance(task.criterion, LabelSmoothingCrossEntropy)
    out = task(x, y)
    assert out['loss_clean'].item() == pytest.approx(task.criterion(out['output'], y).item(), rel=1e-9)
    smoothed = F.cross_entropy(out['output'], y, label_smoothing=0.1)
    assert out['loss_clean'].item() == pytest.approx(smoothed.item(), rel=1e-9)


@pytest.mark.parametrize('method', ['trades', 'mart'])
def test_soft_targets(method):
    """MART is defined on hard labels: soft targets act as their argmax. TRADES' attack ignores the labels."""
    x, y = batch()
    one_hot = F.one_hot(y, 4).double() * 0.7 + 0.075  # label-smoothing-like soft targets, argmax y
    results = []
    for target in (y, one_hot):
        torch.manual_seed(5)
        results.append(trainer(nf_model(), method=method, steps=2, criterion=soft_target_ce)(x, target))
    torch.testing.assert_close(results[0]['output_adv'], results[1]['output_adv'])
    if method == 'mart':
        assert results[0]['loss'].item() == pytest.approx(results[1]['loss'].item(), rel=1e-12)
    mixup = Mixup(mixup_alpha=1.0, num_classes=4, label_smoothing=0.1)
    inputs, soft = mixup(x.float(), y)
    task = AdversarialTrainer(randomize_gains(tiny_model(num_classes=4)), method=method, steps=1,
                              input_normalized=False, criterion_kwargs=dict(soft_targets=True), verbose=False)
    out = task(inputs, soft)
    assert math.isfinite(out['loss'].item())
    out['loss'].backward()


# -- attacks --------------------------------------------------------------------------------------------------
def test_trades_attack_is_the_reference_kl_pgd_from_a_small_gaussian():
    x, y = batch()
    model = nf_model()
    assert AdversarialConfig(method='trades').attack_step_size == pytest.approx(2 / 255)  # the reference's 0.007
    task = trainer(model, method='trades', steps=3)
    step = task.adv_cfg.attack_step_size
    assert step == pytest.approx(2.5 * EPS / 3)
    torch.manual_seed(7)
    x_adv = task.make_adversarial(x, y)['input_adv']
    torch.manual_seed(7)
    start = 0.001 * torch.randn(x.shape, dtype=x.dtype)
    with torch.no_grad():
        p = torch.softmax(model.eval()(x), dim=1)
    ref = reference_attack(model, x, start, lambda out: F.kl_div(F.log_softmax(out, dim=1), p, reduction='sum'),
                           step, 3, EPS)
    torch.testing.assert_close(x_adv, ref, rtol=0, atol=1e-12)
    # the start: with a step too small to matter, one step stays 0.001-Gaussian around x
    task = trainer(model, method='trades', steps=1, step_size=1e-9)
    torch.manual_seed(7)
    delta = task.make_adversarial(x, y)['input_adv'] - x
    inside = (x > 0.01) & (x < 0.99)  # away from the [0, 1] clamp
    assert delta[inside].std().item() == pytest.approx(0.001, rel=0.05)
    assert delta[inside].mean().abs().item() < 1e-4


def test_mart_attack_is_the_reference_ce_pgd_from_a_small_gaussian():
    x, y = batch()
    model = nf_model()
    task = trainer(model, method='mart', steps=3)
    torch.manual_seed(7)
    x_adv = task.make_adversarial(x, y)['input_adv']
    torch.manual_seed(7)
    start = 0.001 * torch.randn(x.shape, dtype=x.dtype)
    ref = reference_attack(model, x, start, lambda out: F.cross_entropy(out, y), task.adv_cfg.attack_step_size, 3, EPS)
    torch.testing.assert_close(x_adv, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize('method', METHODS)
def test_fgsm_rs(method):
    """Uniform start in the ball, one step of 1.25 eps, back onto the ball and [0, 1] (Wong et al. 2020)."""
    x, y = batch()
    model = nf_model()
    task = trainer(model, method=method, attack='fgsm-rs')
    cfg = task.adv_cfg
    assert (cfg.steps, cfg.attack_step_size) == (1, pytest.approx(1.25 * EPS))
    torch.manual_seed(7)
    x_adv = task.make_adversarial(x, y)['input_adv']
    torch.manual_seed(7)
    start = ((x + (2 * torch.rand(x.shape, dtype=x.dtype) - 1) * EPS).clamp(0, 1) - x)
    if method == 'trades':
        with torch.no_grad():
            p = torch.softmax(model.eval()(x), dim=1)
        loss_fn = lambda out: F.kl_div(F.log_softmax(out, dim=1), p, reduction='sum')  # noqa: E731
    else:
        loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    ref = reference_attack(model, x, start, loss_fn, 1.25 * EPS, 1, EPS)
    torch.testing.assert_close(x_adv, ref, rtol=0, atol=1e-12)
    size = (x_adv - x).abs().flatten(1).amax(1)
    assert size.max().item() <= EPS + 1e-12 and size.min().item() > 0.5 * EPS
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    out = task(x, y)
    out['loss'].backward()
    assert out['attack_zero_grad_frac'].item() < 0.5


@pytest.mark.parametrize('method', METHODS)
def test_n_fgsm(method):
    """Noise in the 2 eps ball, one step of eps, no projection back onto the eps ball (de Jorge et al. 2022)."""
    x, y = batch()
    model = nf_model()
    task = trainer(model, method=method, attack='n-fgsm')
    assert (task.adv_cfg.steps, task.adv_cfg.attack_step_size) == (1, pytest.approx(EPS))
    torch.manual_seed(7)
    x_adv = task.make_adversarial(x, y)['input_adv']
    torch.manual_seed(7)
    start = ((x + (2 * torch.rand(x.shape, dtype=x.dtype) - 1) * 2 * EPS).clamp(0, 1) - x)
    if method == 'trades':
        with torch.no_grad():
            p = torch.softmax(model.eval()(x), dim=1)
        loss_fn = lambda out: F.kl_div(F.log_softmax(out, dim=1), p, reduction='sum')  # noqa: E731
    else:
        loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    ref = reference_attack(model, x, start, loss_fn, EPS, 1, math.inf)
    torch.testing.assert_close(x_adv, ref, rtol=0, atol=1e-12)
    size = (x_adv - x).abs().flatten(1).amax(1)
    assert size.min().item() > EPS and size.max().item() <= 3 * EPS + 1e-12
    assert (x_adv - x).abs().max().item() > 2.5 * EPS
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    out = task(x, y)
    out['loss'].backward()


@pytest.mark.parametrize('attack', ['fgsm-rs', 'n-fgsm'])
def test_single_step_attacks_in_eval_mode_with_frozen_parameters(attack):
    x, y = batch(n=4)
    calls = []
    model = nf_model()
    model.register_forward_pre_hook(
        lambda m, i: calls.append((m.training, any(p.requires_grad for p in m.parameters()), i[0].shape[0])))
    out = trainer(model, attack=attack)(x, y)
    assert calls == [(False, False, 4), (True, True, 8)]
    assert out['attack_zero_grad_frac'].item() < 0.5


def test_single_step_attacks_follow_eps_warmup_and_attack_dtype():
    x, y = batch()
    task = trainer(nf_model(), attack='n-fgsm', eps_warmup_steps=2)
    task(x, y)
    assert task.adv_batches == 1
    x_adv = task.make_adversarial(x, y)['input_adv']  # eps 4/255: up to 3 * 4/255
    assert (x_adv - x).abs().max().item() <= 3 * 4 / 255 + 1e-12
    x32 = x.float()
    task = AdversarialTrainer(randomize_gains(tiny_model(num_classes=4)), attack='fgsm-rs', attack_dtype='bfloat16',
                              input_normalized=False, verbose=False)
    seen = []
    task.trainable_module.register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
    out = task(x32, y)
    assert seen == [(False, torch.bfloat16), (True, torch.float32)]
    assert math.isfinite(out['loss'].item())


# -- settings -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs, match', [
    (dict(method='alp'), "Unknown method 'alp'; accepted: nofrost, madry, trades, mart"),
    (dict(attack='pgd2'), "Unknown training attack 'pgd2'; accepted: pgd, fgsm-rs, n-fgsm"),
    (dict(method='trades', beta=-1.0), r'beta must be a finite number >= 0, got -1\.0'),
    (dict(method='mart', beta=float('nan')), 'beta must be a finite number >= 0, got nan'),
    (dict(method='trades', beta=float('inf')), 'beta must be a finite number >= 0, got inf'),
    (dict(beta=6.0), "beta 6.0 does not apply to method='nofrost'; beta is accepted with trades and mart"),
    (dict(method='madry', beta=1.0), "beta 1.0 does not apply to method='madry'"),
    (dict(method='trades', adv_weight=0.5), r"adv_weight \(lambda\) 0.5 does not apply to method='trades'"),
    (dict(method='mart', adv_weight=1.0), r"adv_weight \(lambda\) 1.0 does not apply to method='mart'"),
    (dict(method='madry', adv_weight=0.5), "method='madry' trains on adversarial examples only"),
    (dict(attack='n-fgsm', norm='L2', eps=0.5), "attack='n-fgsm' is defined for the Linf norm only"),
    (dict(attack='fgsm-rs', steps=10), "attack='fgsm-rs' takes one step, got steps=10"),
    (dict(attack='n-fgsm', steps=2), "attack='n-fgsm' takes one step, got steps=2"),
    (dict(attack='fgsm-rs', random_start=False), "attack='fgsm-rs' starts from random noise"),
    (dict(method='trades', random_start=False), "method='trades' needs random_start=True"),
    (dict(attack='fgsm-rs', step_size=20 / 255), 'above 2 eps'),
    (dict(method='mart', steps=0), "steps=0 makes no adversarial examples, which method='mart' needs"),
])
def test_invalid_recipe_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdversarialConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        trainer(nf_model(), **kwargs)


def test_config_defaults_and_round_trips():
    old = {'eps': 8 / 255, 'steps': 10, 'step_size': None, 'norm': 'Linf', 'random_start': True, 'adv_weight': 0.5,
           'eps_warmup_steps': 0, 'batch_mode': 'auto', 'attack_dtype': None}  # a checkpoint from before recipes
    default = AdversarialConfig()
    assert AdversarialConfig(**old) == default
    assert default.to_dict() == {**old, 'method': 'nofrost', 'beta': None, 'attack': 'pgd'}
    assert AdversarialConfig(adv_weight=1.0).adv_weight == AdversarialConfig(method='madry').adv_weight == 1.0
    assert AdversarialConfig(method='madry', adv_weight=1.0).method == 'madry'
    for kwargs in (dict(method='madry'), dict(method='trades', beta=1.0), dict(method='mart', attack='fgsm-rs'),
                   dict(attack='n-fgsm', adv_weight=0.7), dict(method='trades', norm='L2', eps=0.5, steps=3)):
        cfg = AdversarialConfig(**kwargs)
        assert AdversarialConfig(**cfg.to_dict()) == cfg
    trades = AdversarialConfig(method='trades')
    assert (trades.adv_weight, trades.beta, trades.steps) == (None, 6.0, 10)
    assert AdversarialConfig(attack='fgsm-rs', steps=1).steps == 1
    assert 'trades' in trades.describe() and 'beta 6' in trades.describe()
