"""AdversarialTrainer: the NoFrost recipe, batch modes, timm pipeline inputs, and bad settings."""
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy
from timm.task import ClassificationTask

from timm_nofrost import AdversarialConfig, AdversarialTrainer
from timm_nofrost.attacks import nofrost_step_size

from conftest import randomize_gains, tiny_model

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def nf_model(**kwargs) -> nn.Module:
    return randomize_gains(tiny_model(num_classes=4, drop_rate=0., drop_path_rate=0., **kwargs))


def batch(n: int = 6, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return pixels, y


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def denormalize(inputs: torch.Tensor) -> torch.Tensor:
    return inputs * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def trainer(model: nn.Module, **kwargs) -> AdversarialTrainer:
    kwargs = {'steps': 2, 'mean': MEAN, 'std': STD, 'verbose': False, **kwargs}
    return AdversarialTrainer(model, **kwargs)


def test_defaults_are_the_authors_recipe():
    task = AdversarialTrainer(nf_model(), verbose=False)
    cfg = task.adv_cfg
    assert isinstance(task, ClassificationTask)
    assert (cfg.eps, cfg.steps, cfg.norm, cfg.random_start, cfg.adv_weight) == (8 / 255, 10, 'Linf', True, 0.5)
    assert cfg.attack_step_size == pytest.approx(1 / 255) == nofrost_step_size(8 / 255, 10)
    assert isinstance(task.criterion, LabelSmoothingCrossEntropy) and task.criterion.smoothing == 0.1
    assert task.batch_mode == 'concat'
    attack = task.attack()
    assert (attack.loss_name, attack.steps, attack.step_size) == ('ce', 10, pytest.approx(1 / 255))
    # the model's own normalisation unless told otherwise
    assert task.mean == tuple(task.trainable_module.pretrained_cfg['mean'])


def test_concatenated_forward_equals_two_forwards():
    x, y = batch()
    losses, grads = {}, {}
    for mode in ('concat', 'separate'):
        model = nf_model()
        task = trainer(model, batch_mode=mode, random_start=False)
        out = task(normalize(x), y)
        out['loss'].backward()
        losses[mode] = (out['loss'].item(), out['loss_clean'].item(), out['loss_adv'].item())
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert losses['concat'] == pytest.approx(losses['separate'], rel=1e-5)
    torch.testing.assert_close(grads['concat'], grads['separate'], rtol=1e-4, atol=1e-6)
    loss, clean, adv = losses['concat']
    assert loss == pytest.approx(0.5 * clean + 0.5 * adv, rel=1e-6)
    assert adv > clean  # the attack raised the loss


@pytest.mark.parametrize('weight', [0.0, 0.3, 1.0])
def test_adv_weight_mixes_the_losses(weight):
    x, y = batch()
    task = trainer(nf_model(), adv_weight=weight, steps=0 if weight == 0 else 2)
    out = task(normalize(x), y)
    if weight == 0:
        assert task.adv_batches == 0 and 'loss_adv' not in out  # standard training: no attack at all
        assert out['loss'].item() == pytest.approx(task.criterion(out['output'], y).item())
    elif weight == 1:
        assert 'loss_clean' not in out and out['loss'].item() == pytest.approx(out['loss_adv'].item())
        assert out['output'] is out['output_adv']
    else:
        assert out['loss'].item() == pytest.approx(0.7 * out['loss_clean'].item() + 0.3 * out['loss_adv'].item(),
                                                   rel=1e-6)


class Recorder(nn.Module):
    """Records the mode of every forward: training flag, parameter grads on, autograd on."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.pretrained_cfg = model.pretrained_cfg
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, all(p.requires_grad for p in self.parameters()), x.shape[0]))
        return self.model(x)


def test_attack_in_eval_mode_with_frozen_parameters_training_forward_in_train_mode():
    x, y = batch(n=4)
    model = Recorder(nf_model())
    task = trainer(model, steps=3)
    out = task(normalize(x), y)
    # 3 attack forwards (eval, frozen), then one training forward on the concatenated batch
    assert model.calls == [(False, False, 4)] * 3 + [(True, True, 8)]
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # the attack left no parameter gradients
    out['loss'].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_adversarial_examples_stay_in_the_ball_in_pixel_space():
    x, y = batch()
    for norm, eps in (('Linf', 8 / 255), ('L2', 0.5)):
        task = trainer(nf_model(), norm=norm, eps=eps, steps=3, step_size=eps / 2)
        adv = task.make_adversarial(normalize(x), y)['input_adv']
        pixels = adv * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        delta = (pixels - x).flatten(1)
        size = delta.abs().amax(1) if norm == 'Linf' else delta.norm(dim=1)
        assert size.max().item() <= eps + 1e-5 and size.min().item() > 0.5 * eps
        assert pixels.min().item() >= -1e-6 and pixels.max().item() <= 1 + 1e-6


def test_pixel_inputs_without_normalisation():
    x, y = batch()
    model = nf_model()
    task = trainer(model, input_normalized=False, mean=None, std=None, steps=3)
    adv = task.make_adversarial(x, y)['input_adv']
    assert (adv - x).abs().max().item() == pytest.approx(8 / 255, abs=1e-5)
    assert adv.min().item() >= 0 and adv.max().item() <= 1
    # the training forward feeds pixels to the model: the attack must attack that same function
    with torch.no_grad():
        assert torch.equal(task.attack().model(x), model.eval()(x))
    with pytest.raises(ValueError, match='mean/std do not apply'):
        trainer(nf_model(), input_normalized=False)  # the helper passes mean/std


def test_random_erasing_outside_the_pixel_range_is_clamped_for_the_attack():
    x, y = batch()
    inputs = normalize(x)
    inputs[:, :, :4, :4] = 10.0  # random erasing writes normal noise in normalised space: far above pixel 1
    inputs[:, :, -4:, -4:] = -10.0  # and far below pixel 0
    task = trainer(nf_model(), steps=2)
    adv = denormalize(task.make_adversarial(inputs, y)['input_adv'])
    high, low = adv[:, :, :4, :4], adv[:, :, -4:, -4:]
    # the attack's ball is around the clamped pixel (1, resp. 0), so the random start and the steps move the
    # pixel inside [1 - eps, 1] (resp. [0, eps]); around the unclamped pixel the ball lies outside [0, 1] and
    # every pixel would sit exactly on the bound
    eps = 8 / 255
    assert high.max().item() <= 1 and high.min().item() >= 1 - eps - 1e-5
    assert low.min().item() >= 0 and low.max().item() <= eps + 1e-5
    assert (high < 1 - 1e-3).float().mean().item() > 0.5 and (low > 1e-3).float().mean().item() > 0.5
    assert math.isfinite(task(inputs, y)['loss'].item())


def test_soft_targets_from_mixup_attack_like_hard_labels():
    x, y = batch()
    one_hot = torch.nn.functional.one_hot(y, 4).float()
    results = []
    for target in (y, one_hot):
        task = trainer(nf_model(), random_start=False, criterion=nn.CrossEntropyLoss())
        results.append(task.make_adversarial(normalize(x), target)['input_adv'])
    torch.testing.assert_close(results[0], results[1])
    mixup = Mixup(mixup_alpha=1.0, num_classes=4, label_smoothing=0.1)
    inputs, soft = mixup(normalize(x), y)
    task = trainer(nf_model(), criterion_kwargs=dict(soft_targets=True))
    out = task(inputs, soft)
    assert soft.shape == (6, 4)
    # the loss is the soft-target cross-entropy, written out, of the clean and the adversarial outputs, mixed by lambda
    soft_ce = lambda logits: -(soft * logits.log_softmax(dim=1)).sum(dim=1).mean()  # noqa: E731
    weight = task.adv_cfg.adv_weight
    expected = (1 - weight) * soft_ce(out['output']) + weight * soft_ce(out['output_adv'])
    assert 0 < weight < 1 and out['loss'].item() == pytest.approx(expected.item(), rel=1e-6)
    out['loss'].backward()


def test_channels_last_inputs():
    x, y = batch()
    inputs = normalize(x)
    task = trainer(nf_model(), random_start=False)
    ref = task(inputs, y)
    model_cl = nf_model().to(memory_format=torch.channels_last)
    task_cl = trainer(model_cl, random_start=False)
    adv = task_cl.make_adversarial(inputs.contiguous(memory_format=torch.channels_last), y)['input_adv']
    assert adv.is_contiguous(memory_format=torch.channels_last)
    out = task_cl(inputs.contiguous(memory_format=torch.channels_last), y)
    assert out['loss'].item() == pytest.approx(ref['loss'].item(), rel=1e-4)


def test_bf16_autocast():
    x, y = batch()
    task = trainer(nf_model(), steps=3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(normalize(x), y)
    assert task.attack().amp_dtype == torch.bfloat16
    assert math.isfinite(out['loss'].item()) and out['attack_zero_grad_frac'].item() < 0.5
    out['loss'].backward()
    assert task(normalize(x), y) and task.attack().amp_dtype is None  # autocast state follows the caller


def test_gradient_accumulation_matches_one_batch():
    x, y = batch(n=8)
    full_model, acc_model = nf_model(), nf_model()
    trainer(full_model, random_start=False)(normalize(x), y)['loss'].backward()
    acc = trainer(acc_model, random_start=False)
    for half in (slice(0, 4), slice(4, 8)):
        (acc(normalize(x[half]), y[half])['loss'] / 2).backward()
    for p, q in zip(full_model.parameters(), acc_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_ema_follows_training():
    x, y = batch()
    task = trainer(nf_model())
    task.setup_ema(decay=0.5)
    optimizer = torch.optim.SGD(task.trainable_module.parameters(), lr=0.5)

    def train_step():
        optimizer.zero_grad()
        task(normalize(x), y)['loss'].backward()
        optimizer.step()
        return [p.detach().clone() for p in task.trainable_module.parameters()]

    trained = train_step()
    task.update_ema(step=1)  # timm's first update (step 1) copies the weights: decay 0
    for a, p in zip(task.get_eval_model(ema=True).parameters(), trained):
        assert torch.equal(a, p)
    before = [p.clone() for p in task.get_eval_model(ema=True).parameters()]
    trained = train_step()
    task.update_ema()  # no step: decay 0.5, the mean of the old EMA and the new weights
    after = list(task.get_eval_model(ema=True).parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) >= len(after) // 2
    for b, p, a in zip(before, trained, after):
        torch.testing.assert_close(a, 0.5 * b + 0.5 * p, rtol=1e-6, atol=1e-7)


def test_eps_warmup_and_task_state_round_trip():
    x, y = batch(n=2)
    task = trainer(nf_model(), steps=1, eps_warmup_steps=4)
    seen = [task(normalize(x), y)['adv_eps'].item() for _ in range(3)]
    assert seen == pytest.approx([0, 2 / 255, 4 / 255])
    state = task.get_checkpoint_state()['task_state']
    assert state['adv_batches'] == 3 and state['adv_cfg']['eps_warmup_steps'] == 4
    resumed = trainer(nf_model(), steps=1, eps_warmup_steps=4)
    resumed.load_task_state(state)
    assert resumed(normalize(x), y)['adv_eps'].item() == pytest.approx(6 / 255)
    assert resumed(normalize(x), y)['adv_eps'].item() == pytest.approx(8 / 255)


def test_batchnorm_models_get_the_paper_baselines():
    bn = timm.create_model('resnet18', num_classes=4)
    assert trainer(bn).batch_mode == 'separate'  # BN-AT: shared BN, two forwards
    with pytest.raises(ValueError, match=r"batch_mode='concat'.*bn1"):
        trainer(timm.create_model('resnet18', num_classes=4), batch_mode='concat')
    with pytest.raises(ValueError, match="'split' needs BatchNorm"):
        trainer(nf_model(), batch_mode='split')
    task = trainer(timm.create_model('resnet18', num_classes=4), batch_mode='split')  # MBN-AT
    from timm.layers import SplitBatchNorm2d
    bn1 = task.trainable_module.bn1
    assert isinstance(bn1, SplitBatchNorm2d) and task.batch_mode == 'split'
    x, y = batch(n=4, size=32)
    task(normalize(x), y)
    # the clean half normalised by the main BN, the adversarial half by the auxiliary one: both learned stats
    assert not torch.allclose(bn1.running_mean, bn1.aux_bn[0].running_mean)
    assert trainer(task.trainable_module).batch_mode == 'split'  # already split: auto keeps it


@pytest.mark.parametrize('kwargs, match', [
    (dict(eps=-0.1), 'finite number >= 0'),
    (dict(eps=1.5), 'above 1'),
    (dict(eps='8//255'), "Invalid eps '8//255'"),
    (dict(steps=0), 'steps=0 makes no adversarial examples'),
    (dict(steps=-1), 'steps must be an integer'),
    (dict(step_size=16 / 255), 'above eps'),
    (dict(norm='L1'), "Unknown norm 'L1'; accepted: Linf, L2"),
    (dict(adv_weight=1.5), r'adv_weight \(lambda\) must be in \[0, 1\]'),
    (dict(batch_mode='mixed'), "Unknown batch_mode 'mixed'; accepted: auto, concat, separate, split"),
    (dict(eps_warmup_steps=-3), 'eps_warmup_steps must be'),
])
def test_invalid_adversarial_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdversarialConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        trainer(nf_model(), **kwargs)


def test_invalid_trainer_arguments():
    with pytest.raises(TypeError, match='accepted adversarial settings: eps, steps'):
        trainer(nf_model(), epsilon=0.1)
    with pytest.raises(ValueError, match='either adv_cfg or'):
        AdversarialTrainer(nf_model(), adv_cfg=AdversarialConfig(), eps=0.1)
    with pytest.raises(TypeError, match='needs a torch.nn.Module'):
        AdversarialTrainer('resnet50')


@pytest.mark.slow
def test_torch_compile_matches_eager():
    x, y = batch()
    eager = trainer(nf_model(), random_start=False)(normalize(x), y)
    task = trainer(nf_model(), random_start=False)
    compiled = task.compile()
    assert task.attack().model.model is task.trainable_module._orig_mod  # the attack runs on the plain module
    out = task(normalize(x), y)
    assert compiled is task.trainable_module
    assert out['loss'].item() == pytest.approx(eager['loss'].item(), rel=1e-4)
    out['loss'].backward()


def test_attack_dtype_runs_only_the_attack_in_low_precision():
    x, y = batch()
    task = trainer(nf_model(), steps=2, attack_dtype='bfloat16')
    seen = []
    model = task.trainable_module
    handle = model.register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
    out = task(normalize(x), y)
    handle.remove()
    assert task.attack().amp_dtype == torch.bfloat16
    assert seen == [(False, torch.bfloat16)] * 2 + [(True, torch.float32)]  # attack in bf16, training in fp32
    assert out['loss'].dtype == torch.float32 and out['attack_zero_grad_frac'].item() < 0.5
    with pytest.raises(ValueError, match="Unknown attack_dtype 'int8'; accepted: bfloat16, float16"):
        AdversarialConfig(attack_dtype='int8')


def test_task_state_refuses_another_recipe():
    """A resumed task (timm's train.py --resume, or the train command) continues its own method and attack."""
    x, y = batch(n=2)
    task = trainer(nf_model(), steps=1, method='trades')
    task(normalize(x), y)
    state = task.get_checkpoint_state()['task_state']
    with pytest.raises(ValueError, match="trained with method 'trades', but the task is configured with 'nofrost'"):
        trainer(nf_model(), steps=1).load_task_state(state)
    with pytest.raises(ValueError, match="attack 'pgd', but the task is configured with 'fgsm-rs'"):
        trainer(nf_model(), steps=1, method='trades', attack='fgsm-rs').load_task_state(state)
    same = trainer(nf_model(), steps=1, method='trades')
    same.load_task_state(state)
    assert same.adv_batches == 1
    trainer(nf_model(), steps=1).load_task_state({'adv_batches': 2})  # a state from before the recipes: nofrost
