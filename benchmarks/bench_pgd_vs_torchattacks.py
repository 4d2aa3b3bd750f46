"""PGD evaluation throughput: timm_nofrost's ``PGD`` vs ``torchattacks.PGD``, side by side.

Both attack the same model on the same batch with the same settings (Linf, eps 8/255, step size eps/4, 20
steps, random start). torchattacks gets the model in pixel space (``PixelModel``, which normalises inside),
as it expects [0, 1] inputs. Contenders per model, timed in interleaved rounds (each round runs every
contender once, in rotating order) so that machine noise hits them alike:

* ``ours``: ``PGD`` as shipped (eval mode, frozen parameters, weight-standardised kernels computed once);
* ``ours, no WS cache``: the same with ``cache_standardized_weights=False`` (standardises at every forward);
* ``ours, fused copy``: ``PGD`` on ``fuse_weight_standardization(model)`` (plain convs, NF residual scalings
  folded), fusing included in the timed run: what ``attack_mode`` could do instead of caching kernels;
* ``torchattacks``: ``torchattacks.PGD`` (eval mode; parameters keep ``requires_grad``).

The WS variants run only for models with weight-standardised convs.

Prints medians, the ratio torchattacks / ours (> 1: ours is faster), and JSON.

    python benchmarks/bench_pgd_vs_torchattacks.py --batch-size 16 --img-size 64 --rounds 10
    python benchmarks/bench_pgd_vs_torchattacks.py --models nf_resnet50_nofrost,resnet50

Needs ``pip install scipy && pip install --no-deps torchattacks==3.5.1``.
"""
import argparse
import json
import platform
import statistics
from typing import Callable, Dict

import timm
import torch

from _timing import time_rounds  # benchmarks/_timing.py: interleaved rounds

import timm_nofrost  # noqa: F401  registers the NoFrost models
from timm_nofrost import fuse_weight_standardization
from timm_nofrost.attacks import PGD, PixelModel
from timm_nofrost.layers import WS_CONV_TYPES


def contenders(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
               device: torch.device) -> Dict[str, Callable[[], None]]:
    import torchattacks

    pixel = PixelModel.from_model(model).to(device)
    alpha = eps / 4
    settings = dict(eps=eps, steps=steps, step_size=alpha, random_start=True)
    ours = PGD(pixel, **settings)
    ours_nocache = PGD(pixel, cache_standardized_weights=False, **settings)
    theirs = torchattacks.PGD(pixel, eps=eps, alpha=alpha, steps=steps, random_start=True)

    def timed(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            fn()
            if device.type == 'cuda':
                torch.cuda.synchronize()
        return run

    def fused_then_attack() -> None:
        fused = PixelModel(fuse_weight_standardization(model), pixel.mean.flatten().tolist(),
                           pixel.std.flatten().tolist())
        PGD(fused, **settings)(x, y)

    fns = {'ours': timed(lambda: ours(x, y))}
    if any(isinstance(m, WS_CONV_TYPES) for m in model.modules()):
        fns['ours, no WS cache'] = timed(lambda: ours_nocache(x, y))
        fns['ours, fused copy'] = timed(fused_then_attack)
    fns['torchattacks'] = timed(lambda: theirs(x, y))
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default='nf_resnet26_nofrost',
                        help='comma-separated timm model names (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=16, help='images per attack (default: %(default)s)')
    parser.add_argument('--img-size', type=int, default=64, help='input resolution (default: %(default)s)')
    parser.add_argument('--steps', type=int, default=20, help='PGD steps (default: %(default)s)')
    parser.add_argument('--eps', type=float, default=8 / 255, help='Linf radius (default: 8/255)')
    parser.add_argument('--rounds', type=int, default=10, help='timed rounds per contender (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds first (default: %(default)s)')
    parser.add_argument('--device', default='cpu', help='torch device (default: %(default)s)')
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=generator).to(device)
    results = {}
    print(f'PGD-{args.steps} (Linf, eps {args.eps * 255:.3g}/255, step eps/4, random start), batch '
          f'{args.batch_size} x {args.img_size}px, {args.rounds} interleaved rounds, device {args.device}, '
          f'torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'{platform.processor() or platform.machine()}')
    print(f'{"model":<24} {"contender":<20} {"median s":>9} {"torchattacks / this":>20}')
    for name in [m.strip() for m in args.models.split(',') if m.strip()]:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10).to(device).eval()
        with torch.no_grad():
            y = PixelModel.from_model(model)(x).argmax(dim=1)  # attack the model's own predictions
        times = time_rounds(contenders(model, x, y, args.eps, args.steps, device), args.rounds, args.warmup)
        medians = {k: statistics.median(v) for k, v in times.items()}
        reference = medians['torchattacks']
        for contender, median in medians.items():
            print(f'{name:<24} {contender:<20} {median:>9.3f} {reference / median:>19.2f}x')
        results[name] = {'median_s': medians, 'ratio_torchattacks_over': {k: reference / v for k, v in medians.items()},
                         'times_s': times}
    print(json.dumps({'args': vars(args), 'threads': torch.get_num_threads(), 'results': results}))


if __name__ == '__main__':
    main()
