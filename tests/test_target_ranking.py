"""APGD-T's target ranking: by logit (AutoAttack, the default) or by the linearised distance to the decision
boundary (MALT, Melamed, Yehudai & Shamir 2024), ``(z_y - z_c) / ||grad_x (z_y - z_c)||_q`` with q the dual
norm of the threat model's, computed in one batched pass of replicated images.

Checked against a float64 transcription of the formula (one gradient per class, Python loops), against the
exact distances of a linear classifier (where the two rankings disagree and only the linear one finds the
close boundary), by name, for the default staying AutoAttack's bit for bit, and under the mask and the active set.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn

from timm_nofrost.attacks import APGDTargeted, attack_mode, build_attack, parse_attack

from conftest import TINY_ARGS, TINY_MODEL, randomize_gains
from tiny_models import CountingModel, eval_data, trained_tiny_cnn


def _cnn() -> nn.Module:
    """The tiny CNN trained for 10 steps: it classifies ``eval_data`` already, and costs a fraction of the usual 60."""
    return trained_tiny_cnn(0, steps=10)


def _cnn64() -> nn.Module:
    return copy.deepcopy(_cnn()).double()


def _nf_resnet64() -> nn.Module:
    """A tiny timm NF-ResNet (weight-standardised convs, patched in attack mode), 32 px inputs."""
    torch.manual_seed(0)
    return randomize_gains(timm.create_model(TINY_MODEL, num_classes=4, **TINY_ARGS)).double().eval()


def _wrong_classes(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, K - 1): every class but the label, in index order."""
    return torch.stack([torch.tensor([c for c in range(n_classes) if c != label]) for label in y.tolist()])


def _transcribed_scores(pixel_model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor,
                        norm: str) -> torch.Tensor:
    """The formula, one image and one class at a time: z the logits of the clean pixels (the attack's
    PixelModel), g = d(z_y - z_c)/dx, score = (z_y - z_c) / ||g||_1 (L-inf) or ||g||_2 (L2)."""
    scores = torch.empty(classes.shape, dtype=x.dtype)
    for i in range(x.shape[0]):
        for j, c in enumerate(classes[i].tolist()):
            x_i = x[i:i + 1].clone().requires_grad_(True)
            z = pixel_model(x_i)[0]
            gap = z[y[i]] - z[c]
            g, = torch.autograd.grad(gap, x_i)
            scores[i, j] = gap.detach() / (g.abs().sum() if norm == 'Linf' else g.norm())
    return scores


def _scores(attack: APGDTargeted, x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor, **kwargs) -> torch.Tensor:
    with attack_mode(attack.model):
        return attack.linear_scores(x, y, classes, **kwargs)


def _targets(attack: APGDTargeted, x: torch.Tensor, y: torch.Tensor, active=None) -> torch.Tensor:
    """(N, n_target_classes): the targets of each row, in the order of its runs."""
    active = torch.ones(x.shape[0], dtype=torch.bool) if active is None else active
    with attack_mode(attack.model):
        return torch.stack([target for _, target in attack._runs(x, y, None, active)], dim=1)


# 1. the batched scores equal the formula, transcribed


@pytest.mark.parametrize('norm,eps', [('Linf', 8 / 255), ('L2', 0.5)])
@pytest.mark.parametrize('make', [_cnn64, _nf_resnet64], ids=['cnn', 'nf_resnet'])
def test_scores_equal_the_transcribed_formula(make, norm, eps):
    model = make()
    x, y = eval_data(5, seed=2)
    if make is _nf_resnet64:
        x = nn.functional.interpolate(x, size=32, mode='nearest')
    x = x.double()
    classes = _wrong_classes(y, 4)
    attack = APGDTargeted(model, eps=eps, norm=norm, ranking='linear')
    scores = _scores(attack, x, y, classes)
    reference = _transcribed_scores(attack.model, x, y, classes, norm)
    torch.testing.assert_close(scores, reference, rtol=1e-10, atol=0)
    assert torch.equal(scores.argsort(dim=1), reference.argsort(dim=1))
    # chunks of any size give the same scores: each (image, class) pair is scored once
    for chunk in (1, 4, 7):
        torch.testing.assert_close(_scores(attack, x, y, classes, chunk=chunk), reference, rtol=1e-10, atol=0)


