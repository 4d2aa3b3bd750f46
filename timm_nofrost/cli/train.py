"""``timm-nofrost train``: adversarial training with the NoFrost recipe, on the embedded demo data by default."""
import argparse
import contextlib
import json
import os
import sys

from ._common import CliError, add_adversarial_args, adversarial_config, parse_model_kwargs

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
    add_training_arguments(parser)
    parser.set_defaults(run=run_command)


def add_training_arguments(parser: argparse.ArgumentParser, study: bool = False) -> None:
    """The settings of a training run, shared by ``train`` and ``study`` (which applies them to every arm).

    ``study=True`` leaves out what the study decides per arm or per run: the method, attack and weights (arms),
    the BN-AT comparison (an arm), the output folder, resuming and the seed (``--seeds``).
    """
    data = parser.add_argument_group('data')
    data.add_argument('--data', default='demo', metavar='SOURCE',
                      help="'demo' (default: the embedded shapes), an ImageFolder directory (ROOT/<class>/<img>, "
                           "or ROOT/train and ROOT/val), or a timm dataset name such as torch/cifar10 with --data-dir; "
                           "the same syntax as `timm-nofrost eval --data`")
    data.add_argument('--data-dir', default=None, metavar='DIR', help='root folder for a timm dataset name')
    data.add_argument('--val-fraction', type=float, default=0.1, metavar='F',
                      help='held-out fraction when an ImageFolder has no val/ folder (default: %(default)s)')
    data.add_argument('--num-classes', type=int, default=None, metavar='N',
                      help='number of classes (default: from the data)')
    data.add_argument('--img-size', type=int, default=None, metavar='PX',
                      help="input resolution (default: the model's; 32 on the demo data" +
                           ('; 16 in the demo study)' if study else ')'))
    data.add_argument('--workers', type=int, default=0, metavar='N',
                      help='data loading processes (default: %(default)s, load in the main process)')

    model = parser.add_argument_group('model')
    model.add_argument('--model', default=None, metavar='NAME',
                       help='any timm model name (default: nf_resnet50_nofrost; the demo preset on demo data)'
                            + ('; a normalizer-free model gets its BatchNorm twin for the bn arms, a BatchNorm '
                               'model is converted with convert_to_normfree for the nf arms' if study else ''))
    model.add_argument('--model-kwargs', default=None, metavar='JSON',
                       help='extra create_model arguments as JSON, e.g. \'{"drop_rate": 0.1}\'')
    model.add_argument('--pretrained', action='store_true', help="start from the model's pretrained weights")
    if not study:
        model.add_argument('--convert', action='store_true',
                           help='remove BatchNorm with the converter (convert_to_normfree) before training')
    else:
        model.add_argument('--baseline-model', default=None, metavar='NAME',
                           help='the BatchNorm model of the bn arms (default: the twin of --model, e.g. resnet50 '
                                'for nf_resnet50_nofrost)')

    optim = parser.add_argument_group('optimisation')
    optim.add_argument('--epochs', type=int, default=None, metavar='N',
                       help='epochs (default: 90; demo: 4' + (', demo study: 2)' if study else ')'))
    optim.add_argument('-b', '--batch-size', type=int, default=None, metavar='N',
                       help='images per process and step (default: 256; demo: 64)')
    optim.add_argument('--opt', default=None, choices=('sgd', 'adamw'),
                       help='optimizer (default: sgd, Nesterov; demo: adamw)')
    optim.add_argument('--lr', type=float, default=None,
                       help='learning rate (default: SGD 0.1 x global batch / 256, AdamW 3e-3)')
    optim.add_argument('--weight-decay', type=float, default=5e-5, help='weight decay (default: %(default)s)')
    optim.add_argument('--warmup-epochs', type=int, default=0, metavar='N',
                       help='linear lr warm-up epochs (default: %(default)s)')
    optim.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: %(default)s)')
    aug = parser.add_argument_group('augmentation (timm\'s training transform)')
    aug.add_argument('--scale', type=float, nargs=2, default=None, metavar=('MIN', 'MAX'),
                     help='RandomResizedCrop area range (default: 0.08 1.0, timm\'s ImageNet recipe; demo: 0.6 1.0); '
                          'small images such as 28 px Fashion-MNIST want a narrower range, e.g. 0.6 1.0')
    aug.add_argument('--color-jitter', type=float, default=None, metavar='F',
                     help='colour jitter strength (default: 0.4; demo: 0)')
    aug.add_argument('--hflip', type=float, default=0.5, metavar='P',
                     help='horizontal flip probability (default: %(default)s)')

    add_adversarial_args(parser, steps_help='10; demo: 3' + (', demo study: 2' if study else ''), per_arm=study)

    ev = parser.add_argument_group('evaluation' + (' during training' if study else ''))
    ev.add_argument('--eval-attack', default='pgd-10', metavar='NAME',
                    help='attack for the per-epoch robust accuracy (default: %(default)s)')
    if not study:
        ev.add_argument('--final-attacks', default='clean,pgd-20,apgd-ce', metavar='LIST',
                        help='attacks of the final table (default: %(default)s)')
    ev.add_argument('--robust-examples', type=int, default=None if study else 256, metavar='N',
                    help='validation images attacked every epoch, spread evenly over the set, the same every epoch '
                         '(default: 256' + ('; demo study: 64)' if study else ')'))
    if not study:
        ev.add_argument('--compare-bn', action='store_true',
                        help="also train the model's BatchNorm twin the same way (BN-AT) and compare in the final "
                             "table")
        ev.add_argument('--baseline-model', default=None, metavar='NAME',
                        help='BN-AT baseline model for --compare-bn (default: the twin of --model, e.g. resnet50)')

    run = parser.add_argument_group('run')
    if not study:
        run.add_argument('--out', default='output/nofrost', metavar='DIR',
                         help='output folder: checkpoints, summary.jsonl, results.json (default: %(default)s)')
        run.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CHECKPOINT',
                         help='continue a run: from CHECKPOINT, or from OUT/checkpoint-last.pth when no path is given')
        run.add_argument('--overwrite', action='store_true', help='start over in an OUT that holds a previous run')
        run.add_argument('--seed', type=int, default=0, help='random seed (default: %(default)s)')
    run.add_argument('--deterministic', action='store_true',
                     help='deterministic algorithms: a resumed run ends with the same weights as an uninterrupted one')
    run.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')
    run.add_argument('--amp', default=None, choices=('bf16', 'fp16'), help='mixed precision (default: off)')
    run.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    run.add_argument('--no-progress', action='store_true', help='no progress bars')
    if not study:
        run.add_argument('--json', action='store_true', help='print the results as JSON on stdout at the end')


