"""Eval forward time: fused vs unfused nf_resnet50_nofrost vs timm's BatchNorm resnet50, side by side.

The models are timed in interleaved rounds (each round runs every model once, in rotating order) so that
machine noise hits all of them alike; the medians and their ratios to resnet50 are printed, plus JSON.

    python benchmarks/bench_fused_forward.py --batch-size 8 --img-size 224 --rounds 15
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
from timm_nofrost import convert_to_normfree, fuse_weight_standardization


def build_models(channels_last: bool) -> Dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    nf = timm.create_model('nf_resnet50_nofrost').eval()
    converted = convert_to_normfree(timm.create_model('resnet50'), init='fresh').eval()
    models = {
        'resnet50 (BatchNorm, eval)': timm.create_model('resnet50').eval(),
        'nf_resnet50_nofrost': nf,
        'nf_resnet50_nofrost fused': fuse_weight_standardization(nf),
        'converted resnet50 fused': fuse_weight_standardization(converted),
    }
    if channels_last:
        models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-size', type=int, default=8, help='images per forward (default: %(default)s)')
    parser.add_argument('--img-size', type=int, default=224, help='input resolution (default: %(default)s)')
    parser.add_argument('--rounds', type=int, default=15, help='timed rounds per model (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first (default: %(default)s)')
    parser.add_argument('--channels-last', action='store_true', help='run all models in channels_last')
    parser.add_argument('--device', default='cpu', help='torch device (default: %(default)s)')
    args = parser.parse_args()

    device = torch.device(args.device)
    models = {k: m.to(device) for k, m in build_models(args.channels_last).items()}
    x = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)

    def runner(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                model(x)
            if device.type == 'cuda':
                torch.cuda.synchronize()
        return run

    times = time_rounds({k: runner(m) for k, m in models.items()}, args.rounds, args.warmup)
    medians = {k: statistics.median(v) for k, v in times.items()}
    reference = medians['resnet50 (BatchNorm, eval)']
    print(f'eval forward, batch {args.batch_size} x {args.img_size}px, {args.rounds} interleaved rounds, '
          f'device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'{platform.processor() or platform.machine()}')
    print(f'{"model":<30} {"median ms":>10} {"vs resnet50":>12}')
    for name, median in medians.items():
        print(f'{name:<30} {median * 1e3:>10.1f} {median / reference:>11.2f}x')
    print(json.dumps({'args': vars(args), 'median_s': medians,
                      'ratio_vs_resnet50': {k: v / reference for k, v in medians.items()}}))


if __name__ == '__main__':
    main()
