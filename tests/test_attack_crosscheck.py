"""Our attacks against independent implementations, on a small CNN trained in the test.

The task is ``color_stripes`` at 16x16 with a per-image contrast drawn in [0.02, 0.2], so that the examples
lie at different distances from the decision boundary and robust accuracy falls gradually with eps. At
eps = 3/255 the trained net keeps roughly half of the examples under PGD: differences between attacks
show up there, and a few points of disagreement mean something over 512 examples.

* our ``PGD`` and ``torchattacks.PGD`` (same eps, step size, steps, random start) agree within 2 points;
* the official AutoAttack (standard version, through our wrapper) is at most as accurate as our PGD;
* our APGD-CE is at most as accurate as our PGD with the same number of steps (up to noise).

Test-only packages: ``pip install scipy pyautoattack`` then ``pip install --no-deps torchattacks==3.5.1`` (it
imports scipy; its ``requests~=2.25.1`` pin is not used at runtime and would downgrade idna). The tests skip
when they are missing.
"""
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_resnets import color_stripes
from timm_nofrost.attacks import APGD, PGD, AutoAttack, PixelModel, autoattack_available

EPS = 3 / 255
STEPS = 10
STEP_SIZE = EPS / 4  # 2.5 * eps / steps
N_EVAL = 512
N_AUTOATTACK = 256  # Square's 5,000 queries per robust example dominate the run time


def contrast_stripes(n: int, seed: int):
    """``color_stripes`` at 16x16, each image's contrast around grey scaled by a factor in [0.02, 0.2]."""
    x, y = color_stripes(n, 16, seed=seed)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.02, 0.2, generator=torch.Generator().manual_seed(seed + 100))
    return (0.5 + contrast * (x - 0.5)).clamp(0, 1), y


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    """Tiny ops run as fast on one thread, and one thread does not collapse when other jobs share the cores
    (two threads did: AutoAttack's thousands of small forwards went from 11 s to 60-90 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def trained():
    """A two-conv net trained for 60 Adam steps (well under a second on CPU); label smoothing keeps its logits
    moderate (saturated softmax gradients are denormal floats, which are slow on CPU)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
        model = PixelModel(net, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        x_train, y_train = contrast_stripes(1024, seed=1)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        for _ in range(60):
            idx = torch.randint(0, x_train.shape[0], (64,), generator=generator)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    x, y = contrast_stripes(N_EVAL, seed=2)
    with torch.no_grad():
        clean = (model(x).argmax(dim=1) == y).float().mean().item()
    assert clean > 0.95, f'the tiny net did not learn the task (clean accuracy {clean:.3f})'
    return model, x, y


@pytest.fixture(scope='module')
def our_pgd(trained):
    model, x, y = trained
    result = PGD(model, eps=EPS, steps=STEPS, step_size=STEP_SIZE, random_start=True, seed=0)(x, y)
    # the comparisons below only mean something when the attack neither always nor never succeeds
    assert 0.1 < result.accuracy < 0.9, f'PGD robust accuracy {result.accuracy:.3f}: retune EPS'
    return result


def test_pgd_agrees_with_torchattacks(trained, our_pgd):
    torchattacks = pytest.importorskip(
        'torchattacks', reason='torchattacks (or scipy, which it imports) not installed: '
                               'pip install scipy && pip install --no-deps torchattacks==3.5.1')
    model, x, y = trained
    attack = torchattacks.PGD(model, eps=EPS, alpha=STEP_SIZE, steps=STEPS, random_start=True)
    with torch.random.fork_rng():  # torchattacks draws its random start from the global generator
        torch.manual_seed(0)
        x_adv = attack(x, y)
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    with torch.no_grad():
        theirs = (model(x_adv).argmax(dim=1) == y).float().mean().item()
    ours = our_pgd.accuracy
    print(f'PGD-{STEPS} eps {EPS * 255:.0f}/255 on {N_EVAL}: ours {ours:.4f}, torchattacks {theirs:.4f}')
    assert abs(ours - theirs) <= 0.02, f'PGD robust accuracy: ours {ours:.4f} vs torchattacks {theirs:.4f}'


def test_autoattack_not_above_pgd(trained, our_pgd):
    if not autoattack_available():
        pytest.skip('pyautoattack not installed (pip install pyautoattack)')
    model, x, y = trained
    x, y = x[:N_AUTOATTACK], y[:N_AUTOATTACK]
    rng = torch.get_rng_state()
    result = AutoAttack(model, eps=EPS, seed=0)(x, y)
    assert torch.equal(torch.get_rng_state(), rng), 'AutoAttack changed the global RNG state'
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype
    assert result.x_adv.min().item() >= 0 and result.x_adv.max().item() <= 1
    assert (result.x_adv - x).abs().max().item() <= EPS + 1e-5
    pgd = our_pgd.correct[:N_AUTOATTACK].float().mean().item()
    print(f'eps {EPS * 255:.0f}/255 on {N_AUTOATTACK}: AutoAttack (standard) {result.accuracy:.4f}, '
          f'our PGD-{STEPS} {pgd:.4f}')
    assert result.accuracy <= pgd, f'AutoAttack {result.accuracy:.4f} above our PGD {pgd:.4f}'


def test_apgd_not_above_pgd_at_equal_steps(trained, our_pgd):
    model, x, y = trained
    apgd = APGD(model, eps=EPS, steps=STEPS, loss='ce', seed=0)(x, y).accuracy
    print(f'eps {EPS * 255:.0f}/255 on {N_EVAL}, {STEPS} steps: APGD-CE {apgd:.4f}, PGD {our_pgd.accuracy:.4f}')
    assert apgd <= our_pgd.accuracy + 0.01, f'APGD-CE {apgd:.4f} above PGD {our_pgd.accuracy:.4f} at {STEPS} steps'


def test_autoattack_without_the_package_is_a_clear_import_error(monkeypatch, trained):
    for name in ('pyautoattack', 'autoattack'):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    assert not autoattack_available()
    with pytest.raises(ImportError, match='pip install pyautoattack'):
        AutoAttack(trained[0], eps=EPS)


def test_autoattack_needs_four_classes():
    if not autoattack_available():
        pytest.skip('pyautoattack not installed (pip install pyautoattack)')
    model = PixelModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)), (0.5,) * 3, (0.25,) * 3)
    x, y = torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match='at least 4 classes'):
        AutoAttack(model, eps=EPS)(x, y)
