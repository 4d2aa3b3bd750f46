"""``timm-nofrost shift``: accuracy under natural distribution shifts (ImageNet-C / -R / -A / -Sketch)."""
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..evaluate import SHIFT_BENCHMARKS, Protocol, evaluate_shift
from ..settings import ModelSettings, RunSettings, add_settings, build_settings, setting, settings_dict
from ._common import OutputSettings, WeightsSettings, create_model_from_args, print_json


@dataclass
class ShiftSettings:
    """Which shift benchmark, where, and how much of it."""
    benchmark: str = setting(None, group='benchmark', choices=SHIFT_BENCHMARKS, help='which shift benchmark')
    root: str = setting(None, group='benchmark', metavar='DIR', help='local folder of the benchmark')
    max_per_class: Optional[int] = setting(None, group='benchmark', type=int, metavar='N',
                                           help='evaluate at most N images per class (the first N sorted files)',
                                           default_help='all')
    corruptions: Optional[str] = setting(None, group='benchmark', metavar='LIST',
                                         help='ImageNet-C only: comma-separated subset of the 15 corruptions',
                                         default_help='all')
    severities: str = setting('1,2,3,4,5', group='benchmark', metavar='LIST',
                              help='ImageNet-C only: severities to evaluate')
    out: Optional[str] = setting(None, group='output', metavar='JSON', help='write the result as JSON to this file')


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'shift', help='evaluate an ImageNet classifier on ImageNet-C / -R / -A / -Sketch from local folders',
        description='Top-1 accuracy under natural distribution shifts, read from local folders in their published '
                    'layouts: ImageNet-C ROOT/<corruption>/<severity>/<wnid>/<image> (reports mCE against AlexNet), '
                    'ImageNet-R / ImageNet-A ROOT/<wnid>/<image> (logits restricted to their 200 classes), '
                    'ImageNet-Sketch ROOT/<wnid>/<image>. Nothing is downloaded.')
    add_settings(parser, ModelSettings, WeightsSettings, ShiftSettings, RunSettings, OutputSettings,
                 required=('model', 'benchmark', 'root'), exclude=('amp', 'progress'))
    add_settings(parser, Protocol, exclude=[n for n in Protocol.__dataclass_fields__ if n != 'batch_size'])
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model = create_model_from_args(args)
    corruptions = [c.strip() for c in args.corruptions.split(',')] if args.corruptions else None
    try:
        severities = [int(s) for s in args.severities.split(',') if s.strip()]
    except ValueError:
        raise ValueError(f'Invalid --severities {args.severities!r}: expected integers 1-5 like 1,2,3.') from None
    run_cfg = build_settings(RunSettings, settings_dict(args, RunSettings))
    result = evaluate_shift(
        model, args.benchmark, args.root, batch_size=args.batch_size, device=run_cfg.torch_device(),
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
