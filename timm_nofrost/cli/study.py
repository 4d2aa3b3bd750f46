"""``timm-nofrost study``: every recipe (arm) x seed on one data source, one schedule, one evaluation protocol."""
import argparse
import contextlib
import sys

from ..settings import add_settings, build_settings, settings_dict
from ..study import ARMS, ArmSelection, StudyConfig
from ..training.presets import chain, help_presets, resolve
from ._common import CliError, OutputSettings, print_json

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
    add_settings(parser, ArmSelection, StudyConfig, OutputSettings, presets=help_presets(study=True))
    parser.set_defaults(run=run_command)

    sub = parser.add_subparsers(dest='study_command', metavar='report', required=False)
    report = sub.add_parser('report', help='aggregate a study folder, listing the runs that have not finished',
                            description='Write OUT/report.md, report.json and the plots from the runs that have '
                                        'finished, and list those that have not (not started, interrupted, trained '
                                        'but not evaluated).')
    report.add_argument('dir', metavar='DIR', help='the study folder (--out of the study)')
    add_settings(report, OutputSettings)
    report.set_defaults(run=report_command)


def build_study_config(args: argparse.Namespace) -> StudyConfig:
    """The StudyConfig of the command line, unset settings from the presets (the resolver the Python API uses);
    every value is checked by the study before any training."""
    values = resolve(settings_dict(args, StudyConfig), chain(args.data, study=True))
    arms = build_settings(ArmSelection, settings_dict(args, ArmSelection)).resolve()
    return build_settings(StudyConfig, values, arms=arms)


def run_command(args: argparse.Namespace) -> int:
    from ..study import run_study
    from ..training.run import TrainingDiverged
    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result = run_study(build_study_config(args), only=args.only)
    except TrainingDiverged as e:
        raise CliError(f'{e} (the other runs are unaffected; run the study again to resume)', exit_code=3) from None
    if result:
        _print(result, args.out_dir, args.json)
    return 0


def report_command(args: argparse.Namespace) -> int:
    from ..study import write_report
    _print(write_report(args.dir), args.dir, args.json)
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
