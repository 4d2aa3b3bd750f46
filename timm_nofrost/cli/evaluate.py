"""``timm-nofrost eval``: robust accuracy under named attacks, with sanity checks, JSON / Markdown / plot."""
import argparse

import torch

from ..attacks import ATTACK_NAMES
from ..pixels import AMP_DTYPES, amp_dtype
from ._common import add_json_flag, add_model_args, create_model_from_args, print_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'eval', help='evaluate clean and robust accuracy (PGD, APGD, AutoAttack) with sanity checks',
        description='Evaluate a timm model under adversarial attacks on an image dataset, in pixel space with the '
                    "model's own eval transforms. Prints a Markdown table (per attack and eps, plus the per-example "
                    'worst case across attacks) and sanity-check flags; writes a JSON report. Strong attacks '
                    '(apgd-ce, apgd-t, autoattack) are one flag away: PGD alone overstates robustness.')
    add_model_args(parser)
    parser.add_argument('--num-classes', type=int, default=None, metavar='N', help='classifier size (default: model\'s)')
    parser.add_argument('--convert', action='store_true',
                        help='the model was trained with `train --convert`: build the timm (BatchNorm) model, remove '
                             'its normalization with convert_to_normfree, then load --checkpoint')
    data = parser.add_argument_group('data (the syntax of `timm-nofrost train --data`)')
    data.add_argument('--data', required=True, metavar='SOURCE',
                      help="'demo' (the embedded shapes' val split), an ImageFolder directory: ROOT/<class>/<image> "
                           '(evaluated whole, or its held-out part with --val-fraction) or ROOT/train + ROOT/val '
                           '(or validation/, test/: that folder is evaluated), or a timm dataset name such as '
                           'torch/cifar10 with --data-dir (torch/cifar10:ROOT works too)')
    data.add_argument('--data-dir', default=None, metavar='DIR', help='root folder for a timm dataset name')
    data.add_argument('--val-fraction', type=float, default=None, metavar='F',
                      help='for a single folder of class folders: evaluate only the held-out fraction F that '
                           '`train --val-fraction F --seed SEED` validated on (default: the whole folder)')
    data.add_argument('--split-seed', type=int, default=0, metavar='SEED',
                      help='seed of that held-out split: the training --seed (default: %(default)s)')
    data.add_argument('--img-size', type=int, default=None, metavar='PX',
                      help="input resolution, as trained with `train --img-size` (default: the model's; 32 on the "
                           'demo data)')
    data.add_argument('--split', default='validation',
                      help='split to evaluate: validation (default), train, or a subfolder name such as test')
    parser.add_argument('--attacks', default='clean,pgd-20,apgd-ce', metavar='LIST',
                        help=f'comma-separated attacks: {", ".join(ATTACK_NAMES)} (default: %(default)s)')
    parser.add_argument('--eps', default='8/255', metavar='LIST',
                        help='comma-separated radii, numbers or fractions like 4/255 (default: %(default)s)')
    parser.add_argument('--norm', default='Linf', choices=('Linf', 'L2'), help='threat model (default: %(default)s)')
    parser.add_argument('--n-examples', type=int, default=None, metavar='N',
                        help='evaluate a fixed seeded random subset of N images (indices recorded in the report)')
    parser.add_argument('--subset-ids', default=None, metavar='FILE',
                        help='file with one dataset index or relative image path per line, e.g. RobustBench\'s '
                             '5,000-image ImageNet list; overrides --n-examples')
    parser.add_argument('--batch-size', type=int, default=64, help='images per batch (default: %(default)s)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='torch device (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0, help='seed for the subset and random starts (default: 0)')
    parser.add_argument('--amp', default='none', choices=('none',) + tuple(AMP_DTYPES),
                        help='autocast dtype for attacks (default: none)')
    parser.add_argument('--no-sanity', action='store_true', help='skip the sanity checks (not recommended)')
    parser.add_argument('--analysis', action='store_true',
                        help='add decision-margin and local-smoothness statistics (the paper\'s analysis)')
    parser.add_argument('--plot', default=None, metavar='PNG', help='write an accuracy-vs-eps plot (needs matplotlib)')
    parser.add_argument('--out', default=None, metavar='JSON', help='write the full JSON report to this file')
    parser.add_argument('--markdown', default=None, metavar='MD', help='write the Markdown table to this file')
    parser.add_argument('--worst-case-only', action='store_true',
                        help='cascade (AutoAttack\'s protocol): each attack runs only on the images that survived '
                             'the previous ones, so later attacks cost less; the worst case is identical to the full '
                             'run, per-attack columns say "not measured"')
    parser.add_argument('--no-progress', action='store_true',
                        help='no progress bars: a line on stderr when an attack finishes a batch, at most every 10 s')
    add_json_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate
    kwargs = {} if args.num_classes is None else {'num_classes': args.num_classes}
    model = create_model_from_args(args, **kwargs)
    report = evaluate(
        model, args.data, attacks=args.attacks, eps=args.eps, norm=args.norm, n_examples=args.n_examples,
        subset_ids=args.subset_ids, batch_size=args.batch_size, device=args.device, seed=args.seed,
        amp_dtype=amp_dtype(args.amp), sanity=not args.no_sanity, analysis=args.analysis,
        progress='lines' if args.no_progress else 'auto', cascade=args.worst_case_only, split=args.split,
        model_name=args.model,
        data_dir=args.data_dir, img_size=args.img_size, val_fraction=args.val_fraction, split_seed=args.split_seed)
    if args.out:
        report.save_json(args.out)
    if args.markdown:
        from pathlib import Path
        Path(args.markdown).write_text(report.to_markdown())
    if args.plot:
        report.plot(args.plot)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.to_markdown())
    return 0
