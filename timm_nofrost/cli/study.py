"""``timm-nofrost study``: every recipe (arm) x seed on one data source, one schedule, one evaluation protocol."""
import argparse
import contextlib
import sys

from ._common import CliError, parse_model_kwargs, print_json
from .train import add_training_arguments

_DESCRIPTION = (
    'Train several recipes (arms) with several seeds on the same data and schedule, evaluate every final model '
    'with one protocol (clean, PGD-20, APGD-CE, APGD-T and AutoAttack at the study eps on one fixed validation '
    'subset, sanity checks, an accuracy-vs-eps curve, decision margin and smoothness) and write a report '
    '(report.md with a verdict from the numbers, report.json, clean_vs_robust.png, robust_vs_eps.png). Every '
    'arm x seed is an ordinary `train` run in OUT/runs/ARM/seed-S: running the study again skips finished runs and '
    'resumes an interrupted one; --only runs one of them (as separate processes, jobs or torchrun launches); '
    '`timm-nofrost study report OUT` aggregates whatever has finished. With no --data: the paper\'s four arms, '
    'two seeds, 2 epochs of PGD-2 on the embedded demo data at 16 px, evaluated on 64 images with APGD-T-25 and '
    'without AutoAttack (about 6 minutes on 2 CPU cores).')


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..study import ARMS, PAPER_ARMS
    arm_list = '\n'.join(f'  {name:12s} {arm.description}' for name, arm in ARMS.items())
    parser = subparsers.add_parser(
        'study', help='compare training recipes (arms) x seeds on your data, with AutoAttack, tables and plots',
        description=_DESCRIPTION,
        epilog=f'built-in arms:\n{arm_list}\n\n'
               'examples:\n  timm-nofrost study\n'
               '  timm-nofrost study --data ./fmnist --arms standard,bn-at,mbn-at,nofrost,trades --seeds 0,1,2 '
               '--epochs 10 --out runs/fmnist\n'
               '  timm-nofrost study --data ./fmnist --out runs/fmnist --only nofrost:1   # one run, e.g. one job\n'
               '  timm-nofrost study --arm trades3:base=trades,beta=3 --arms nofrost,trades3\n'
               '  timm-nofrost study report runs/fmnist\n',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    study = parser.add_argument_group('study')
    study.add_argument('--arms', default=None, metavar='LIST',
                       help=f'arms to run, comma-separated (default: {",".join(PAPER_ARMS)}, the paper\'s four; '
                            'see the list below)')
    study.add_argument('--arm', action='append', default=[], metavar='NAME:KEY=VALUE,...',
                       help='define an arm (repeatable): keys base (a built-in arm to start from), family (nf | bn), '
                            'batch_mode, method, attack, lambda (adv_weight), beta, steps, step_size, description; '
                            'e.g. trades3:base=trades,beta=3. Defined arms run in addition to --arms')
    study.add_argument('--arms-file', default=None, metavar='FILE',
                       help='arms from a JSON or YAML file: {"NAME": {"key": value, ...}, ...}')
    study.add_argument('--seeds', default=None, metavar='LIST',
                       help='training seeds, comma-separated (default: 0,1,2; demo: 0,1)')
    study.add_argument('--out', default='output/study', metavar='DIR', help='study folder (default: %(default)s)')
    study.add_argument('--only', default=None, metavar='ARM[:SEED]',
                       help='run (train and evaluate) only this arm, or this arm and seed, then update the report')
    protocol = parser.add_argument_group('evaluation protocol (the same for every model)')
    protocol.add_argument('--eval-examples', type=int, default=None, metavar='N',
                          help='validation images, spread evenly over the set (default: 500; demo: 64)')
    protocol.add_argument('--eval-attacks', default=None, metavar='LIST',
                          help='attacks at the study eps (default: clean,pgd-20,apgd-ce,apgd-t,autoattack; demo: '
                               'clean,pgd-20,apgd-ce,apgd-t-25, without autoattack, whose Square attack alone takes '
                               'minutes per model on a CPU; autoattack needs the pyautoattack package, the report '
                               'says when it did not run)')
    protocol.add_argument('--curve-attack', default=None, metavar='NAME',
                          help='attack of the accuracy-vs-eps curve (default: apgd-ce; demo: pgd-20)')
    protocol.add_argument('--curve-eps', default='0.25,0.5,1,1.5,2', metavar='LIST',
                          help='eps of the curve, as multiples of --adv-eps (default: %(default)s)')
    protocol.add_argument('--eval-batch-size', type=int, default=128, metavar='N',
                          help='images per evaluation batch (default: %(default)s); on a CPU one batch for all '
                               '--eval-examples is fastest, as AutoAttack\'s Square attack and APGD-T pay a fixed '
                               'cost per batch')
    protocol.add_argument('--eval-seed', type=int, default=0, metavar='SEED',
                          help='seed of the attacks\' random starts (default: %(default)s)')
    protocol.add_argument('--split-seed', type=int, default=0, metavar='SEED',
                          help='seed of the held-out split of a single folder, the same for every run '
                               '(default: %(default)s)')
    protocol.add_argument('--no-analysis', action='store_true',
                          help='skip the decision-margin and smoothness analysis')
    protocol.add_argument('--json', action='store_true',
                          help='print the report as JSON on stdout (the log goes to stderr)')
    add_training_arguments(parser, study=True)
    parser.set_defaults(run=run_command)

    sub = parser.add_subparsers(dest='study_command', metavar='report', required=False)
    report = sub.add_parser('report', help='aggregate a study folder, listing the runs that have not finished',
                            description='Write OUT/report.md, report.json and the plots from the runs that have '
                                        'finished, and list those that have not (not started, interrupted, trained '
                                        'but not evaluated).')
    report.add_argument('dir', metavar='DIR', help='the study folder (--out of the study)')
    report.add_argument('--json', action='store_true', dest='report_json', help='print the report as JSON on stdout')
    report.set_defaults(run=report_command)


def _int_list(text: str, flag: str) -> list:
    try:
        return [int(s) for s in text.split(',') if s.strip()]
    except ValueError:
        raise CliError(f'{flag} must be comma-separated integers, got {text!r}.') from None


def _float_list(text: str, flag: str) -> list:
    try:
        return [float(s) for s in text.split(',') if s.strip()]
    except ValueError:
        raise CliError(f'{flag} must be comma-separated numbers, got {text!r}.') from None


def build_study_config(args: argparse.Namespace):
    """The StudyConfig of the command line (every value checked by the study before any training)."""
    from ..study import DEMO_STUDY, PAPER_ARMS, PROTOCOL_ATTACKS, StudyConfig, load_arms_file, parse_arm_spec, \
        resolve_arms
    from ..training.config import AdversarialConfig
    from ..training.train_config import TrainConfig
    demo = args.data == 'demo'
    custom = [parse_arm_spec(spec) for spec in args.arm]
    if args.arms_file:
        custom = load_arms_file(args.arms_file) + custom
    if args.arms:
        names = args.arms.split(',')
    else:  # defined arms alone run by themselves; otherwise the paper's four
        names = [] if custom else list(DEMO_STUDY['arms'] if demo else PAPER_ARMS)
    arms = resolve_arms([n.strip() for n in names if n.strip()], custom)
    seeds = _int_list(args.seeds, '--seeds') if args.seeds else list(DEMO_STUDY['seeds'] if demo else (0, 1, 2))
    steps = args.adv_steps if args.adv_steps is not None else (DEMO_STUDY['attack_steps'] if demo else None)
    adv = AdversarialConfig(eps=args.adv_eps, steps=steps, step_size=args.adv_step_size, norm=args.adv_norm,
                            random_start=not args.adv_no_random_start, eps_warmup_steps=args.adv_eps_warmup_steps,
                            attack_dtype=args.adv_attack_dtype)
    train = TrainConfig(
        data=args.data, data_dir=args.data_dir, val_fraction=args.val_fraction, model=args.model,
        model_kwargs=parse_model_kwargs(args.model_kwargs), pretrained=args.pretrained, num_classes=args.num_classes,
        img_size=args.img_size, epochs=args.epochs, batch_size=args.batch_size, opt=args.opt, lr=args.lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, smoothing=args.smoothing,
        scale=tuple(args.scale) if args.scale else None, color_jitter=args.color_jitter, hflip=args.hflip, adv=adv,
        eval_attack=args.eval_attack, robust_examples=args.robust_examples, deterministic=args.deterministic,
        workers=args.workers, device=args.device, amp=args.amp, channels_last=args.channels_last,
        progress=not args.no_progress)
    eval_examples = args.eval_examples if args.eval_examples is not None else (
        DEMO_STUDY['eval_examples'] if demo else 500)
    return StudyConfig(
        train=train, arms=arms, seeds=seeds, out_dir=args.out, eval_examples=eval_examples,
        eval_attacks=args.eval_attacks or (DEMO_STUDY['eval_attacks'] if demo else PROTOCOL_ATTACKS),
        curve_attack=args.curve_attack or (DEMO_STUDY['curve_attack'] if demo else 'apgd-ce'),
        curve_eps=_float_list(args.curve_eps, '--curve-eps'), eval_seed=args.eval_seed, split_seed=args.split_seed,
        eval_batch_size=args.eval_batch_size,
        baseline_model=args.baseline_model, analysis=not args.no_analysis)


def run_command(args: argparse.Namespace) -> int:
    from ..study import run_study
    from ..training.run import TrainingDiverged
    cfg = build_study_config(args)
    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result = run_study(cfg, only=args.only)
    except TrainingDiverged as e:
        raise CliError(f'{e} (the other runs are unaffected; run the study again to resume)', exit_code=3) from None
    if result:
        _print(result, args.out, args.json)
    return 0


def report_command(args: argparse.Namespace) -> int:
    from ..study import write_report
    result = write_report(args.dir)
    _print(result, args.dir, args.report_json)
    return 0


def _print(result: dict, out: str, as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    print(f'\nStudy report: {out}/report.md (report.json, plots beside it)')
    for line in result['verdict']:
        print(f'- {line}')
    if result['missing']:
        print('Not finished: ' + ', '.join(f"{m['arm']} seed {m['seed']} ({m['detail']})" for m in result['missing']))
