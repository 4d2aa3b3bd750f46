"""``timm-nofrost timm-train``: run timm's own ``train.py`` with NoFrost adversarial training."""
import argparse
from typing import List, Tuple

from ..settings import add_settings, build_settings, settings_dict
from ..training.adversarial import AdversarialConfig
from ..training.presets import chain, help_presets, resolve
from ..training.timm_launcher import RobustValidationConfig
from ._common import CliError, OneLineErrorParser

_ADV_PREFIX = '--adv-'


def _add_adv_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher's own flags (shared by the subcommand and the parser of flags written after the script)."""
    add_settings(parser, AdversarialConfig, RobustValidationConfig, presets={'recipe': help_presets()['recipe']})


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'timm-train', help="run timm's train.py with NoFrost adversarial training and robust validation",
        description="Run the train.py of a timm clone, unmodified, with the adversarial training task in place of "
                    "ClassificationTask, the NoFrost models registered, and robust top-1 added to each epoch's "
                    'validation metrics (summary.csv, --result JSON; usable as --eval-metric). Put train.py\'s '
                    'own arguments after "--".',
        epilog='example: timm-nofrost timm-train pytorch-image-models/train.py --adv-eps 4/255 -- /data/imagenet '
               '--model nf_resnet50_nofrost --sched cosine --epochs 90 --lr-base 0.1 --smoothing 0.1 '
               '--eval-metric robust_top1_pgd-10',
        usage='%(prog)s SCRIPT [--adv-* options] -- [train.py arguments]')
    parser.add_argument('script', metavar='SCRIPT', help="path of train.py in a clone of timm's repository")
    _add_adv_arguments(parser)
    parser.add_argument('rest', nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(run=run)


def split_arguments(rest: List[str]) -> Tuple[List[str], List[str]]:
    """Split what follows SCRIPT into the launcher's own flags (before ``--``) and train.py's arguments.

    argparse keeps every token after SCRIPT (and drops a ``--`` right after it), so the flags written between
    SCRIPT and ``--`` are parsed here.
    """
    if '--' in rest:
        i = rest.index('--')
        own, train = rest[:i], rest[i + 1:]
    elif rest and rest[0].startswith(_ADV_PREFIX):  # only our flags, no train.py arguments
        own, train = rest, []
    else:
        own, train = [], rest
    stray = [t for t in train if t.split('=')[0].startswith(_ADV_PREFIX)]
    if stray:
        raise CliError(f'{stray[0]} is a timm-train option but comes among train.py\'s arguments; write it '
                       f'before "--": timm-train SCRIPT [--adv-* options] -- [train.py arguments].')
    return own, train


def run(args: argparse.Namespace) -> int:
    from ..training.timm_launcher import run_timm_train
    own, train_args = split_arguments(list(args.rest))
    parser = OneLineErrorParser(prog='timm-nofrost timm-train', add_help=False)  # the --adv-* flags after SCRIPT
    _add_adv_arguments(parser)
    _, unknown = parser.parse_known_args(own, namespace=args)
    if unknown:
        raise CliError(f'unrecognized arguments before "--": {" ".join(unknown)} (train.py\'s arguments go after '
                       f'"--").')
    adv_cfg = build_settings(AdversarialConfig, resolve(settings_dict(args, AdversarialConfig), chain('')))
    robust_val = build_settings(RobustValidationConfig, settings_dict(args, RobustValidationConfig))
    run_timm_train(args.script, train_args, adv_cfg, robust_val)
    return 0
