"""``timm-nofrost eval``: robust accuracy under named attacks, with sanity checks, JSON / Markdown / plot."""
import argparse
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..evaluate.protocol import EvalSubset, Protocol
from ..settings import DataSettings, ModelSettings, RunSettings, add_settings, build_settings, setting, settings_dict
from ._common import CliError, OutputSettings, WeightsSettings, create_model_from_args, print_json


@dataclass
class ReportFiles:
    """Where ``eval`` writes its report besides stdout."""
    out: Optional[str] = setting(
        None, group='output', metavar='JSON',
        help='write the full JSON report to this file, last; meanwhile the progress is kept in JSON.progress/ and '
             'the same command, run again after an interruption, continues where it stopped (a finished report of '
             'the same evaluation is reused)')
    markdown: Optional[str] = setting(None, group='output', metavar='MD', help='write the Markdown table to this file')
    plot: Optional[str] = setting(None, group='output', metavar='PNG',
                                  help='write an accuracy-vs-eps plot (needs matplotlib)')
    robustbench_json: Optional[str] = setting(
        None, group='output', metavar='JSON',
        help="also write the result as a RobustBench model_info entry (clean_acc, autoattack_acc, eps, ...); needs "
             "autoattack among --attacks (without --worst-case-only), one --eps, and --data naming a benchmark "
             "(cifar10, cifar100, imagenet: torch/cifar10, or a folder of that name); checked before any attack")
    overwrite: bool = setting(False, group='output',
                              help='replace a report, or discard the progress, of another evaluation in --out '
                                   '(without it the command refuses and names what differs)')


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'eval', help='evaluate clean and robust accuracy (PGD, APGD, AutoAttack) with sanity checks',
        description='Evaluate a timm model under adversarial attacks on an image dataset, in pixel space with the '
                    "model's own eval transforms. Prints a Markdown table (per attack and eps, plus the per-example "
                    'worst case across attacks) and sanity-check flags; writes a JSON report. Strong attacks '
                    '(apgd-ce, apgd-t, autoattack) are one flag away: PGD alone overstates robustness.')
    add_settings(parser, ModelSettings, WeightsSettings, DataSettings, EvalSubset, Protocol, RunSettings, ReportFiles,
                 OutputSettings, required=('model', 'data'))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import build_eval_set, evaluate
    from ..evaluate.robustbench import robustbench_model_info
    from ..files import check_output_file
    for flag, path in (('--out', args.out), ('--markdown', args.markdown), ('--plot', args.plot),
                       ('--robustbench-json', args.robustbench_json)):
        if path:  # before any attack: a bad path must not cost the evaluation
            check_output_file(path, flag)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install 'timm-nofrost[eval]'") from None
    run_cfg = build_settings(RunSettings, settings_dict(args, RunSettings))
    device = _join_process_group(run_cfg)
    protocol = build_settings(Protocol, settings_dict(args, Protocol))
    if args.robustbench_json:
        robustbench_model_info(_planned_report(args, protocol))  # what would refuse the result, refused now
    model = create_model_from_args(args, **({} if args.num_classes is None else {'num_classes': args.num_classes}))
    eval_set = build_eval_set(args.data, model, seed=protocol.seed, **settings_dict(args, EvalSubset),
                              **settings_dict(args, DataSettings, exclude=('data', 'num_classes')))
    report = evaluate(model, eval_set, protocol, device=device, amp_dtype=run_cfg.amp,
                      progress='auto' if run_cfg.progress else 'lines', model_name=args.model, out=args.out,
                      overwrite=args.overwrite, shard=True)  # under torchrun the ranks share the batches
    try:
        if int(os.environ.get('RANK', '0')) == 0:  # under torchrun the first rank writes and prints
            _write_and_print(args, report)
    finally:
        _leave_process_group()
    return 0


def _write_and_print(args: argparse.Namespace, report: Any) -> None:
    from ..evaluate.robustbench import robustbench_model_info
    from ..files import atomic_json, atomic_write
    if args.markdown:
        atomic_write(args.markdown, report.to_markdown())
    if args.plot:
        report.plot(args.plot)
    if args.robustbench_json:
        atomic_json(args.robustbench_json, robustbench_model_info(report), sort_keys=False)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.to_markdown())


def _join_process_group(run_cfg: RunSettings) -> Any:
    """Under torchrun (WORLD_SIZE > 1) join the process group, so that the ranks share the images; this rank's
    device."""
    from ..training.run import init_distributed
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        return init_distributed(run_cfg.device)[1]
    return run_cfg.torch_device()


def _leave_process_group() -> None:
    """Every rank waits for the first to write and print, then the group is closed (a rank exiting while another
    still talks to it can abort that one)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _planned_report(args: argparse.Namespace, protocol: Protocol) -> Dict[str, Any]:
    """The report's layout before anything is measured (accuracies 0, or None where the protocol measures
    nothing), so that the checks a finished report meets can run first."""
    from ..evaluate import WORST_CASE
    names = [s.name for s in protocol.specs if s.kind != 'clean']
    accuracy = {t.label: {**{a: None if protocol.cascade else 0.0 for a in names}, WORST_CASE: 0.0}
                for t in protocol.threats}
    return dict(model=args.model, dataset=args.data, norm=protocol.norm, eps=[t.eps for t in protocol.threats],
                attacks=names, n_examples=1, subset={}, clean_accuracy=0.0, accuracy=accuracy,
                cascade=protocol.cascade, settings={})
