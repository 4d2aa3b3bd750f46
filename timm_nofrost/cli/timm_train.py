"""``timm-nofrost timm-train``: run timm's own ``train.py`` with NoFrost adversarial training."""
import argparse
from typing import List, Tuple

from ._common import CliError

_ADV_PREFIX = '--adv-'


def _add_adv_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher's own flags (shared by the subcommand and the parser of flags written after the script)."""
    group = parser.add_argument_group('adversarial training (defaults: the NoFrost recipe)')
    group.add_argument('--adv-eps', default='8/255', metavar='EPS',
                       help='threat-model radius in pixel units [0, 1], a number or a fraction (default: %(default)s)')
    group.add_argument('--adv-steps', type=int, default=10, metavar='N',
                       help='PGD steps per training batch (default: %(default)s)')
    group.add_argument('--adv-step-size', default=None, metavar='SIZE',
                       help="PGD step size, a number or a fraction (default: the authors' min(1.25*eps, "
                            'eps+4/255)/steps, 1/255 for PGD-10 at 8/255)')
    group.add_argument('--adv-norm', default='Linf', choices=('Linf', 'L2'), help='threat model (default: %(default)s)')
    group.add_argument('--adv-weight', type=float, default=0.5, metavar='LAMBDA',
                       help='lambda in (1-lambda)*loss(clean) + lambda*loss(adv); 1 is Madry AT, 0 standard '
                            'training (default: %(default)s)')
    group.add_argument('--adv-eps-warmup-steps', type=int, default=0, metavar='N',
                       help='ramp eps linearly from 0 over this many training batches (default: no warm-up)')
    group.add_argument('--adv-batch-mode', default='auto', choices=('auto', 'concat', 'separate', 'split'),
                       help='how clean and adversarial halves go through the model: concat (one forward, '
                            'normalizer-free models), separate (two forwards, shared BN), split (split BN); auto '
                            'picks concat for models without BatchNorm (default: %(default)s)')
    group.add_argument('--adv-attack-dtype', default=None, choices=('bfloat16', 'float16'),
                    help='run only the attack under autocast in this dtype, the training step keeps its precision '
                         '(faster on hardware with bf16; default: follow the training autocast)')
    group.add_argument('--adv-no-random-start', action='store_true',
                       help='start PGD from the clean image instead of a uniform random point of the ball')
    group = parser.add_argument_group('robust validation (after each of timm\'s validations)')
    group.add_argument('--adv-val-attacks', default='pgd-10', metavar='LIST',
                       help='comma-separated attacks run at the training eps and norm, e.g. pgd-20,apgd-ce '
                            '(clean adds the subset\'s clean accuracy); each adds eval_robust_top1_<attack> to '
                            'summary.csv, plus robust_top1_worst with several attacks (default: %(default)s)')
    group.add_argument('--adv-val-examples', type=int, default=500, metavar='N',
                       help='attack N validation images spread evenly over the set, the same ones every epoch '
                            '(collected while timm validates: no extra pass over the data); 0 turns robust '
                            'validation off (default: %(default)s)')


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
    if rest and rest[0] == '--':
        own, train = [], rest[1:]
    elif '--' in rest:
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


def _own_flags(args: argparse.Namespace, tokens: List[str]) -> None:
    """Parse the ``--adv-*`` flags written after SCRIPT into ``args``."""
    if not tokens:
        return
    parser = argparse.ArgumentParser(prog='timm-nofrost timm-train', add_help=False)
    _add_adv_arguments(parser)
    _, unknown = parser.parse_known_args(tokens, namespace=args)
    if unknown:
        raise CliError(f'unrecognized arguments before "--": {" ".join(unknown)} (train.py\'s arguments go after '
                       f'"--").')


def run(args: argparse.Namespace) -> int:
    from ..training.config import AdversarialConfig
    from ..training.timm_train import RobustValidationConfig, TimmTrainLauncher, load_train_script
    own, train_args = split_arguments(list(args.rest))
    _own_flags(args, own)
    adv_cfg = AdversarialConfig(
        eps=args.adv_eps, steps=args.adv_steps, step_size=args.adv_step_size, norm=args.adv_norm,
        random_start=not args.adv_no_random_start, adv_weight=args.adv_weight,
        eps_warmup_steps=args.adv_eps_warmup_steps, batch_mode=args.adv_batch_mode,
        attack_dtype=args.adv_attack_dtype)
    robust_val = RobustValidationConfig(attacks=args.adv_val_attacks, examples=args.adv_val_examples)
    launcher = TimmTrainLauncher(load_train_script(args.script), adv_cfg, robust_val)
    launcher.run(train_args)
    return 0