def test_scores_count_each_pair_once_in_chunks():
    """5 images x 3 classes = 15 replicated images, in forwards of at most ``chunk``."""
    counting = CountingModel(_cnn64())
    calls = []
    counting.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    x, y = eval_data(5, seed=2)
    attack = APGDTargeted(counting, ranking='linear')
    _scores(attack, x.double(), y, _wrong_classes(y, 4), chunk=4)
    assert calls == [4, 4, 4, 3] and counting.examples == 15


def test_float32_ranks_as_float64():
    model32 = _cnn()
    x, y = eval_data(8, seed=2)
    classes = _wrong_classes(y, 4)
    for norm, eps in (('Linf', 8 / 255), ('L2', 0.5)):
        s32 = _scores(APGDTargeted(model32, eps=eps, norm=norm), x, y, classes)
        s64 = _scores(APGDTargeted(_cnn64(), eps=eps, norm=norm), x.double(), y, classes)
        assert s32.dtype == torch.float32
        assert torch.equal(s32.argsort(dim=1), s64.argsort(dim=1))
        torch.testing.assert_close(s32.double(), s64, rtol=1e-4, atol=0)


# 2. a linear classifier: the exact distances, where logit and distance rankings disagree


class Linear(nn.Module):
    """f(x) = W x + b on the flattened pixels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def _linear_problem():
    """4 classes on 3x4x4 images near 0.5, label 0. w_0 = 0 and w_c = -a_c s_c, with s_c a +-1 pattern on its own
    16 pixels, so ||w_0 - w_c||_1 = 16 a_c. At x = 0.5 the gaps z_0 - z_c are 1, 2, 3 and the L-inf distances
    to the boundaries 0.3, 0.05, 0.15: class 1 has the top wrong logit but the farthest boundary, class 2 the
    closest boundary but a lower logit."""
    generator = torch.Generator().manual_seed(0)
    gaps, distances = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.3, 0.05, 0.15])
    weight = torch.zeros(4, 48)
    for c in range(3):
        signs = torch.randint(0, 2, (16,), generator=generator) * 2.0 - 1
        weight[c + 1, 16 * c:16 * (c + 1)] = -gaps[c] / (16 * distances[c]) * signs
    bias = torch.zeros(4)
    bias[1:] = -gaps - weight[1:] @ torch.full((48,), 0.5)
    x = 0.5 + 0.01 * (2 * torch.rand(6, 3, 4, 4, generator=generator) - 1)
    return Linear(weight, bias).eval(), x, torch.zeros(6, dtype=torch.long)


def _true_linf_distances(model: Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, 4): (z_y - z_c) / ||w_y - w_c||_1, exact for a linear model (no box), +inf for the label."""
    with torch.no_grad():
        z = model(x)
        w = model.weight
        out = torch.full_like(z, float('inf'))
        for i, label in enumerate(y.tolist()):
            for c in range(4):
                if c != label:
                    out[i, c] = (z[i, label] - z[i, c]) / (w[label] - w[c]).abs().sum()
    return out


PIXELS = dict(mean=(0.0,) * 3, std=(1.0,) * 3)


def test_linear_model_ranks_by_true_distance():
    model, x, y = _linear_problem()
    distances = _true_linf_distances(model, x, y)
    by_distance = distances.argsort(dim=1)[:, :3]  # the label (inf) last, dropped
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(logits.argmax(1), y)
    assert (by_distance[:, 0] == 2).all() and (logits[:, 1:].argmax(1) + 1 == 1).all()  # the problem as designed

    linear = _targets(APGDTargeted(model, eps=0.1, n_target_classes=3, ranking='linear', **PIXELS), x, y)
    assert torch.equal(linear, by_distance)
    torch.testing.assert_close(
        _scores(APGDTargeted(model, eps=0.1, **PIXELS), x, y, linear), distances.gather(1, linear))
    logit = _targets(APGDTargeted(model, eps=0.1, n_target_classes=3, **PIXELS), x, y)
    assert torch.equal(logit, logits.scatter(1, y[:, None], float('-inf')).argsort(dim=1, descending=True)[:, :3])
    assert (logit[:, 0] == 1).all() and not torch.equal(logit, linear)