def build_config(args: argparse.Namespace):
    from ..training.run import TrainConfig, preset_for
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    adv = adversarial_config(args, default_steps=preset_for(args.data)['attack_steps'])
    return TrainConfig(
        data=args.data, data_dir=args.data_dir, val_fraction=args.val_fraction, model=args.model,
        model_kwargs=model_kwargs, pretrained=args.pretrained, convert=args.convert, num_classes=args.num_classes,
        img_size=args.img_size, epochs=args.epochs, batch_size=args.batch_size, opt=args.opt, lr=args.lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, smoothing=args.smoothing,
        scale=tuple(args.scale) if args.scale else None, color_jitter=args.color_jitter, hflip=args.hflip, adv=adv,
        eval_attack=args.eval_attack, final_attacks=args.final_attacks, robust_examples=args.robust_examples,
        compare_bn=args.compare_bn, baseline_model=args.baseline_model, out_dir=args.out, resume=args.resume,
        overwrite=args.overwrite, seed=args.seed, deterministic=args.deterministic, workers=args.workers,
        device=args.device, amp=args.amp, channels_last=args.channels_last, progress=not args.no_progress)


def run_command(args: argparse.Namespace) -> int:
    from ..training.run import TrainingDiverged, train
    cfg = build_config(args)
    try:
        # with --json, stdout carries only the JSON: the human-readable log goes to stderr
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            results = train(cfg)
    except TrainingDiverged as e:
        raise CliError(str(e), exit_code=3) from None
    if args.json and int(os.environ.get('RANK', '0')) == 0:  # under torchrun, one JSON document
        json.dump(results, sys.stdout, indent=2, sort_keys=True)
        print()
    return 0
