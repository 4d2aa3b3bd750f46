"""``EvalJournal``: an evaluation's progress on disk, so that a killed evaluation continues where it stopped.

A journal is a folder (``REPORT.progress/`` beside a report, or one the caller names) holding:

    identity.json           what is evaluated (model weights, images, protocol, versions) and how many batches
    batch-000012.json       one batch's outcomes and costs (``RobustCounter.run_batch``), rewritten after each attack
    escalate-000012.json    one batch's escalation (``fast-worst-case``'s second pass)
    sanity.json             the sanity checks' flags and cost
    report.json             the finished report, until the caller's own file replaces the folder

Every file is written atomically (``timm_nofrost.files``), so a kill at any point leaves whole files; a batch
recorded is never attacked again. Only the evaluation with the same identity may continue a journal; a
process holds the folder while it evaluates, so two evaluations never write one journal.
"""
import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..files import atomic_json, check_writable_dir, remove_stale_temporaries

__all__ = ['EvalJournal', 'JournalError', 'differences', 'journal_status', 'progress_folder']

_IDENTITY, _SANITY, _REPORT = 'identity.json', 'sanity.json', 'report.json'
_RECORD = re.compile(r'^batch-(\d+)\.json$')


class JournalError(ValueError):
    """A journal that cannot be continued: another evaluation's, or a file in it that cannot be read."""


def progress_folder(report: Union[str, Path]) -> Path:
    """Where the progress of the evaluation that writes ``report`` is kept: ``REPORT.progress/`` beside it."""
    report = Path(report)
    return report.with_name(report.name + '.progress')


def differences(old: Dict[str, Any], new: Dict[str, Any], prefix: str = '') -> List[str]:
    """``'KEY was OLD, now NEW'`` for every leaf of two nested dicts that differs."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f'{prefix}{key}.')
        elif a != b:
            found.append(f'{prefix}{key} was {_short(a)}, now {_short(b)}')
    return found


def _short(value: Any) -> str:
    if isinstance(value, str) and value.startswith('sha256:'):
        return value[:19] + '...'
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


class EvalJournal:
    """The progress of one evaluation in ``folder`` (None: kept nowhere, every read finds nothing).

    Args:
        folder: The journal folder; created if needed.
        identity: What is evaluated, as plain data; a journal of another identity is refused (``JournalError``
            naming what differs) unless ``overwrite``, which empties it.
        n_batches: Batches of the evaluation (for ``journal_status``).
        writer: Whether this process opens (checks, empties, creates) the journal: the first rank of a
            torchrun job; the others read it and write only their own batches.
    """

    def __init__(self, folder: Optional[Union[str, Path]], identity: Dict[str, Any], n_batches: int = 0,
                 overwrite: bool = False, writer: bool = True):
        self.folder = None if folder is None else Path(folder)
        self.identity = json.loads(json.dumps(identity))  # as it reads back from JSON
        if self.folder is None or not writer:
            return
        check_writable_dir(self.folder, 'Progress folder')
        remove_stale_temporaries(self.folder)  # a killed writer's; the caller holds the folder
        path = self.folder / _IDENTITY
        if path.exists():
            recorded = self._read(path, whole=True)
            if recorded.get('identity') != self.identity:
                if not overwrite:
                    found = differences(recorded.get('identity', {}), self.identity)
                    raise JournalError(
                        f'{self.folder} holds the progress of another evaluation ({"; ".join(found[:3])}): run the '
                        f'command that started it to continue it, or pass --overwrite to discard it.')
                self.clear()
        if not path.exists():
            self._write(_IDENTITY, {'identity': self.identity, 'n_batches': n_batches})

    # -- reading ------------------------------------------------------------------------------------------
    def batch(self, index: int) -> Optional[Dict[str, Any]]:
        """Batch ``index``'s record as far as it got, or None."""
        return self._get(f'batch-{index:06d}.json')

    def escalation(self, index: int) -> Optional[Dict[str, Any]]:
        return self._get(f'escalate-{index:06d}.json')

    def sanity(self) -> Optional[Dict[str, Any]]:
        return self._get(_SANITY)

    def report(self) -> Optional[Dict[str, Any]]:
        """The finished report of this evaluation, when it got that far."""
        return self._get(_REPORT)

    def _get(self, name: str) -> Optional[Dict[str, Any]]:
        if self.folder is None or not (self.folder / name).exists():
            return None
        return self._read(self.folder / name)

    def _read(self, path: Path, whole: bool = False) -> Dict[str, Any]:
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError(f'holds {type(record).__name__}, not a JSON object')
        except (OSError, UnicodeDecodeError, ValueError) as e:
            what = 'start over with --overwrite' if whole else 'remove it to measure that part again'
            raise JournalError(f'Progress file {path} cannot be read ({e}): {what}.') from None
        return record

    # -- writing ------------------------------------------------------------------------------------------
    def save_batch(self, index: int, record: Dict[str, Any]) -> None:
        self._write(f'batch-{index:06d}.json', record)

    def save_escalation(self, index: int, record: Dict[str, Any]) -> None:
        self._write(f'escalate-{index:06d}.json', record)

    def save_sanity(self, record: Dict[str, Any]) -> None:
        self._write(_SANITY, record)

    def save_report(self, report: Dict[str, Any]) -> None:
        self._write(_REPORT, report)

    def _write(self, name: str, payload: Dict[str, Any]) -> None:
        if self.folder is None:
            return
        try:
            atomic_json(self.folder / name, payload, sort_keys=False)
        except OSError as e:  # a full disk, a folder gone read-only: stop, keeping what is recorded
            raise OSError(e.errno, f'cannot record the progress of this evaluation in {self.folder} '
                                   f'({e.strerror or e}); what was measured before is kept there: fix that and '
                                   f'run the same command again to continue') from None

    def clear(self) -> None:
        """Forget everything recorded (the folder and its lock stay)."""
        for path in self.folder.iterdir():
            if path.is_file() and path.name != '.lock':
                path.unlink()

    def remove(self) -> None:
        """Remove the folder: the evaluation's report is written where it belongs."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def journal_status(folder: Union[str, Path]) -> Optional[str]:
    """``'12 of 40 batches measured'`` for an evaluation in progress in ``folder`` (and its subfolders), or None
    when there is none."""
    folder = Path(folder)
    identities = sorted(folder.rglob(_IDENTITY)) if folder.is_dir() else []
    if not identities:
        return None
    done = total = 0
    for path in identities:
        try:
            total += int(json.loads(path.read_text()).get('n_batches', 0))
        except (OSError, ValueError, AttributeError):
            pass
        done += sum(1 for p in path.parent.iterdir() if _RECORD.match(p.name))
    return f'evaluation in progress: {done} of {total} batches recorded' if total else 'evaluation in progress'
