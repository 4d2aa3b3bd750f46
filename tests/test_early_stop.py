"""Exact early stopping in PGD: once an example's iterate repeats an earlier one, it leaves the attack with the
outcome the full run would have had, and the passes it saves are exactly the ones predicted from the full run's
iterates.

The reference is the same attack with ``early_stop=False`` (and, for the pass count, ``active_set=False``),
whose iterates are recorded by wrapping the projection. Outcomes must agree bit for bit: ``correct`` and the best
iterate ``x_adv``. The logits at the best iterate are the model's output at the same point, computed in a batch
of another size once rows leave, so they agree up to the CPU kernels' batch-size-dependent rounding.
"""
import copy

import pytest
import timm
import torch

import timm_nofrost.attacks.pgd as pgd_module
from timm_nofrost.attacks import FGSM, PGD, PixelModel
from timm_nofrost.attacks.base import IterateHashes, random_delta

from conftest import TINY_ARGS, TINY_MODEL, randomize_gains
from tiny_models import eval_data, trained_tiny_cnn


def _cnn(seed: int, dtype: torch.dtype):
    return copy.deepcopy(trained_tiny_cnn(seed)).to(dtype)


def _nf_resnet(dtype: torch.dtype):
    torch.manual_seed(0)
    return randomize_gains(timm.create_model(TINY_MODEL, num_classes=4, **TINY_ARGS)).to(dtype).eval()


MODELS = {'cnn0': lambda dt: _cnn(0, dt), 'cnn1': lambda dt: _cnn(1, dt), 'nf_resnet': _nf_resnet}


def _data(model_name: str, dtype: torch.dtype, n: int = 40):
    x, y = eval_data(n, seed=3)
    if model_name == 'nf_resnet':
        x = torch.nn.functional.interpolate(x, size=32, mode='nearest')
    return x.to(dtype), y


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-12 if a.dtype == torch.float64 else 1e-5, atol=1e-12)


# (eps, norm, steps, step_fraction, restarts): small radii keep most images robust (the examples that cycle),
# large steps make cycles frequent, the default step makes them rare
SETTINGS = [(1 / 255, 'Linf', 20, 0.5, 1), (1 / 255, 'Linf', 12, 0.125, 2), (4 / 255, 'Linf', 20, 1.0, 1),
            (2 / 255, 'Linf', 10, None, 3), (16 / 255, 'L2', 15, 0.5, 1)]


@pytest.mark.parametrize('model_name,dtype', [
    ('cnn0', torch.float32), ('cnn1', torch.float64),  # the default suite; the other pairs in the slow one
    pytest.param('cnn0', torch.float64, marks=pytest.mark.slow), pytest.param('cnn1', torch.float32, marks=pytest.mark.slow),
    pytest.param('nf_resnet', torch.float64, marks=pytest.mark.slow)])
@pytest.mark.parametrize('setting', SETTINGS, ids=lambda s: f'{s[1]}-{s[0]:.3f}-{s[2]}x{s[3]}-r{s[4]}')
@pytest.mark.parametrize('active_set', [False, True])
def test_outcome_identical_to_full_run(model_name, dtype, setting, active_set):
    if model_name == 'nf_resnet' and setting[4] > 1:
        pytest.skip('the NF-ResNet runs without restarts')
    eps, norm, steps, fraction, restarts = setting
    model = MODELS[model_name](dtype)
    x, y = _data(model_name, dtype)
    saved = 0
    for seed in (0, 1):
        make = dict(eps=eps, norm=norm, steps=steps, step_fraction=fraction, restarts=restarts, seed=seed,
                    active_set=active_set)
        full = PGD(model, early_stop=False, **make)(x, y)
        stopped = PGD(model, early_stop=True, **make)(x, y)
        assert torch.equal(stopped.correct, full.correct)
        assert torch.equal(stopped.x_adv, full.x_adv), (stopped.x_adv != full.x_adv).flatten(1).any(1).nonzero()
        assert _close(stopped.logits, full.logits)
        assert stopped.backward_passes <= full.backward_passes
        saved += full.backward_passes - stopped.backward_passes
    if model_name != "nf_resnet" and norm == "Linf" and fraction is not None and fraction >= 0.5:
        assert saved > 0  # these settings cycle: the test exercises early stopping, not only its absence


def _full_run_iterates(model, x, y, **settings):
    """Every iterate delta_0..delta_steps and whether it fools, per example, from the full run (one restart)."""
    deltas, logits = [], []
    project = pgd_module.project

    def recording(*args):
        delta = project(*args)
        deltas.append(delta.clone())
        return delta

    attack = PGD(model, early_stop=False, active_set=False, **settings)
    handle = attack.model.register_forward_hook(lambda m, i, out: logits.append(out.detach().clone()))
    pgd_module.project = recording
    try:
        attack(x, y)
    finally:
        pgd_module.project = project
        handle.remove()
    start = random_delta(x, attack.eps_tensor(x), attack.norm, attack.generator(x.device))
    fooled = torch.stack([out.argmax(1) != y for out in logits])  # (steps + 1, N): logits at delta_0..delta_steps
    return [start] + deltas, fooled