def test_linear_ranking_finds_the_close_boundary_with_one_target():
    """eps 0.1 lies between the closest boundary (~0.05, class 2) and the top-logit class's (~0.3): one target
    ranked linearly fools every image, one ranked by logit none (its boundary is out of reach)."""
    model, x, y = _linear_problem()
    distances = _true_linf_distances(model, x, y)
    assert (distances[:, 2] < 0.07).all() and (distances[:, 1] > 0.25).all()
    linear = build_attack(parse_attack('apgd-t-20-1-linear'), model, eps=0.1, **PIXELS)(x, y)
    logit = build_attack(parse_attack('apgd-t-20-1'), model, eps=0.1, **PIXELS)(x, y)
    assert not linear.correct.any() and logit.correct.all()
    assert (linear.logits.argmax(1) == 2).all()
    assert (linear.x_adv - x).abs().max().item() <= 0.1 + 1e-6


def test_zero_gradient_ranks_last():
    """A class whose logit differs from the label's by a constant (same weights) cannot be reached by a gradient:
    score +inf, ranked after every reachable class."""
    model, x, y = _linear_problem()
    with torch.no_grad():
        model.weight[2] = model.weight[0]  # the closest boundary made unreachable
    attack = APGDTargeted(model, eps=0.1, n_target_classes=3, ranking='linear', **PIXELS)
    scores = _scores(attack, x, y, _wrong_classes(y, 4))
    assert torch.isinf(scores[:, 1]).all() and (scores[:, 1] > 0).all() and torch.isfinite(scores[:, [0, 2]]).all()
    assert torch.equal(_targets(attack, x, y), torch.tensor([[3, 1, 2]]).expand(6, 3))


def test_candidates_are_the_top_logit_classes():
    """With ``n_candidates=2`` only the two wrong classes with the highest logits are scored (two replicated images
    per row) and reordered; the third follows them, in logit order."""
    model = _cnn64()
    x, y = eval_data(8, seed=2)
    x = x.double()
    counting = CountingModel(model)
    attack = APGDTargeted(counting, n_target_classes=3, ranking='linear', n_candidates=2)
    targets = _targets(attack, x, y)
    assert counting.examples == 8 * (1 + 2)
    with torch.no_grad():
        by_logit = attack.model(x).scatter(1, y[:, None], float('-inf')).argsort(dim=1, descending=True)[:, :3]
    candidates = by_logit[:, :2]
    closest = candidates.gather(1, _scores(attack, x, y, candidates).argsort(dim=1))
    assert torch.equal(targets, torch.cat([closest, by_logit[:, 2:]], dim=1))
    assert not torch.equal(closest, candidates)  # the ranking changed some row's order


# 3. names


@pytest.mark.parametrize('name,canonical,steps,targets,ranking', [
    ('apgd-t', 'apgd-t', 100, 9, 'logit'),
    ('apgd-t-100-9-logit', 'apgd-t', 100, 9, 'logit'),
    ('apgd-t-logit', 'apgd-t', 100, 9, 'logit'),
    ('apgd-t-50', 'apgd-t-50', 50, 9, 'logit'),
    ('apgd-t-50-9', 'apgd-t-50', 50, 9, 'logit'),
    ('apgd-t-100-3', 'apgd-t-100-3', 100, 3, 'logit'),
    ('apgd-t-100-3-logit', 'apgd-t-100-3', 100, 3, 'logit'),
    ('apgd-t-linear', 'apgd-t-100-9-linear', 100, 9, 'linear'),
    ('apgd-t-25-linear', 'apgd-t-25-9-linear', 25, 9, 'linear'),
    ('APGD-T-100-3-Linear', 'apgd-t-100-3-linear', 100, 3, 'linear'),
])
def test_names(name, canonical, steps, targets, ranking):
    spec = parse_attack(name)
    assert (spec.name, spec.kind, spec.steps, spec.targets, spec.ranking) == (
        canonical, 'apgd-t', steps, targets, ranking)
    assert parse_attack(spec.name) == spec  # canonical names round trip
    attack = build_attack(spec, _cnn(), eps=8 / 255)
    assert isinstance(attack, APGDTargeted)
    assert (attack.steps, attack.n_target_classes, attack.ranking) == (steps, targets, ranking)


