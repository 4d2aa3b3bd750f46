"""Training checkpoints: written atomically, read without unpickling anything but tensors and plain types.

A checkpoint is a dict that timm's own loaders understand (``state_dict`` holds the model weights, so
``timm.create_model(name, checkpoint_path=...)`` and ``timm.models.load_checkpoint`` read it), plus the
optimizer, scheduler and task state and the epoch, for ``--resume``.
"""
import os
from pathlib import Path
from typing import Any, Dict, Union

import torch

from ..checkpoint import CHECKSUM_KEY, CheckpointError, content_checksum, read_checkpoint
from ..files import atomic_write

__all__ = ['atomic_save', 'load_training_checkpoint']


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """``torch.save`` of ``obj`` with its checksum (``CHECKSUM_KEY``, verified by every read), written atomically
    (``atomic_write``): a crash at any point leaves the previous file or the new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {**obj, CHECKSUM_KEY: content_checksum(obj)} if isinstance(obj, dict) else obj
    return atomic_write(path, lambda f: torch.save(obj, f))


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
