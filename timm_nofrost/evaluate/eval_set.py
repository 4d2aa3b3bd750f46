"""``EvalSet``: the images of one evaluation, in pixels, and how they were chosen; ``build_eval_set`` makes one
from any data source (the syntax of ``timm-nofrost train --data``, a Dataset, a DataLoader).

Attacks work on [0, 1] pixels and normalise inside the model, so an evaluation set yields resized / cropped
tensors exactly as the model's timm eval transform does, minus ``Normalize``; its ``mean`` / ``std`` are what
the model normalises with (None: the model's timm ``pretrained_cfg``).
"""
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..attacks.base import check_positive_int
from ..data.sources import build_eval_dataset, image_fingerprint, image_names, pixel_eval_transform, \
    source_data_config

__all__ = ['EvalSet', 'build_eval_set', 'select_subset', 'read_id_list']


@dataclass
class EvalSet:
    """The images of an evaluation (``dataset`` of ``(pixels in [0, 1], label)``) and where they come from.

    Args:
        dataset, split: The images, already subset, and the split of the source they come from.
        source: The data source as the user named it: ``'demo'``, a folder, a timm dataset name, a benchmark.
        subset: How the images were chosen (``kind``: ``all``, ``seeded-random``, ``id-list``, ``spread``, with the
            indices), recorded in every report.
        mean, std: The model's input normalisation (None: its timm ``pretrained_cfg``).
        groups: A label per image for per-group accuracy (ImageNet-C: ``'fog/3'``); None: one group.
        class_subset: Restrict the logits to these classes (ImageNet-R / -A: 200 of the 1,000).
        workers: Data-loading processes of ``loader``.
    """
    dataset: Dataset
    source: str
    split: str = 'validation'
    subset: Dict[str, Any] = field(default_factory=lambda: {'kind': 'all'})
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    groups: Optional[List[str]] = None
    class_subset: Optional[Sequence[int]] = None
    workers: int = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def loader(self, batch_size: int, batches: Optional[Sequence[int]] = None) -> DataLoader:
        """The images in order, ``batch_size`` at a time; ``batches``: only these batches (by index), each made
        of exactly the images it holds in the full order (a resumed or sharded evaluation's share)."""
        if batches is None:
            return DataLoader(self.dataset, batch_size=batch_size, shuffle=False, num_workers=self.workers)
        n = len(self.dataset)
        sampler = [list(range(i * batch_size, min((i + 1) * batch_size, n))) for i in batches]
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers)

    def fingerprint(self) -> Dict[str, Any]:
        """Which images these are (``image_fingerprint``): comparable with a training run's ``data`` entry."""
        return image_fingerprint(self.dataset)


