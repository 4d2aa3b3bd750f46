"""``timm-nofrost convert``: a timm BatchNorm model as a loadable normalizer-free folder."""
import argparse

from ..convert import INIT_MODES
from ..hub import convert_and_export
from ..settings import add_settings
from ._common import OutputSettings, print_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'convert', help='convert a timm BatchNorm model to normalizer-free and save it',
        description='Remove every normalization layer of a timm model, turn its convs into scaled '
                    'weight-standardised convs and rescale its residual blocks as NF-ResNets do, then write '
                    'model.safetensors + config.json (+ model card) to OUT. The folder loads with '
                    'timm.create_model("local-dir:OUT") after `import timm_nofrost`. Prints the conversion report.')
    parser.add_argument('--model', required=True, metavar='NAME', help='timm model name, e.g. resnet50')
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true',
                         help="start from the model's pretrained BN weights (downloaded by timm)")
    weights.add_argument('--checkpoint', default=None, metavar='FILE',
                         help='start from the BN weights in FILE (safetensors or a weights-only torch checkpoint)')
    parser.add_argument('--out', required=True, metavar='DIR', help='folder to write (must be new or empty)')
    parser.add_argument('--init', choices=INIT_MODES, default=None,
                        help='keep: keep the source conv weights (warm start); fresh: re-initialise as NF nets '
                             '(default: keep with --pretrained/--checkpoint, fresh otherwise)')
    parser.add_argument('--alpha', type=float, default=0.2,
                        help='variance each residual block adds, in (0, 1] (default: %(default)s)')
    parser.add_argument('--norms', default='batch', metavar='KINDS',
                        help='comma-separated normalizer kinds to remove: batch, group, layer (default: %(default)s)')
    parser.add_argument('--act', default=None, metavar='NAME',
                        help="activation whose gain is folded into the convs, e.g. relu (default: detected)")
    parser.add_argument('--no-zero-init-last', action='store_true',
                        help="keep the last conv of each residual branch active instead of zeroing its gain")
    parser.add_argument('--num-classes', type=int, default=None, metavar='N',
                        help='classifier size of the base model (default: the model\'s own)')
    parser.add_argument('--strict', action='store_true',
                        help='fail (exit 2) if any normalizer or conv would be left unconverted')
    parser.add_argument('--repo-id', default=None, metavar='ORG/NAME', help='Hub repo named in the model card')
    parser.add_argument('--overwrite', action='store_true', help='replace the contents of a non-empty --out')
    add_settings(parser, OutputSettings)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    norms = [k.strip() for k in args.norms.split(',') if k.strip()]
    result, report = convert_and_export(
        args.model, args.out, pretrained=args.pretrained, checkpoint=args.checkpoint, init=args.init,
        alpha=args.alpha, norms=norms, act_layer=args.act, zero_init_last=not args.no_zero_init_last,
        strict=args.strict, num_classes=args.num_classes, repo_id=args.repo_id, overwrite=args.overwrite)
    if args.json:
        print_json({'export': result.to_dict(), 'report': report.to_dict()})
        return 0
    print(report.summary())
    print(f'wrote {result.out_dir}: {", ".join(result.files)} ({result.num_params / 1e6:.2f}M params)')
    print(f'verified: reloading via local-dir: gives identical logits (max |diff| {result.max_abs_diff:g})')
    print(f"load it with: timm.create_model('local-dir:{result.out_dir}', pretrained=True)  # after import timm_nofrost")
    return 0
