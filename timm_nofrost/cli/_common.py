"""Shared CLI helpers: error reporting and JSON / human output."""
import argparse
import json
import sys
from typing import Any


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with one-line errors (``timm-nofrost CMD: error: ...``, exit status 2), like every other error of
    the command; the usage is one ``--help`` away."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


class CliError(Exception):
    """An error to report on stderr with a non-zero exit code, without a traceback."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def fail(command: str, message: str, exit_code: int = 2) -> int:
    print(f'timm-nofrost {command}: error: {message}', file=sys.stderr)
    return exit_code


def add_json_flag(parser: Any) -> None:
    parser.add_argument('--json', action='store_true',
                        help='print machine-readable JSON on stdout instead of the human-readable summary')


def print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True))


def add_model_args(parser: Any) -> None:
    """``--model`` with ``--pretrained`` / ``--checkpoint``: how every evaluation command loads a model."""
    parser.add_argument('--model', required=True, metavar='NAME',
                        help='timm model name (hf-hub:ORG/NAME and local-dir:DIR work too)')
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true', help="load the model's pretrained weights")
    weights.add_argument('--checkpoint', default=None, metavar='FILE', help='load weights from FILE (weights only)')
    parser.add_argument('--model-kwargs', default=None, metavar='JSON',
                        help='extra create_model arguments as a JSON object, e.g. \'{"channels": [16, 32, 64, 128]}\' '
                             '(timm-nofrost train prints the ones its checkpoints need)')


def parse_model_kwargs(text: Any) -> dict:
    """``--model-kwargs`` as a dict; a CliError naming the bad text."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f'--model-kwargs is not valid JSON ({e.msg}): {text!r}') from None
    if not isinstance(value, dict):
        raise CliError(f'--model-kwargs must be a JSON object, got {text!r}.')
    return value


def create_model_from_args(args: Any, **kwargs: Any) -> Any:
    """``timm.create_model`` from ``--model``, ``--pretrained`` and ``--model-kwargs`` (and ``--convert`` where the
    command has it), then the ``--checkpoint`` weights through the package's one loader (``load_checkpoint``).

    An unknown model is a CliError naming it; a checkpoint that cannot be read or does not fit the architecture
    is a ``CheckpointError`` (one line, with what to pass), not a traceback.
    """
    import timm
    from ..checkpoint import CheckpointError, load_checkpoint
    from ..training.train_config import check_model_name
    kwargs = {**parse_model_kwargs(getattr(args, 'model_kwargs', None)), **kwargs}
    check_model_name(args.model)
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    converted = ''
    if getattr(args, 'convert', False):  # as `train --convert` does: convert the BN model, then load the weights
        from ..convert import convert_to_normfree
        model = convert_to_normfree(model, init='keep' if args.pretrained else 'fresh')
        converted = ' (converted with --convert)'
    if args.checkpoint:
        try:
            load_checkpoint(model, args.checkpoint)
        except CheckpointError as e:
            if not (e.missing or e.unexpected or e.mismatched):
                raise
            raise CheckpointError(f'{e} It does not fit {args.model}{converted}: pass the --num-classes and '
                                  f'--model-kwargs the model was trained with.', path=e.path, missing=e.missing,
                                  unexpected=e.unexpected, mismatched=e.mismatched) from None
    return model


