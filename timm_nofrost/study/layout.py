"""Where a study keeps its runs, and how far each one got: shared by the runner and the report."""
import json
from pathlib import Path
from typing import Tuple

from ..training.train_config import CHECKPOINT_LAST

__all__ = ['STUDY_FILE', 'EVAL_FILE', 'run_dir', 'run_state']

STUDY_FILE = 'study.json'
EVAL_FILE = 'eval.json'


def run_dir(out_dir: Path, arm: str, seed: int) -> Path:
    return Path(out_dir) / 'runs' / arm / f'seed-{seed}'


def run_state(path: Path) -> Tuple[str, str]:
    """(state, detail) of one run folder: evaluated, trained, training (some epochs done) or missing."""
    if (path / EVAL_FILE).is_file():
        return 'evaluated', ''
    if (path / 'results.json').is_file():
        return 'trained', 'trained, not evaluated yet'
    summary = path / 'summary.jsonl'
    if (path / CHECKPOINT_LAST).is_file() and summary.is_file():
        lines = [line for line in summary.read_text().splitlines() if line.strip()]
        epoch = json.loads(lines[-1]).get('epoch', '?') if lines else '?'
        return 'training', f'{epoch} epoch(s) done: still running, or interrupted (run the study again to resume)'
    return 'missing', 'not started'
