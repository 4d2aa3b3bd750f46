"""``timm-nofrost shift``: accuracy under natural distribution shifts (ImageNet-C / -R / -A / -Sketch)."""
import argparse
import json
import sys
from pathlib import Path

import torch

from ._common import add_json_flag, add_model_args, create_model_from_args, print_json

_BENCHMARKS = ('imagenet-c', 'imagenet-r', 'imagenet-a', 'imagenet-sketch')


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'shift', help='evaluate an ImageNet classifier on ImageNet-C / -R / -A / -Sketch from local folders',
        description='Top-1 accuracy under natural distribution shifts, read from local folders in their published '
                    'layouts: ImageNet-C ROOT/<corruption>/<severity>/<wnid>/<image> (reports mCE against AlexNet), '
                    'ImageNet-R / ImageNet-A ROOT/<wnid>/<image> (logits restricted to their 200 classes), '
                    'ImageNet-Sketch ROOT/<wnid>/<image>. Nothing is downloaded.')
    add_model_args(parser)
    parser.add_argument('--benchmark', required=True, choices=_BENCHMARKS, help='which shift benchmark')
    parser.add_argument('--root', required=True, metavar='DIR', help='local folder of the benchmark')
    parser.add_argument('--batch-size', type=int, default=64, help='images per batch (default: %(default)s)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='torch device (default: %(default)s)')
    parser.add_argument('--max-per-class', type=int, default=None, metavar='N',
                        help='evaluate at most N images per class (the first N sorted files)')
    parser.add_argument('--corruptions', default=None, metavar='LIST',
                        help='ImageNet-C only: comma-separated subset of the 15 corruptions (default: all)')
    parser.add_argument('--severities', default='1,2,3,4,5', metavar='LIST',
                        help='ImageNet-C only: severities to evaluate (default: %(default)s)')
    parser.add_argument('--out', default=None, metavar='JSON', help='write the result as JSON to this file')
    add_json_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate_shift
    model = create_model_from_args(args)
    corruptions = [c.strip() for c in args.corruptions.split(',')] if args.corruptions else None
    try:
        severities = [int(s) for s in args.severities.split(',') if s.strip()]
    except ValueError:
        raise ValueError(f'Invalid --severities {args.severities!r}: expected integers 1-5 like 1,2,3.') from None
    result = evaluate_shift(
        model, args.benchmark, args.root, batch_size=args.batch_size, device=args.device,
        max_per_class=args.max_per_class, corruptions=corruptions, severities=severities,
        progress=sys.stderr.isatty())
    payload = result.to_dict()
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2) + '\n')
    if args.json:
        print_json(payload)
        return 0
    print(f'{args.model} on {args.benchmark}: top-1 {result.top1:.2f}% over {result.n_examples} images')
    if args.benchmark == 'imagenet-c' and 'mce' in result.details:
        print(f'mCE {result.details["mce"]:.2f} (AlexNet-normalised{"" if result.details.get("mce_standard") else ", non-standard subset"})')
    return 0
