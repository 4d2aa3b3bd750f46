"""``timm-nofrost`` command: one entry point, one subcommand per job."""
import argparse
import sys
from typing import List, Optional

from . import convert, evaluate, export, models, push, shift, study, timm_train, train
from ._common import CliError, OneLineErrorParser, fail

__all__ = ['main', 'build_parser']

_SUBCOMMANDS = (models, train, study, timm_train, evaluate, shift, convert, export, push)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog='timm-nofrost',
        description='Normalizer-free adversarial training (NoFrost) for timm: models, weights and tools.',
    )
    from ..version import __version__
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True, parser_class=OneLineErrorParser)
    for module in _SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stderr.close()
        return 0
    except CliError as e:
        return fail(args.command, str(e), e.exit_code)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
            IsADirectoryError) as e:  # the package's own errors (CheckpointError, StudyError, ...) are ValueErrors
        return fail(args.command, str(e) or f'{type(e).__name__} ({e!r})')
    except OSError as e:  # network / Hub errors
        notes = ' '.join(getattr(e, '__notes__', []))
        return fail(args.command, f'{type(e).__name__}: {e} {notes}'.strip())
    except KeyboardInterrupt:
        return fail(args.command, 'interrupted', 130)


if __name__ == '__main__':
    sys.exit(main())