def add_adversarial_args(parser: Any, steps_help: str = '10', per_arm: bool = False) -> None:
    """The ``--adv-*`` flags of the training commands (``train``, ``timm-train``): one AdversarialConfig each.

    ``per_arm=True`` (``study``) leaves out the flags each arm of a study sets itself: method, beta, attack,
    lambda and batch mode.

    ``--adv-method`` / ``--adv-attack`` take any string: the AdversarialConfig refuses a bad one with a one-line
    error naming what is accepted (exit status 2), as for every other ``--adv-*`` value.
    """
    group = parser.add_argument_group('adversarial training (defaults: the NoFrost recipe)' +
                                      ('; method, attack, lambda / beta and batch mode come from the arms' if per_arm
                                       else ''))
    arm_flag = (lambda *a, **k: None) if per_arm else group.add_argument
    arm_flag('--adv-method', default='nofrost', metavar='METHOD',
                       help='training loss, one of: nofrost: (1-lambda)*loss(clean) + lambda*loss(adv), the '
                            "paper's recipe; madry: loss(adv) only (Madry et al. 2018); trades: loss(clean) + "
                            'beta*KL(p(clean) || p(adv)), trading clean accuracy for smoothness, with an attack that '
                            'maximises the KL (Zhang et al. 2019); mart: boosted CE(adv) + beta*KL weighted by '
                            '1 - p_y(clean), stressing misclassified examples (Wang et al. 2020) '
                            '(default: %(default)s)')
    arm_flag('--adv-beta', type=float, default=None, metavar='BETA',
                       help='weight of the robust (KL) term of trades and mart (default: 6, both papers\' value; '
                            'refused with nofrost and madry, which take --adv-weight)')
    arm_flag('--adv-attack', default='pgd', metavar='ATTACK',
                       help='training attack, one of: pgd: --adv-steps projected gradient steps (steps+1 '
                            'forward-backward passes per training step); fgsm-rs: one step of 1.25*eps from a '
                            'uniform random start, projected (Wong et al. 2020; 2 passes, can overfit '
                            'catastrophically); n-fgsm: one step of eps from uniform noise in the 2*eps ball, not '
                            'projected back (de Jorge et al. 2022; 2 passes, Linf only, no catastrophic overfitting '
                            'reported) (default: %(default)s)')
    group.add_argument('--adv-eps', default='8/255', metavar='EPS',
                       help='threat-model radius in pixel units [0, 1], a number or a fraction (default: %(default)s)')
    group.add_argument('--adv-steps', type=int, default=None, metavar='N',
                       help=f'attack steps per training batch (default: {steps_help} for pgd; 1 for fgsm-rs and '
                            f'n-fgsm, which take no more)')
    group.add_argument('--adv-step-size', default=None, metavar='SIZE',
                       help="attack step size, a number or a fraction (default: nofrost/madry the authors' "
                            'min(1.25*eps, eps+4/255)/steps, 1/255 for PGD-10 at 8/255; trades/mart 2.5*eps/steps, '
                            '2/255 for PGD-10; fgsm-rs 1.25*eps; n-fgsm eps)')
    group.add_argument('--adv-norm', default='Linf', choices=('Linf', 'L2'), help='threat model (default: %(default)s)')
    arm_flag('--adv-weight', type=float, default=None, metavar='LAMBDA',
                       help='lambda in (1-lambda)*loss(clean) + lambda*loss(adv), with --adv-method nofrost; 1 is '
                            'Madry AT, 0 standard training (with --adv-steps 0) (default: 0.5; madry: 1; refused '
                            'with trades and mart, which take --adv-beta)')
    group.add_argument('--adv-eps-warmup-steps', type=int, default=0, metavar='N',
                       help='ramp eps linearly from 0 over this many training batches (default: no warm-up)')
    arm_flag('--adv-batch-mode', default='auto', choices=('auto', 'concat', 'separate', 'split'),
                       help='how clean and adversarial halves go through the model: concat (one forward, '
                            'normalizer-free models), separate (two forwards, shared BN: BN-AT), split (split BN: '
                            'MBN-AT); auto picks concat for models without BatchNorm (default: %(default)s)')
    group.add_argument('--adv-attack-dtype', default=None, choices=('bfloat16', 'float16'),
                       help='run only the attack under autocast in this dtype, the training step keeps its '
                            'precision (faster on hardware with bf16; default: follow the training autocast)')
    group.add_argument('--adv-no-random-start', action='store_true',
                       help='start PGD from the clean image instead of a random point (refused with trades and '
                            'the single-step attacks, which need the noise)')


def adversarial_config(args: Any, default_steps: int = 10) -> Any:
    """The ``AdversarialConfig`` of the ``--adv-*`` flags (its ValueError names a bad value).

    ``default_steps`` (the command's PGD default, 3 on the demo data) applies to ``--adv-attack pgd`` only; unset
    flags otherwise take the config's defaults (1 step for the single-step attacks, lambda / beta per method).
    """
    from ..training import AdversarialConfig
    from ..training.config import SINGLE_STEP_ATTACKS
    steps = args.adv_steps
    if steps is None and args.adv_attack not in SINGLE_STEP_ATTACKS:
        steps = default_steps
    return AdversarialConfig(
        eps=args.adv_eps, steps=steps, step_size=args.adv_step_size, norm=args.adv_norm,
        random_start=not args.adv_no_random_start, adv_weight=args.adv_weight,
        eps_warmup_steps=args.adv_eps_warmup_steps, batch_mode=args.adv_batch_mode,
        attack_dtype=args.adv_attack_dtype, method=args.adv_method, beta=args.adv_beta, attack=args.adv_attack)
