"""``timm-nofrost train``: adversarial training with the NoFrost recipe, on the embedded demo data by default."""
import argparse
import contextlib
import os
import sys

from ..settings import add_settings, build_settings, settings_dict
from ..training.presets import chain, help_presets, resolve
from ..training.train_config import TrainConfig
from ._common import CliError, OutputSettings, print_json

_DEMO_NOTE = ('With no --data, trains on the embedded demo set (five procedurally drawn shapes, 32px, no download) '
              'with a demo preset sized for a CPU: a narrow nf_resnet18_cifar_nofrost, AdamW lr 3e-3, 4 epochs, '
              'batch 64, PGD-3 training. Everything unset otherwise follows the authors\' recipe: '
              'nf_resnet50_nofrost, SGD (Nesterov, momentum 0.9) with lr 0.1 per 256 images, weight decay 5e-5, '
              'cosine, 90 epochs, label smoothing 0.1, PGD-10 at Linf 8/255 with step 1/255, lambda 0.5.')


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'train', help='adversarial training with the NoFrost recipe (embedded demo data by default)',
        description='Train a timm model adversarially with the NoFrost recipe, report clean and robust accuracy '
                    'per epoch and in a final table (with APGD next to PGD), and write timm-format checkpoints '
                    'atomically so a run can always --resume. ' + _DEMO_NOTE,
        epilog='examples:\n  timm-nofrost train\n  timm-nofrost train --compare-bn\n'
               '  timm-nofrost train --data /data/imagenet --model nf_resnet50_nofrost --out runs/nofrost50\n'
               '  timm-nofrost train --data ./my_images --model resnet18 --convert --img-size 64\n'
               '  torchrun --nproc_per_node 8 -m timm_nofrost train --data /data/imagenet -b 64\n',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(parser, TrainConfig, OutputSettings, presets=help_presets())
    parser.set_defaults(run=run_command)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the command line, unset settings from the presets (the resolver the Python API uses)."""
    return build_settings(TrainConfig, resolve(settings_dict(args, TrainConfig), chain(args.data)))


def run_command(args: argparse.Namespace) -> int:
    from ..training.run import TrainingDiverged, train
    try:
        # with --json, stdout carries only the JSON: the human-readable log goes to stderr
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            results = train(build_config(args))
    except TrainingDiverged as e:
        raise CliError(str(e), exit_code=3) from None
    if args.json and int(os.environ.get('RANK', '0')) == 0:  # under torchrun, one JSON document
        print_json(results)
    return 0
