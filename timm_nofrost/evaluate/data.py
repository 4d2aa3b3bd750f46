"""Evaluation data in pixel space: the model's own eval transforms without the normalisation.

Attacks work on [0, 1] pixels and normalise inside the model, so the loader yields resized / cropped
tensors exactly as the model's timm eval transform does, minus ``Normalize``.
"""
import hashlib
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

__all__ = ['pixel_transform', 'load_dataset', 'select_subset', 'read_id_list', 'SubsetInfo']


def pixel_transform(model: nn.Module) -> Callable:
    """The model's timm eval transform (resize, center crop) producing [0, 1] tensors, not normalised."""
    config = timm.data.resolve_data_config({}, model=model)
    return timm.data.create_transform(**config, is_training=False, normalize=False)


def load_dataset(source: Union[str, Path, Dataset], model: nn.Module, split: str = 'validation') -> Dataset:
    """An ImageFolder-style directory, a timm dataset name (``torch/cifar10:DIR`` etc.), ``'demo'``, or a Dataset.

    Raises:
        FileNotFoundError / ValueError: a missing directory, or a dataset with no images.
    """
    if isinstance(source, Dataset):
        dataset = source
    elif str(source) == 'demo':  # the embedded demo set's validation split (timm-nofrost train's default data)
        from ..data import NoFrostShapes
        dataset = NoFrostShapes('val', transform=pixel_transform(model))
    else:
        text = str(source)
        name, _, root = text.partition(':') if ':' in text and not Path(text).exists() else ('', '', text)
        if not name and not Path(root).is_dir():
            raise FileNotFoundError(f'Dataset folder not found: {root} (expected ROOT/<class>/<image> or a timm '
                                    f'dataset name such as torch/cifar10:ROOT).')
        dataset = timm.data.create_dataset(name, root=root, split=split, transform=pixel_transform(model),
                                           download=False)
    if len(dataset) == 0:
        raise ValueError(f'Dataset {source} is empty: no images found.')
    return dataset


@torch.no_grad()
def _names(dataset: Dataset) -> Optional[List[str]]:
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, '_filename'):
        return [str(reader._filename(i, basename=False, absolute=False)) for i in range(len(dataset))]
    samples = getattr(dataset, 'samples', None)
    if samples is not None:
        return [str(s[0]) for s in samples]
    return None


def read_id_list(path: Union[str, Path]) -> List[str]:
    """One id per line: a dataset index, or an image path relative to the dataset root (RobustBench style)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Subset id list not found: {path}')
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith('#')]
    if not ids:
        raise ValueError(f'Subset id list {path} is empty.')
    return ids


class SubsetInfo(dict):
    """How the evaluated examples were chosen: recorded in every report so runs can be reproduced."""


def select_subset(
        dataset: Dataset,
        n_examples: Optional[int] = None,
        seed: int = 0,
        ids: Optional[Sequence[str]] = None,
        ids_source: Optional[str] = None,
) -> Tuple[Dataset, SubsetInfo]:
    """A fixed subset: ``ids`` (indices or relative paths, e.g. RobustBench's 5,000 ImageNet images), or the
    first ``n_examples`` of a seeded permutation, or everything."""
    total = len(dataset)
    if ids is not None:
        names = _names(dataset)
        if all(i.isdigit() for i in ids):
            indices = [int(i) for i in ids]
            bad = [i for i in indices if i >= total]
            if bad:
                raise ValueError(f'Subset ids out of range for a dataset of {total} images: {bad[:5]}')
        else:
            if names is None:
                raise ValueError('This dataset has no file names: give the subset as integer indices.')
            lookup = {}
            for i, name in enumerate(names):
                lookup.setdefault(name, i)
                lookup.setdefault('/'.join(Path(name).parts[-2:]), i)  # <class>/<file>
            indices, missing = [], []
            for item in ids:
                key = '/'.join(Path(item).parts[-2:])
                (indices.append(lookup[key]) if key in lookup else missing.append(item))
            if missing:
                raise ValueError(f'{len(missing)} subset id(s) not found in the dataset, e.g. {missing[:3]}')
        digest = hashlib.sha256('\n'.join(ids).encode()).hexdigest()
        info = SubsetInfo(kind='id-list', source=ids_source, n=len(indices), sha256=digest, indices=indices)
    elif n_examples is not None:
        if not isinstance(n_examples, int) or n_examples < 1:
            raise ValueError(f'n_examples must be a positive integer, got {n_examples!r}.')
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
        indices = sorted(order[:min(n_examples, total)])
        info = SubsetInfo(kind='seeded-random', seed=seed, n=len(indices), indices=indices)
    else:
        indices = list(range(total))
        info = SubsetInfo(kind='all', n=total)
    return Subset(dataset, indices), info
