"""Evaluation data in pixel space: the model's own eval transforms without the normalisation.

Attacks work on [0, 1] pixels and normalise inside the model, so the loader yields resized / cropped
tensors exactly as the model's timm eval transform does, minus ``Normalize``.
"""
import hashlib
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from ..data.sources import build_eval_dataset, image_names, pixel_eval_transform, source_data_config

__all__ = ['pixel_transform', 'load_dataset', 'select_subset', 'read_id_list', 'SubsetInfo']


def pixel_transform(model: nn.Module, data: str = '', img_size: Optional[int] = None) -> Callable:
    """The model's timm eval transform (resize, center crop) producing [0, 1] tensors, not normalised: the one
    ``timm-nofrost train`` validates with on ``data`` at ``img_size`` (default: the model's input size)."""
    return pixel_eval_transform(source_data_config(data, model, img_size))


def load_dataset(
        source: Union[str, Path, Dataset],
        model: nn.Module,
        split: str = 'validation',
        *,
        data_dir: Optional[str] = None,
        img_size: Optional[int] = None,
        val_fraction: Optional[float] = None,
        split_seed: int = 0,
) -> Dataset:
    """The evaluation images of ``source`` through the transform ``timm-nofrost train`` validates with.

    ``source`` uses the train command's syntax (``timm_nofrost.data.sources``): ``'demo'``; an ImageFolder root
    (its val / validation / test subfolder when it has train / val subfolders, else the whole folder, or with
    ``val_fraction`` the held-out part of train's split seeded by ``split_seed``); a timm dataset name with its
    root in ``data_dir`` (``torch/cifar10``; ``torch/cifar10:ROOT`` works too); or a ready Dataset of [0, 1]
    image tensors, used as it is. Images are resized / cropped for ``img_size`` (default: the model's input
    size; 32 for the demo data, which is also rendered at ``img_size``) and not normalised.

    Raises:
        FileNotFoundError / ValueError: a missing folder, an unknown source, a bad ``val_fraction``, or a
            dataset with no images.
    """
    if isinstance(source, Dataset):
        dataset = source
    else:
        text = str(source)
        dataset = build_eval_dataset(text, split, data_dir=data_dir, img_size=img_size, val_fraction=val_fraction,
                                     seed=split_seed)
        dataset.transform = pixel_transform(model, text, img_size)
    if len(dataset) == 0:
        raise ValueError(f'Dataset {source} is empty: no images found.')
    return dataset


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
        names = image_names(dataset)
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
