"""Sanity checks that flag weak or broken robustness evaluations (Carlini et al., 2019).

Each check returns a ``SanityFlag`` with a one-line explanation. They run on a small subset of correctly
classified examples with cheap extra attacks, so every report carries them.
"""
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from ..attacks import FGSM, PGD, AutoAttack, ThreatModel, autoattack_available
from ..pixels import PixelModel

__all__ = ['SanityFlag', 'check_monotone_in_eps', 'check_zero_gradients', 'run_attack_checks', 'check_black_box',
           'LARGE_EPS', 'BLACK_BOX_QUERIES']

LARGE_EPS = {'Linf': 0.5, 'L2': 50.0}  # large enough to turn any image into any other
ZERO_GRAD_LIMIT = 0.01
BLACK_BOX_QUERIES = 1000  # Square's budget in the black-box check (5,000 in AutoAttack)


@dataclass
class SanityFlag:
    name: str
    ok: bool
    value: str
    message: str

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def _tol(n: int) -> float:
    """Noise allowance: two examples' worth of accuracy."""
    return 2.0 / max(n, 1)


def check_monotone_in_eps(accuracy: Dict[float, Dict[str, float]], n: int) -> SanityFlag:
    """Robust accuracy must not increase with eps for any attack."""
    eps_sorted = sorted(accuracy)
    problems = []
    for attack in accuracy[eps_sorted[0]]:
        accs = [accuracy[e][attack] for e in eps_sorted if accuracy[e].get(attack) is not None]  # None: not measured
        for (e0, a0), (e1, a1) in zip(zip(eps_sorted, accs), zip(eps_sorted[1:], accs[1:])):
            if a1 > a0 + _tol(n):
                problems.append(f'{attack}: {a0:.1%} at {e0:.4g} -> {a1:.1%} at {e1:.4g}')
    return SanityFlag(
        'accuracy non-increasing in eps', not problems, '; '.join(problems) or 'yes',
        'A larger threat model contains the smaller one: accuracy rising with eps means the attack is failing.')


def check_zero_gradients(zero_fracs: Dict[str, float]) -> SanityFlag:
    worst = max(zero_fracs.items(), key=lambda kv: kv[1], default=('-', 0.0))
    return SanityFlag(
        'input gradients are non-zero', worst[1] <= ZERO_GRAD_LIMIT, f'max {worst[1]:.2%} zero entries ({worst[0]})',
        'Zero gradients (fp16 underflow, saturation, non-differentiable layers) stall gradient attacks.')


def run_attack_checks(
        model: PixelModel,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        steps: int,
        seed: int = 0,
        amp_dtype: Optional[torch.dtype] = None,
) -> List[SanityFlag]:
    """Checks that need extra attacks in ``threat``, on correctly classified examples ``x, y`` (already on device).

    ``model`` is a ``PixelModel`` (or a model with a timm ``pretrained_cfg``: wrapped once here).
    """
    model = PixelModel.from_model(model)
    tol = _tol(x.shape[0])
    common = dict(seed=seed, amp_dtype=amp_dtype)
    large = ThreatModel(LARGE_EPS[threat.norm], threat.norm)
    big = PGD(model, threat=large, steps=max(steps, 20), **common)(x, y)
    fgsm = FGSM(model, threat=threat, **common)(x, y)
    pgd = PGD(model, threat=threat, steps=steps, **common)(x, y)
    pgd2 = PGD(model, threat=threat, steps=2 * steps, **common)(x, y)
    same = torch.equal(PGD(model, threat=threat, steps=steps, **common)(x, y).x_adv, pgd.x_adv)
    return [
        SanityFlag('near 0 % at a very large eps', big.accuracy <= tol, f'{big.accuracy:.1%} at eps={large.eps}',
                   'With an unbounded budget every image can be changed into another class: a non-zero accuracy '
                   'signals gradient masking or a bug.'),
        SanityFlag('PGD not weaker than FGSM', pgd.accuracy <= fgsm.accuracy + tol,
                   f'PGD-{steps} {pgd.accuracy:.1%} vs FGSM {fgsm.accuracy:.1%}',
                   'An iterative attack that does worse than a single step points to masked or noisy gradients.'),
        SanityFlag('more steps do not raise accuracy', pgd2.accuracy <= pgd.accuracy + tol,
                   f'PGD-{2 * steps} {pgd2.accuracy:.1%} vs PGD-{steps} {pgd.accuracy:.1%}',
                   'Doubling the steps must not help the model beyond noise; if it does, the attack has not '
                   'converged.'),
        SanityFlag('deterministic for a seed', same, 'identical' if same else 'different adversarial examples',
                   'The same attack with the same seed must give the same examples; randomness in the model makes '
                   'robustness numbers irreproducible (and can hide behind expectation-over-transformation).'),
    ]


def check_black_box(model: PixelModel, x: torch.Tensor, y: torch.Tensor, white_box_correct: torch.Tensor,
                    threat: ThreatModel, seed: int = 0, queries: int = BLACK_BOX_QUERIES) -> SanityFlag:
    """Square (the official code, ``queries`` queries) on the images of ``x`` that every white-box attack left
    robust (``white_box_correct``): an image it breaks means the gradients misled the white-box attacks."""
    name = 'black-box not stronger than white-box'
    message = ('A black-box attack breaking images the gradient attacks could not points to masked or obfuscated '
               'gradients: the white-box numbers overstate robustness.')
    if not autoattack_available():
        return SanityFlag(name, False, "not run: needs the 'pyautoattack' package (pip install pyautoattack)", message)
    kept = white_box_correct.to(x.device)
    n = int(kept.sum())
    broken = 0
    if n:
        square = AutoAttack(PixelModel.from_model(model), threat=threat, parts=('square',), square_queries=queries,
                            seed=seed)
        broken = int((kept & ~square(x, y, mask=kept).correct).sum())
    return SanityFlag(name, broken == 0, f'Square ({queries} queries) broke {broken} of the {n} sample images the '
                      f'white-box attacks left robust', message)
