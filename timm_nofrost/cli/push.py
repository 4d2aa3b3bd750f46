"""``timm-nofrost push``: upload an exported folder to the Hugging Face Hub."""
import argparse

from ..hub import push_folder
from ..settings import add_settings
from ._common import OutputSettings, print_json
from .export import EvalReportSettings


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'push', help='upload an exported folder to the Hugging Face Hub',
        description='Create the Hub repo if needed and upload DIR (made by `timm-nofrost export`). '
                    'The token is read from HF_TOKEN or your `hf auth login`; it is never printed. '
                    'HF_ENDPOINT selects another Hub server. With --eval-report, the results of an evaluation go into '
                    "the model-index metadata of DIR's README.md before the upload.")
    parser.add_argument('folder', metavar='DIR', help='folder written by `timm-nofrost export`')
    parser.add_argument('--repo-id', required=True, metavar='ORG/NAME', help='Hub model repo to upload to')
    parser.add_argument('--private', action='store_true', help='create the repo as private if it does not exist')
    parser.add_argument('--revision', default=None, metavar='BRANCH', help='branch to commit to (default: main)')
    parser.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    parser.add_argument('--message', default='Add NoFrost weights (timm-nofrost export)', metavar='TEXT',
                        help='commit message (default: %(default)s)')
    add_settings(parser, EvalReportSettings, OutputSettings, titles={'card': 'model card'})
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    url = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.message, create_pr=args.create_pr, eval_report=args.eval_report)
    if args.json:
        print_json({'repo_id': args.repo_id, 'commit_url': url, 'folder': args.folder})
    else:
        print(f'pushed {args.folder} to {args.repo_id}: {url}')
        if args.eval_report:
            print(f"model card: the results of {args.eval_report} are in its model-index metadata")
        print(f"load it with: timm.create_model('hf-hub:{args.repo_id}', pretrained=True)  # after import timm_nofrost")
    return 0
