"""Where a study keeps its runs, and how far each one got: shared by the runner and the report."""
import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

from ..evaluate.journal import journal_status
from ..training.train_config import CHECKPOINT_LAST

__all__ = ['STUDY_FILE', 'EVAL_FILE', 'EVAL_PROGRESS', 'run_dir', 'run_state', 'RecordError', 'read_record', 'reading']

STUDY_FILE = 'study.json'
EVAL_FILE = 'eval.json'
EVAL_PROGRESS = 'eval.progress'  # the study evaluation's journals (timm_nofrost.evaluate.journal) until eval.json


def run_dir(out_dir: Path, arm: str, seed: int) -> Path:
    return Path(out_dir) / 'runs' / arm / f'seed-{seed}'


def run_state(path: Path) -> Tuple[str, str]:
    """(state, detail) of one run folder: evaluated, evaluating (progress recorded, no ``eval.json`` yet),
    trained, training (a checkpoint written) or missing."""
    if (path / EVAL_FILE).is_file():
        return 'evaluated', ''
    if (path / EVAL_PROGRESS).is_dir():
        status = journal_status(path / EVAL_PROGRESS) or 'evaluation in progress'
        return 'evaluating', f'{status}: still running, or interrupted (run the study again to continue it)'
    if (path / 'results.json').is_file():
        return 'trained', 'trained, not evaluated yet'
    if (path / CHECKPOINT_LAST).is_file():
        try:  # the summary may lag the checkpoint by an epoch after a fault: the resumed run rewrites it
            epoch = json.loads((path / 'summary.jsonl').read_text().splitlines()[-1])['epoch']
        except (OSError, IndexError, KeyError, TypeError, ValueError):
            epoch = '?'
        return 'training', f'{epoch} epoch(s) done: still running, or interrupted (run the study again to resume)'
    return 'missing', 'not started'


class RecordError(ValueError):
    """A study file that cannot be used: its message names the file, and the entry an incomplete one lacks."""


_REDO = 'restore it, or remove it to redo that step'


def read_record(path: Path, hint: str = _REDO) -> Dict[str, Any]:
    """A study's JSON file (``study.json``, ``eval.json``, ``results.json``) as a dict, or a ``RecordError``."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f'{path} cannot be read ({e}): {hint}.') from None
    if not isinstance(record, dict):
        raise RecordError(f'{path} holds {type(record).__name__}, not a JSON object: {hint}.')
    return record


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn a missing or malformed entry met while using ``path``'s record into a ``RecordError`` naming both."""
    try:
        yield
    except RecordError:
        raise
    except KeyError as e:
        raise RecordError(f'{path} is incomplete: it has no {e.args[0]!r} entry; {_REDO}.') from None
    except (TypeError, IndexError, AttributeError, ValueError) as e:
        raise RecordError(f'{path} is malformed ({type(e).__name__}: {e}); {_REDO}.') from None
