"""The active set: attacks stop working on fooled examples, with outcomes identical to the full run.

The reference is the same attack with ``active_set=False``: every step (and restart, and target) on every
example, keeping each example's best iterate. The comparison runs in float64: dropping rows changes the batch
shape and with it the blocking of the convolution kernels, and these tests are about the algorithm, not about
float32 rounding.
"""
import copy

import pytest
import timm
import torch

from timm_nofrost.attacks import APGD, FGSM, PGD, APGDTargeted, PixelModel

from conftest import TINY_ARGS, TINY_MODEL, randomize_gains
from tiny_models import CountingModel, eval_data, trained_tiny_cnn


def _cnn(seed: int):
    return copy.deepcopy(trained_tiny_cnn(seed)).double()


def _nf_resnet():
    torch.manual_seed(0)
    model = randomize_gains(timm.create_model(TINY_MODEL, num_classes=4, **TINY_ARGS))
    return model.double().eval()


MODELS = {'cnn0': lambda: _cnn(0), 'cnn1': lambda: _cnn(1), 'nf_resnet': _nf_resnet}


def _data(model_name: str, n: int = 48, seed: int = 3):
    x, y = eval_data(n, seed=seed)
    if model_name == 'nf_resnet':  # 32 px for the NF-ResNet's stem
        x = torch.nn.functional.interpolate(x, size=32, mode='nearest')
        with torch.no_grad():
            y = _nf_resnet()((x.double() - 0.5) / 0.25).argmax(1)  # labels it gets right, so attacks have work
        y[::5] = (y[::5] + 1) % 4  # and some it gets wrong
    return x.double(), y


ATTACKS = {
    'pgd-linf': lambda m, eps, seed, act: PGD(m, eps=eps, steps=8, seed=seed, active_set=act),
    'pgd-linf-restarts': lambda m, eps, seed, act: PGD(m, eps=eps, steps=4, restarts=3, seed=seed, active_set=act),
    'pgd-l2': lambda m, eps, seed, act: PGD(m, eps=eps * 16, steps=6, norm='L2', restarts=2, seed=seed,
                                            active_set=act),
    'pgd-margin-nostart': lambda m, eps, seed, act: PGD(m, eps=eps, steps=6, loss='margin', random_start=False,
                                                        seed=seed, active_set=act),
    'fgsm': lambda m, eps, seed, act: FGSM(m, eps=eps, seed=seed, active_set=act),
    'fgsm-rs': lambda m, eps, seed, act: FGSM(m, eps=eps, random_start=True, seed=seed, active_set=act),
    'apgd-ce': lambda m, eps, seed, act: APGD(m, eps=eps, steps=12, seed=seed, active_set=act),
    'apgd-ce-restarts': lambda m, eps, seed, act: APGD(m, eps=eps, steps=8, restarts=2, seed=seed, active_set=act),
    'apgd-dlr-l2': lambda m, eps, seed, act: APGD(m, eps=eps * 16, steps=10, loss='dlr', norm='L2', seed=seed,
                                                  active_set=act),
    'apgd-t': lambda m, eps, seed, act: APGDTargeted(m, eps=eps, steps=8, n_target_classes=3, seed=seed,
                                                     active_set=act),
}


def _check_identical(model, x, y, make, eps, seed, target=None):
    counting_full, counting_active = CountingModel(model), CountingModel(model)
    full = make(counting_full, eps, seed, False)(x, y, target)
    active = make(counting_active, eps, seed, True)(x, y, target)
    assert torch.equal(active.correct, full.correct), (active.correct ^ full.correct).nonzero()
    assert active.accuracy == full.accuracy
    fooled = ~active.correct
    pixel = PixelModel.from_model(model)
    with torch.no_grad():
        pred = pixel(active.x_adv).argmax(1)
    reached = pred == target if target is not None else pred != y
    assert torch.equal(reached[fooled], torch.ones_like(reached[fooled]))  # a fooling iterate
    assert torch.equal(reached[~fooled], torch.zeros_like(reached[~fooled]))
    return full, active, counting_full.examples, counting_active.examples


