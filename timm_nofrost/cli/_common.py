"""Shared CLI helpers: error reporting and JSON / human output."""
import json
import sys
from typing import Any


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
    """``timm.create_model`` from ``--model``, ``--pretrained`` / ``--checkpoint`` and ``--model-kwargs``.

    A checkpoint that does not fit the architecture becomes a CliError listing the mismatches, not a traceback.
    """
    import timm
    kwargs = {**parse_model_kwargs(getattr(args, 'model_kwargs', None)), **kwargs}
    try:
        return timm.create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint, **kwargs)
    except RuntimeError as e:
        if 'state_dict' not in str(e) or not args.checkpoint:
            raise
        details = [line.strip().rstrip('.') for line in str(e).splitlines()[1:] if line.strip()]
        shown = '; '.join(details[:3]) + (f' (and {len(details) - 3} more)' if len(details) > 3 else '')
        raise CliError(f'Checkpoint {args.checkpoint} does not fit {args.model}: {shown}. Pass the --num-classes and '
                       f'--model-kwargs the model was trained with.') from None