def build_eval_set(data: Union[str, Path, Dataset, DataLoader, EvalSet], model: Optional[nn.Module] = None, *,
                   split: str = 'validation', n_examples: Optional[int] = None,
                   subset_ids: Optional[Union[str, Path, Sequence[str]]] = None, seed: int = 0,
                   data_dir: Optional[str] = None, img_size: Optional[int] = None,
                   val_fraction: Optional[float] = None, split_seed: Optional[int] = None,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, workers: int = 0,
                   source: Optional[str] = None) -> EvalSet:
    """The evaluation set of ``data``: the one way every evaluation (``eval``, train's final evaluation, the
    study, timm-train's robust validation) gets its images.

    ``data`` uses the train command's syntax (``timm_nofrost.data.sources``; with ``val_fraction`` a single folder
    gives the held-out part of train's split seeded by ``split_seed``, default 0), its images resized / cropped for
    ``img_size`` (default: the model's; 32 on the demo data) by the model's eval transform without normalisation.
    A ready Dataset (of [0, 1] image tensors) or a DataLoader's dataset is used as it is, labelled ``source``. Then
    ``subset_ids`` (a file or list of indices or relative paths, e.g. RobustBench's 5,000 ImageNet images) or a
    seeded random ``n_examples`` are chosen.

    Raises:
        FileNotFoundError / ValueError: a missing folder, an unknown source, a bad ``val_fraction``, an empty set.
    """
    if isinstance(data, EvalSet):  # its images are chosen: a selection given with it would be silently ignored
        given = {k: v for k, v in dict(n_examples=n_examples, subset_ids=subset_ids, data_dir=data_dir,
                                       img_size=img_size, val_fraction=val_fraction, mean=mean, std=std).items()
                 if v is not None}
        if given:
            raise ValueError(f'{sorted(given)} choose the images or their normalisation, but an EvalSet has them '
                             f'already; build the EvalSet with them (build_eval_set) or pass the data source.')
        return data
    if isinstance(data, DataLoader):
        data = data.dataset  # any map-style dataset, a plain list of (image, label) pairs included
    if not isinstance(data, (str, Path)):
        dataset, name = data, source or 'dataset'
    else:
        name = str(data)
        if model is None:
            raise ValueError(f'Evaluating {name!r} needs the model: its eval transform sizes the images.')
        dataset = build_eval_dataset(name, split, data_dir=data_dir, img_size=img_size, val_fraction=val_fraction,
                                     seed=split_seed or 0)
        dataset.transform = pixel_eval_transform(source_data_config(name, model, img_size))
    if len(dataset) == 0:
        raise ValueError(f'Dataset {name} is empty: no images found.')
    id_file = str(subset_ids) if isinstance(subset_ids, (str, Path)) else None
    ids = read_id_list(id_file) if id_file is not None else None if subset_ids is None else [str(i) for i in subset_ids]
    dataset, info = select_subset(dataset, n_examples, seed, ids, id_file)
    return EvalSet(dataset, name, split, info, mean=mean, std=std, workers=workers)


def read_id_list(path: Union[str, Path]) -> List[str]:
    """One id per line: a dataset index, or an image path relative to the dataset root (RobustBench style)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Subset id list not found: {path}')
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith('#')]
    if not ids:
        raise ValueError(f'Subset id list {path} is empty.')
    return ids


def _indices_of_ids(dataset: Dataset, ids: Sequence[str]) -> List[int]:
    """Dataset indices of ``ids``: integers as they are, else relative image paths looked up by name."""
    total = len(dataset)
    if all(i.isdigit() for i in ids):
        indices = [int(i) for i in ids]
        bad = [i for i in indices if i >= total]
        if bad:
            raise ValueError(f'Subset ids out of range for a dataset of {total} images: {bad[:5]}')
        return indices
    names = image_names(dataset)
    if names is None:
        raise ValueError('This dataset has no file names: give the subset as integer indices.')
    lookup: Dict[str, int] = {}
    for i, name in enumerate(names):
        lookup.setdefault(name, i)
        lookup.setdefault('/'.join(Path(name).parts[-2:]), i)  # <class>/<file>
    keys = ['/'.join(Path(item).parts[-2:]) for item in ids]
    missing = [item for item, key in zip(ids, keys) if key not in lookup]
    if missing:
        raise ValueError(f'{len(missing)} subset id(s) not found in the dataset, e.g. {missing[:3]}')
    return [lookup[key] for key in keys]


def select_subset(dataset: Dataset, n_examples: Optional[int] = None, seed: int = 0,
                  ids: Optional[Sequence[str]] = None, ids_source: Optional[str] = None
                  ) -> Tuple[Dataset, Dict[str, Any]]:
    """A fixed subset and how it was chosen: ``ids`` (indices or relative paths), or the first ``n_examples`` of
    a seeded permutation, or everything."""
    total = len(dataset)
    if ids is not None:
        indices = _indices_of_ids(dataset, ids)
        digest = hashlib.sha256('\n'.join(ids).encode()).hexdigest()
        info = dict(kind='id-list', source=ids_source, n=len(indices), sha256=digest, indices=indices)
    elif n_examples is not None:
        check_positive_int('n_examples', n_examples)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
        indices = sorted(order[:min(n_examples, total)])
        info = dict(kind='seeded-random', seed=seed, n=len(indices), indices=indices)
    else:
        return dataset, dict(kind='all', n=total)
    return Subset(dataset, indices), info
