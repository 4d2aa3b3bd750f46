"""Shared CLI helpers: error reporting, JSON / human output, building a model from the model settings."""
import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Optional

from ..settings import setting


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


@dataclass
class OutputSettings:
    """How a command prints its result: the same ``--json`` everywhere."""
    json: bool = setting(False, group='output',
                         help='print machine-readable JSON on stdout instead of the human-readable summary (the log '
                              'goes to stderr)')


@dataclass
class WeightsSettings:
    """Which weights an evaluation command loads into the model it builds."""
    checkpoint: Optional[str] = setting(None, group='model', metavar='FILE',
                                        help='load weights from FILE (weights only; not with --pretrained)')


def print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True))


def create_model_from_args(args: Any, **kwargs: Any) -> Any:
    """``timm.create_model`` from ``--model``, ``--pretrained`` and ``--model-kwargs`` (and ``--convert`` where the
    command has it), then the ``--checkpoint`` weights through the package's one loader (``load_checkpoint``).

    An unknown model is a CliError naming it; a checkpoint that cannot be read or does not fit the architecture
    is a ``CheckpointError`` (one line, with what to pass), not a traceback.
    """
    import timm
    from ..checkpoint import CheckpointError, load_checkpoint
    from ..training.train_config import check_model_name
    if args.pretrained and args.checkpoint:
        raise CliError('--pretrained and --checkpoint both load weights: give one of them.')
    check_model_name(args.model)
    model = timm.create_model(args.model, pretrained=args.pretrained, **{**(args.model_kwargs or {}), **kwargs})
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