@pytest.mark.parametrize('attack', list(ATTACKS))
@pytest.mark.parametrize('model_name', list(MODELS))
def test_active_set_identical_outcomes(attack, model_name):
    model = MODELS[model_name]()
    x, y = _data(model_name, n=24 if model_name == 'nf_resnet' else 48)
    for eps, seed in ((4 / 255, 0), (12 / 255, 1)):
        full, active, work_full, work_active = _check_identical(model, x, y, ATTACKS[attack], eps, seed)
        norm = 'L2' if 'l2' in attack else 'Linf'
        radius = (active.x_adv - x).flatten(1).abs().amax(1) if norm == 'Linf' else (active.x_adv - x).flatten(1).norm(dim=1)
        assert radius.max().item() <= (eps * 16 if norm == 'L2' else eps) + 1e-9
        assert work_active <= work_full
        if (~full.correct).any() and not attack.startswith('fgsm'):  # fooled before the last step: less work
            assert work_active < work_full, (work_active, work_full)


@pytest.mark.parametrize('attack', ['pgd-linf-restarts', 'apgd-ce', 'apgd-dlr-l2'])
def test_active_set_targeted(attack):
    model = _cnn(0)
    x, y = _data('cnn0')
    target = (y + 1 + torch.arange(y.shape[0]) % 3) % 4
    for eps in (8 / 255, 24 / 255):
        full, active, work_full, work_active = _check_identical(model, x, y, ATTACKS[attack], eps, 2, target)
        if eps > 8 / 255:
            assert not active.correct.all()  # the larger radius reaches some targets
        if (~full.correct).any():
            assert work_active < work_full


def test_fooled_rows_leave_the_loop():
    """A model that misclassifies every other example: those rows cost one forward, the others every step."""
    model = _cnn(0)
    x, y = _data('cnn0', n=16)
    with torch.no_grad():
        pred = PixelModel.from_model(model)(x).argmax(1)
    y = torch.where(torch.arange(16) % 2 == 0, pred, (pred + 1) % 4)  # odd rows misclassified from the start
    counting = CountingModel(model)
    # early stopping off: at this radius the robust rows' iterates repeat within the 5 steps
    result = PGD(counting, eps=1e-4, steps=5, random_start=False, seed=0, early_stop=False)(x, y)
    assert not result.correct[1::2].any()
    robust = int(result.correct.sum())
    # the first step sees all 16; then only the robust even rows: 4 more steps and the final forward
    assert counting.examples == 16 + robust * 5


def test_generate_attacks_the_whole_batch():
    """The training path never drops rows: every example is forwarded at every step."""
    model = _cnn(0)
    x, y = _data('cnn0', n=16)
    counting = CountingModel(model)
    attack = PGD(counting, eps=32 / 255, steps=4, seed=0)
    from timm_nofrost.attacks import attack_mode
    with attack_mode(attack.model):
        x_adv, _ = attack.generate(x, y, generator=torch.Generator().manual_seed(0))
    assert counting.examples == 16 * 4
    assert (x_adv - x).abs().max().item() <= 32 / 255 + 1e-9


@pytest.mark.parametrize('attack', ['pgd-linf-restarts', 'apgd-ce', 'apgd-t', 'fgsm-rs'])
def test_mask_attacks_rows_as_without_mask(attack):
    """Rows outside the mask are untouched and not robust; rows inside get exactly their unmasked outcome."""
    model = _cnn(1)
    x, y = _data('cnn1')
    mask = torch.arange(x.shape[0]) % 3 != 0
    whole = ATTACKS[attack](model, 8 / 255, 0, True)(x, y)
    masked = ATTACKS[attack](model, 8 / 255, 0, True)(x, y, mask=mask)
    assert torch.equal(masked.correct[mask], whole.correct[mask])
    assert not masked.correct[~mask].any()
    assert torch.equal(masked.x_adv[~mask], x[~mask])


def test_mask_validated():
    model = _cnn(0)
    x, y = _data('cnn0', n=4)
    with pytest.raises(ValueError, match='mask must be a bool tensor of shape \\(4,\\)'):
        PGD(model, eps=0.01)(x, y, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match='mask must be a bool tensor'):
        PGD(model, eps=0.01)(x, y, mask=torch.ones(4))
