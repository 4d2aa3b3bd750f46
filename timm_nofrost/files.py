"""Output folders: checked writable before any work starts, so a long job never fails at its first save."""
import tempfile
from pathlib import Path
from typing import Union

__all__ = ['check_writable_dir']


def check_writable_dir(path: Union[str, Path], what: str = 'Output folder') -> bool:
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
