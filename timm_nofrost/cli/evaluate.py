"""``timm-nofrost eval``: robust accuracy under named attacks, with sanity checks, JSON / Markdown / plot."""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..evaluate.protocol import EvalSubset, Protocol
from ..settings import DataSettings, ModelSettings, RunSettings, add_settings, build_settings, setting, settings_dict
from ._common import OutputSettings, WeightsSettings, create_model_from_args, print_json


@dataclass
class ReportFiles:
    """Where ``eval`` writes its report besides stdout."""
    out: Optional[str] = setting(None, group='output', metavar='JSON', help='write the full JSON report to this file')
    markdown: Optional[str] = setting(None, group='output', metavar='MD', help='write the Markdown table to this file')
    plot: Optional[str] = setting(None, group='output', metavar='PNG',
                                  help='write an accuracy-vs-eps plot (needs matplotlib)')


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
    model = create_model_from_args(args, **({} if args.num_classes is None else {'num_classes': args.num_classes}))
    protocol = build_settings(Protocol, settings_dict(args, Protocol))
    eval_set = build_eval_set(args.data, model, seed=protocol.seed, **settings_dict(args, EvalSubset),
                              **settings_dict(args, DataSettings, exclude=('data', 'num_classes')))
    run_cfg = build_settings(RunSettings, settings_dict(args, RunSettings))
    report = evaluate(model, eval_set, protocol, device=run_cfg.torch_device(), amp_dtype=run_cfg.amp,
                      progress='auto' if run_cfg.progress else 'lines', model_name=args.model)
    if args.out:
        report.save_json(args.out)
    if args.markdown:
        Path(args.markdown).write_text(report.to_markdown())
    if args.plot:
        report.plot(args.plot)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.to_markdown())
    return 0
