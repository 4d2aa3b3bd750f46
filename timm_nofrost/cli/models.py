"""``timm-nofrost models``: list the registered NoFrost models and pretrained weights."""
import argparse

from ..hub import list_nofrost_models
from ..settings import add_settings
from ._common import OutputSettings, print_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'models', help='list the NoFrost models registered with timm',
        description='List the *_nofrost models that importing timm_nofrost registers with timm, '
                    'with parameter counts, input sizes and published weights.')
    parser.add_argument('--pretrained', action='store_true',
                        help='list pretrained weights (model.tag names with a Hub id) instead of architectures')
    parser.add_argument('--filter', default='*nofrost*', metavar='PATTERN',
                        help='fnmatch pattern on model names (default: %(default)s)')
    add_settings(parser, OutputSettings)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    infos = list_nofrost_models(args.filter, pretrained=args.pretrained)
    if args.json:
        print_json([info.to_dict() for info in infos])
        return 0
    if not infos:
        print(f'no models match {args.filter!r}')
        return 0
    rows = [('model', 'params (M)', 'input', 'classes', 'hub id' if args.pretrained else 'pretrained tags')]
    rows += [(info.name, f'{info.num_params / 1e6:.2f}', 'x'.join(map(str, info.input_size)), str(info.num_classes),
              ', '.join(info.tags) if info.tags else (info.hf_hub_id or '-')) for info in infos]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0
