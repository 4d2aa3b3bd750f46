"""``timm-nofrost export``: turn a checkpoint into a Hub-ready folder."""
import argparse

from ..hub import export_checkpoint
from ..settings import add_settings
from ._common import OutputSettings, print_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'export', help='convert a checkpoint (e.g. the authors\' best_RA.pth) into a Hub-ready folder',
        description='Load a checkpoint safely (safetensors, or torch.load with weights_only=True), check it '
                    'against the model, and write model.safetensors, a timm config.json and a model card '
                    'to OUT. The folder loads with timm.create_model("local-dir:OUT") and, once pushed, '
                    'with "hf-hub:ORG/NAME". Accepts the authors\' DDP state_dicts ("module." keys), '
                    'their latest.pth (weights under "model"), timm checkpoints and safetensors files.')
    parser.add_argument('checkpoint', help='checkpoint file to export (.pth, .pth.tar, .bin or .safetensors)')
    parser.add_argument('--model', default='nf_resnet50_nofrost', metavar='NAME',
                        help='timm model name, optionally with a pretrained tag whose config and card text '
                             'the export carries, e.g. nf_resnet50_nofrost.at_in1k (default: %(default)s)')
    parser.add_argument('--out', required=True, metavar='DIR', help='folder to write (must be new or empty)')
    parser.add_argument('--repo-id', default=None, metavar='ORG/NAME',
                        help='Hub repo the folder is meant for, shown in the model card usage '
                             '(default: the tag\'s hf_hub_id, else <your-org>/MODEL)')
    parser.add_argument('--num-classes', type=int, default=None, metavar='N',
                        help='number of classes of the checkpoint (default: read from its classifier)')
    parser.add_argument('--overwrite', action='store_true', help='replace the contents of a non-empty --out')
    add_settings(parser, OutputSettings)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = export_checkpoint(
        args.checkpoint, args.out, model_name=args.model, repo_id=args.repo_id,
        num_classes=args.num_classes, overwrite=args.overwrite)
    if args.json:
        print_json(result.to_dict())
        return 0
    name = f'{result.model_name}.{result.tag}' if result.tag else result.model_name
    print(f'exported {args.checkpoint} as {name} '
          f'({result.num_params / 1e6:.2f}M params, {result.num_classes} classes) to {result.out_dir}')
    for file in result.files:
        print(f'  {file}')
    print(f'model.safetensors sha256: {result.sha256}')
    print(f'verified: reloading via local-dir: gives identical logits (max |diff| {result.max_abs_diff:g})')
    print(f'next: timm-nofrost push {result.out_dir} --repo-id {result.repo_id}')
    return 0
