"""Output folders and the files in them: checked writable before any work starts, written atomically under
unique temporary names with one file mode, and held by one process at a time, so that a fault at any point
leaves either the old file or the new one and two processes never do the same run twice."""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Set, Union

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, folders are not guarded
    fcntl = None

__all__ = ['check_writable_dir', 'check_output_file', 'atomic_write', 'atomic_json', 'atomic_copy', 'FolderBusy', 'hold_folder',
           'remove_stale_temporaries', 'WRITE_HOOK']

PathLike = Union[str, os.PathLike]
LOCK_FILE = '.lock'
# called as WRITE_HOOK(path, stage) before each atomic write ('begin') and before its rename ('commit'): tests
# inject faults there (raise OSError, or os._exit to stand for a SIGKILL) at every write of a run
WRITE_HOOK: Optional[Callable[[Path, str], None]] = None
_HELD: Set[Path] = set()  # folders this process holds


def check_writable_dir(path: PathLike, what: str = 'Output folder') -> bool:
    """Create ``path`` if needed and write a temporary file in it; returns whether it was created.

    Raises:
        PermissionError: naming the folder, when it cannot be created or written (also under a regular file).
    """
    path = Path(path)
    existed = path.is_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise PermissionError(f'{what} {path} is not writable: {e.strerror or e}.') from None
    return not existed


def check_output_file(path: PathLike, what: str = 'Output file') -> Path:
    """Check, before any work, that ``path`` can be written: its folder is created if needed and writable, and
    ``path`` itself is not a folder.

    Raises:
        PermissionError / IsADirectoryError: naming the file and why.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f'{what} {path} is a folder: give a file name.')
    check_writable_dir(path.parent, f'The folder of {what.lower()} {path}')
    if path.exists() and not os.access(path, os.W_OK) and not os.access(path.parent, os.W_OK):
        raise PermissionError(f'{what} {path} cannot be replaced.')
    return path


def atomic_write(path: PathLike, content: Union[bytes, str, Callable[[IO[bytes]], None]]) -> Path:
    """Write ``content`` (bytes, text, or a function writing into a binary file) to a uniquely named temporary
    file beside ``path``, fsync it, give it the mode of a freshly created file, then rename it over ``path``.

    A fault at any point leaves the old file or the new one, never a partial one; a failed write removes its
    temporary file. Two writers never share a temporary file.
    """
    path = Path(path)
    if WRITE_HOOK is not None:
        WRITE_HOOK(path, 'begin')
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode('utf-8') if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if WRITE_HOOK is not None:
            WRITE_HOOK(path, 'commit')
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if hasattr(os, 'O_DIRECTORY'):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def atomic_json(path: PathLike, payload: Any, sort_keys: bool = True) -> Path:
    """``payload`` as indented JSON, written by ``atomic_write``."""
    return atomic_write(path, json.dumps(payload, indent=2, sort_keys=sort_keys) + '\n')


def atomic_copy(source: PathLike, path: PathLike) -> Path:
    """A copy of ``source`` at ``path``, written by ``atomic_write``."""
    with open(source, 'rb') as src:
        return atomic_write(path, lambda f: shutil.copyfileobj(src, f))


def remove_stale_temporaries(folder: PathLike) -> None:
    """Remove the temporary files a killed writer left in ``folder``; call it only while holding the folder."""
    for tmp in Path(folder).glob('.*.tmp'):
        with contextlib.suppress(OSError):
            tmp.unlink()


class FolderBusy(ValueError):
    """Another live process holds the folder (trains or evaluates in it)."""


@contextlib.contextmanager
def hold_folder(folder: PathLike, what: str, wait: bool = False) -> Iterator[Path]:
    """Hold ``folder`` for this process while the block runs: an OS lock on ``folder/.lock`` that the kernel
    releases when the process ends, however it ends, so a stale lock never blocks. Re-entrant in one process.

    Raises:
        FolderBusy: another process holds it (unless ``wait``, which blocks until it is free).
    """
    folder = Path(folder).resolve()
    if folder in _HELD or fcntl is None:
        yield folder
        return
    check_writable_dir(folder)
    with open(folder / LOCK_FILE, 'a+') as lock:  # closing releases the lock
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or 'another process'
            raise FolderBusy(f'{folder} is in use by {owner}; wait for it to finish (or stop it), or choose '
                             f'another folder.') from None
        lock.seek(0)
        lock.truncate()
        lock.write(f'process {os.getpid()} ({what})')
        lock.flush()
        _HELD.add(folder)
        try:
            yield folder
        finally:
            _HELD.discard(folder)
