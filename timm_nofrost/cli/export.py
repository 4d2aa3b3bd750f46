"""``timm-nofrost export``: turn a checkpoint into a Hub-ready folder."""
import argparse
from dataclasses import dataclass
from typing import Optional

from ..hub import export_checkpoint
from ..settings import ModelSettings, add_settings, setting
from ._common import OutputSettings, print_json

_TITLES = {'model': "model (the flags train and eval build it with)", 'card': 'model card'}


@dataclass
class ExportSettings:
    """Which model the checkpoint holds and where its folder goes (``--model-kwargs`` and ``--convert`` are the
    shared ``ModelSettings``)."""
    model: str = setting(
        'nf_resnet50_nofrost', group='model', metavar='NAME',
        help='timm model name, optionally with a pretrained tag whose config and card text the export carries, '
             'e.g. nf_resnet50_nofrost.at_in1k')
    num_classes: Optional[int] = setting(None, group='model', type=int, metavar='N',
                                         help='number of classes of the checkpoint',
                                         default_help='read from its classifier')
    out: Optional[str] = setting(None, group='output', metavar='DIR', help='folder to write (must be new or empty)')
    repo_id: Optional[str] = setting(None, group='output', metavar='ORG/NAME',
                                     help='Hub repo the folder is meant for, shown in the model card usage',
                                     default_help="the tag's hf_hub_id, else <your-org>/MODEL")
    overwrite: bool = setting(False, group='output', help='replace the contents of a non-empty --out')


@dataclass
class EvalReportSettings:
    """An evaluation of the weights for the model card (``export`` and ``push``)."""
    eval_report: Optional[str] = setting(
        None, group='card', metavar='JSON',
        help='evaluation report of these weights (the JSON of timm-nofrost eval --out): its clean, per-attack and '
             "worst-case accuracies go into the model card's model-index metadata, which the Hub shows as "
             'evaluation results (only what an attack measured)')


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'export', help='convert a checkpoint (e.g. the authors\' best_RA.pth) into a Hub-ready folder',
        description='Load a checkpoint safely (safetensors, or torch.load with weights_only=True), check it '
                    'against the model, and write model.safetensors, a timm config.json and a model card '
                    'to OUT. The folder loads with timm.create_model("local-dir:OUT") and, once pushed, '
                    'with "hf-hub:ORG/NAME". Accepts the authors\' DDP state_dicts ("module." keys), '
                    'their latest.pth (weights under "model"), timm checkpoints and safetensors files, and the '
                    'checkpoints of timm-nofrost train and study with the --model, --model-kwargs and --convert '
                    'they were trained with (train prints the command).')
    parser.add_argument('checkpoint', help='checkpoint file to export (.pth, .pth.tar, .bin or .safetensors)')
    add_settings(parser, ExportSettings, EvalReportSettings, required=('out',), titles=_TITLES)
    add_settings(parser, ModelSettings, exclude=('model', 'pretrained'), titles=_TITLES)  # train's and eval's
    add_settings(parser, OutputSettings)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = export_checkpoint(
        args.checkpoint, args.out, model_name=args.model, repo_id=args.repo_id, num_classes=args.num_classes,
        overwrite=args.overwrite, model_kwargs=args.model_kwargs, convert=args.convert, eval_report=args.eval_report)
    if args.json:
        print_json(result.to_dict())
        return 0
    name = f'{result.model_name}.{result.tag}' if result.tag else result.model_name
    converted = f' ({args.model} converted with --convert)' if args.convert else ''
    print(f'exported {args.checkpoint} as {name}{converted} '
          f'({result.num_params / 1e6:.2f}M params, {result.num_classes} classes) to {result.out_dir}')
    for file in result.files:
        print(f'  {file}')
    print(f'model.safetensors sha256: {result.sha256}')
    print(f'verified: reloading via local-dir: gives identical logits (max |diff| {result.max_abs_diff:g})')
    if args.eval_report:
        print(f"model card: the results of {args.eval_report} are in its model-index metadata")
    print(f'next: timm-nofrost push {result.out_dir} --repo-id {result.repo_id}')
    return 0
