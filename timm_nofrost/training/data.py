"""Datasets for ``timm-nofrost train``: the embedded demo set, an ImageFolder directory, or a timm dataset name.

Every source is checked before any training starts, so a missing or empty directory fails in a second with a
message naming it, not an hour later inside a worker process.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch.utils.data import Dataset, Subset

__all__ = ['DataSource', 'build_datasets', 'check_image_folder', 'spread_indices', 'IMG_EXTENSIONS']

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.tif', '.tiff')
_TRAIN_DIRS = ('train', 'training')
_VAL_DIRS = ('val', 'validation', 'valid', 'eval', 'evaluation', 'test')


@dataclass
class DataSource:
    """Training and validation datasets (with a ``transform`` attribute for timm's loaders) and their classes."""
    train: Dataset
    val: Dataset
    num_classes: int
    description: str


def check_image_folder(root: Path) -> List[str]:
    """The class folder names of an ImageFolder ``root``; a ValueError if there is nothing to train on."""
    if not root.exists():
        raise ValueError(f'Data directory {root} does not exist.')
    if not root.is_dir():
        raise ValueError(f'Data path {root} is not a directory (expected an ImageFolder: ROOT/<class>/<image>).')
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
    if not classes:
        raise ValueError(f'Data directory {root} has no class folders (expected ROOT/<class>/<image>, or '
                         f'ROOT/train/<class>/<image> and ROOT/val/<class>/<image>).')
    has_image = any(
        f.suffix.lower() in IMG_EXTENSIONS for c in classes for _, _, files in os.walk(root / c) for f in map(Path, files))
    if not has_image:
        raise ValueError(f'Data directory {root} has class folders ({", ".join(classes[:5])}) but no images '
                         f'({", ".join(IMG_EXTENSIONS)}).')
    return classes


def _find(root: Path, names: Tuple[str, ...]) -> Optional[Path]:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _holdout(n: int, fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """A fixed, seeded split of ``range(n)`` into (train, held-out) indices."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def build_datasets(data: str, data_dir: Optional[str] = None, img_size: int = 32, val_fraction: float = 0.1,
                   seed: int = 0) -> DataSource:
    """Datasets for ``data``: ``'demo'``, an ImageFolder directory, or a timm dataset name (``torch/cifar10``...).

    An ImageFolder with ``train/`` and ``val/`` (or ``validation/``...) subfolders uses them; a single folder of
    class folders holds out a fixed, seeded ``val_fraction`` for validation.
    """
    from timm.data import create_dataset

    if data == 'demo':
        from ..data import NoFrostShapes
        train, val = NoFrostShapes('train', img_size=img_size), NoFrostShapes('val', img_size=img_size)
        return DataSource(train, val, len(train.classes), f'demo shapes ({len(train)} train / {len(val)} val images, '
                                                          f'{len(train.classes)} classes, {img_size}px)')
    root = Path(data).expanduser()
    if root.exists() or os.sep in data or data.startswith('.'):
        train_dir, val_dir = _find(root, _TRAIN_DIRS), _find(root, _VAL_DIRS)
        if train_dir is not None:
            classes = check_image_folder(train_dir)
            if val_dir is None:
                raise ValueError(f'{root} has {train_dir.name}/ but no validation folder ({", ".join(_VAL_DIRS)}).')
            check_image_folder(val_dir)
            train = create_dataset('', root=str(train_dir), split='train', search_split=False)
            val = create_dataset('', root=str(val_dir), split='validation', search_split=False,
                                 class_map={c: i for i, c in enumerate(classes)})
            return DataSource(train, val, len(classes), f'ImageFolder {root} ({len(train)} train / {len(val)} val)')
        classes = check_image_folder(root)
        full = create_dataset('', root=str(root), split='train', search_split=False)
        if len(full) < 2:
            raise ValueError(f'Data directory {root} has {len(full)} image(s); need at least 2 (train and val).')
        train_idx, val_idx = _holdout(len(full), val_fraction, seed)
        train, val = _TransformSubset(full, train_idx), _TransformSubset(
            create_dataset('', root=str(root), split='train', search_split=False), val_idx)
        return DataSource(train, val, len(classes), f'ImageFolder {root} ({len(train)} train / {len(val)} held-out '
                                                    f'val, {val_fraction:.0%} seeded split)')
    # a timm dataset name: torch/<name>, hfds/<name>, tfds/<name>, wds/<name>
    if '/' not in data:
        raise ValueError(f"Unknown data {data!r}: expected 'demo', an existing ImageFolder directory, or a timm dataset "
                         f"name such as 'torch/cifar10' (with --data-dir).")
    try:
        train = create_dataset(data, root=data_dir, split='train', is_training=True, download=False)
        val = create_dataset(data, root=data_dir, split='validation', download=False)
    except (RuntimeError, FileNotFoundError, ValueError, AssertionError) as e:
        raise ValueError(f'Could not open dataset {data!r} under {data_dir!r}: {e}') from None
    if len(train) == 0:
        raise ValueError(f'Dataset {data!r} under {data_dir!r} is empty.')
    classes = getattr(train, 'classes', None) or getattr(getattr(train, 'reader', None), 'class_to_idx', None)
    num_classes = len(classes) if classes else None
    return DataSource(train, val, num_classes, f'{data} ({len(train)} train / {len(val)} val)')


class _TransformSubset(Subset):
    """A ``Subset`` whose ``transform`` reaches the wrapped dataset (timm's loaders set ``dataset.transform``)."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value


def spread_indices(n_examples: int, dataset_size: int) -> List[int]:
    """``n_examples`` dataset indices spread evenly over ``range(dataset_size)``: ``floor(i * size / n)``.

    A fixed subset that visits every part of the validation set: ImageFolder sorts images by class, so the
    first N images would cover only the first few classes.
    """
    n = min(n_examples, dataset_size)
    return [i * dataset_size // n for i in range(n)]