def _expected_passes(deltas, fooled, steps: int, active_set: bool):
    """Backward and forward passes of the early-stopped run, from the full run: a row is scored at iterate k
    while k precedes its first repeat R (the check comes before k's forward) and, with the active set, does not
    follow its first fooling iterate F; the last iterate gets a forward only."""
    backward = forward = 0
    for row in range(deltas[0].shape[0]):
        bits = [d[row].view(torch.int16) for d in deltas]
        repeat = next((k for k in range(1, steps + 1) if any(torch.equal(bits[k], bits[j]) for j in range(k))),
                      steps + 1)
        first_fool = next((k for k in range(steps + 1) if fooled[k, row]), steps + 1) if active_set else steps + 1
        graded = min(steps, repeat, first_fool + 1)
        backward += graded
        forward += graded + int(repeat > steps and first_fool >= steps)
    return backward, forward


@pytest.mark.parametrize('model_name,dtype', [('cnn0', torch.float32), ('cnn1', torch.float64),
                                              pytest.param('nf_resnet', torch.float64, marks=pytest.mark.slow)])
@pytest.mark.parametrize('active_set', [False, True])
def test_passes_saved_exactly(model_name, dtype, active_set):
    model = MODELS[model_name](dtype)
    x, y = _data(model_name, dtype)
    settings = dict(eps=2 / 255, steps=16, step_fraction=0.5, seed=1)
    deltas, fooled = _full_run_iterates(model, x, y, **settings)
    backward, forward = _expected_passes(deltas, fooled, 16, active_set)
    result = PGD(model, early_stop=True, active_set=active_set, **settings)(x, y)
    assert (result.backward_passes, result.forward_passes) == (backward, forward)
    full = PGD(model, early_stop=False, active_set=False, **settings)(x, y)
    assert (full.backward_passes, full.forward_passes) == (16 * x.shape[0], 17 * x.shape[0])
    if model_name != 'nf_resnet':  # the untrained NF-ResNet does not cycle here: the count must then be the full one
        assert backward < 16 * x.shape[0]  # something was saved, and exactly that much


def test_fgsm_and_no_repeat_unchanged():
    """FGSM (one step) and a step too small to cycle: the same result and work as without early stopping."""
    model = _cnn(0, torch.float32)
    x, y = eval_data(32)
    for make in (lambda es: FGSM(model, eps=2 / 255, random_start=True, early_stop=es),
                 lambda es: PGD(model, eps=2 / 255, steps=5, step_fraction=0.01, early_stop=es)):
        a, b = make(False)(x, y), make(True)(x, y)
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.correct, b.correct)
        assert (a.forward_passes, a.backward_passes) == (b.forward_passes, b.backward_passes)


class _Noisy(torch.nn.Module):
    """A randomised defence: noise drawn from torch's global generator at every forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.pretrained_cfg = model, model.pretrained_cfg

    def forward(self, x):
        return self.model(x + 1e-3 * torch.randn_like(x))


def test_off_for_a_model_that_draws_random_numbers():
    model = _Noisy(_cnn(0, torch.float32))
    x, y = eval_data(32)
    torch.manual_seed(0)
    a = PGD(model, eps=1 / 255, steps=12, step_fraction=1.0, early_stop=True, active_set=False)(x, y)
    assert a.backward_passes == 12 * 32  # no example left early: its iterates do not determine its future


def test_off_on_non_deterministic_devices(monkeypatch):
    """Off where the device is not known to be deterministic (stands in for CUDA without deterministic
    algorithms: the same input could give another gradient sign, so a repeat would not repeat the run)."""
    monkeypatch.setattr(pgd_module, 'deterministic_device', lambda device: False)
    model = _cnn(0, torch.float32)
    x, y = eval_data(32)
    a = PGD(model, eps=1 / 255, steps=12, step_fraction=1.0, early_stop=True, active_set=False)(x, y)
    assert a.backward_passes == 12 * 32


def test_hash_tells_sign_flips_apart():
    """L-inf iterates sit on +-eps: flipping an even number of coordinates' signs must change the hash (it
    would not with whole float words times odd weights, where each flip adds 2^31 or 2^63)."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        delta = torch.full((1, 3, 8, 8), 4 / 255, dtype=dtype)
        hashes = IterateHashes(delta, 8)
        for flips in (2, 4, 64):
            other = delta.clone()
            other.view(-1)[:flips] *= -1
            assert not bool(hashes.add(other)), (dtype, flips)
        assert bool(hashes.add(delta.clone()))  # the first iterate again: a repeat


def test_pixel_model_and_counts_in_engine():
    """The evaluation engine passes ``early_stop`` through and counts passes per attack."""
    from timm_nofrost.attacks import ThreatModel, parse_attack
    from timm_nofrost.evaluate.engine import RobustCounter
    model = PixelModel.from_model(_cnn(0, torch.float32))
    x, y = eval_data(32)
    counts = {}
    for es in (False, True):
        counter = RobustCounter(model, [parse_attack('pgd-12')], [ThreatModel(1 / 255)], early_stop=es)
        counter.update(x, y)
        counts[es] = {k: v for k, v in counter.cost['1/255']['pgd-12'].items() if k != 'seconds'}
    assert counts[False] == {'forward': 13 * 32, 'backward': 12 * 32}
    assert counts[True]['backward'] <= counts[False]['backward']
