"""Training checkpoints: written atomically, read without unpickling anything but tensors and plain types.

A checkpoint is a dict that timm's own loaders understand (``state_dict`` holds the model weights, so
``timm.create_model(name, checkpoint_path=...)`` and ``timm.models.load_checkpoint`` read it), plus the
optimizer, scheduler and task state and the epoch, for ``--resume``.
"""
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Union

import torch

from ..checkpoint import CheckpointError, read_checkpoint

__all__ = ['atomic_save', 'load_training_checkpoint']


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash (or SIGKILL) at any point leaves either the previous file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, 'O_DIRECTORY'):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def load_training_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a checkpoint written by ``timm-nofrost train`` (``weights_only=True``: no code can run)."""
    path = Path(path)
    try:
        state = read_checkpoint(path)  # the package's one reader: safetensors or weights_only pickle
    except FileNotFoundError:
        raise CheckpointError(f'Checkpoint {path} does not exist.', path=path) from None
    if not isinstance(state, dict) or 'state_dict' not in state or 'epoch' not in state:
        raise CheckpointError(f'{path} is not a timm-nofrost training checkpoint (no state_dict / epoch entries).',
                              path=path)
    return state