@pytest.mark.parametrize('name', ['apgd-t-100-0', 'apgd-t-100-0-linear', 'apgd-t-100-3-closest', 'apgd-t-linear-3',
                                  'apgd-t-100-3-4', 'apgd-t--linear', 'apgd-ce-100-3', 'apgd-dlr-linear'])
def test_bad_names(name):
    with pytest.raises(ValueError, match=rf"{name}'.*accepted: .*apgd-t\[-<steps>\[-<targets>\]\]\[-logit\|-linear\]"):
        parse_attack(name)


def test_constructor_checks():
    model = _cnn()
    with pytest.raises(ValueError, match=r"Unknown target ranking 'closest'; accepted: logit, linear"):
        APGDTargeted(model, ranking='closest')
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf'n_target_classes must be a positive integer, got {bad!r}'):
            APGDTargeted(model, n_target_classes=bad)
    with pytest.raises(ValueError, match='n_candidates must be a positive integer'):
        APGDTargeted(model, n_candidates=0)


# 4. the default is AutoAttack's, unchanged


def test_default_is_the_logit_ranking_unchanged():
    model = _cnn()
    x, y = eval_data(16, seed=2)
    default = APGDTargeted(model, eps=4 / 255, steps=6)
    assert (default.n_target_classes, default.ranking) == (9, 'logit')
    with torch.no_grad():
        logits = default.model(x)
    # AutoAttack's choice: the wrong classes by decreasing logit (all 3 of this 4-class model)
    expected = logits.scatter(1, y[:, None], float('-inf')).argsort(dim=1, descending=True)[:, :3]
    assert torch.equal(_targets(default, x, y), expected)
    ours = default(x, y)
    explicit = APGDTargeted(model, eps=4 / 255, steps=6, n_target_classes=9, ranking='logit')(x, y)
    assert torch.equal(ours.x_adv, explicit.x_adv) and torch.equal(ours.correct, explicit.correct)
    assert 0 < ours.accuracy < 1  # some rows fooled, some not: the comparison covers both


# 5. mask and active set


def test_rows_outside_the_mask_are_not_ranked():
    """Ranking the masked rows costs their forward and one replicated image per candidate class, nothing for the
    other rows; the masked rows get the targets they get without the mask."""
    x, y = eval_data(12, seed=2)
    x = x.double()
    mask = torch.arange(12) % 3 != 0
    counting = CountingModel(_cnn64())
    attack = APGDTargeted(counting, n_target_classes=3, ranking='linear')
    masked = _targets(attack, x, y, mask)
    assert counting.examples == int(mask.sum()) * (1 + 3)
    assert torch.equal(masked[mask], _targets(attack, x, y)[mask])


@pytest.mark.parametrize('norm,eps', [('Linf', 4 / 255), ('L2', 0.2)])
def test_mask_and_active_set_keep_per_row_outcomes(norm, eps):
    """In float64 (dropping rows changes batch shapes and with them float32 rounding, not the algorithm)."""
    model = _cnn64()
    x, y = eval_data(18, seed=3)
    x = x.double()
    mask = torch.arange(18) % 3 != 0

    def make(m, active_set=True):
        return APGDTargeted(m, eps=eps, norm=norm, steps=5, n_target_classes=2, ranking='linear', seed=1,
                            active_set=active_set)

    whole = make(model)(x, y)
    assert 0 < whole.accuracy < 1
    masked = make(model)(x, y, mask=mask)
    assert torch.equal(masked.correct[mask], whole.correct[mask]) and not masked.correct[~mask].any()
    assert torch.equal(masked.x_adv[~mask], x[~mask])
    counting_full, counting_active = CountingModel(model), CountingModel(model)
    full = make(counting_full, active_set=False)(x, y)
    active = make(counting_active)(x, y)
    assert torch.equal(full.correct, active.correct) and torch.equal(active.correct, whole.correct)
    assert counting_active.examples < counting_full.examples
