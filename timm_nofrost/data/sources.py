"""Data sources of ``timm-nofrost train`` and ``timm-nofrost eval``: one syntax, one resolver, one transform.

A ``--data`` value is one of:

* ``demo``: the embedded shapes (``NoFrostShapes``), rendered at the run's image size;
* an ImageFolder root with ``train/`` and ``val/`` (or ``validation/``, ``valid/``, ``eval/``, ``test/``)
  subfolders: training uses the train folder, validation and evaluation the val-like folder;
* a single folder of class folders (``ROOT/<class>/<image>``): training holds out a fixed, seeded
  ``val_fraction``; evaluation with the same ``val_fraction`` and seed gets exactly that held-out part, and
  without one the whole folder (e.g. an ImageNet val folder);
* a timm dataset name (``torch/cifar10``, ``torch/image_folder``, ``hfds/...``) with its root in ``data_dir``;
  the older spelling ``torch/cifar10:ROOT`` is accepted too.

Train's validation set and eval's evaluation set come from the same functions, the images go through the same
transform (``source_data_config`` + ``pixel_eval_transform``), and ``image_fingerprint`` identifies the images
so that the two can be compared. Every source is checked before any work starts, so a missing or empty folder
fails in a second with a message naming it.
"""
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

__all__ = [
    'DataSource', 'SourceSpec', 'resolve_source', 'build_datasets', 'build_eval_dataset', 'open_split',
    'check_image_folder', 'spread_indices', 'holdout_split', 'source_data_config', 'pixel_eval_transform',
    'image_names', 'image_fingerprint', 'IMG_EXTENSIONS', 'DEMO_IMG_SIZE', 'TIMM_PREFIXES', 'SOURCE_KINDS',
]

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.tif', '.tiff')
DEMO_IMG_SIZE = 32  # the demo shapes' default side, and the demo runs' input size
TIMM_PREFIXES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')  # timm.data.create_dataset name prefixes
SOURCE_KINDS = ('demo', 'image-folder', 'folder', 'timm')
_TRAIN_DIRS = ('train', 'training')
_VAL_DIRS = ('val', 'validation', 'valid', 'eval', 'evaluation', 'test')
_SYNTAX = ("'demo', an ImageFolder directory (ROOT/<class>/<image>, or ROOT/train and ROOT/val), or a timm "
           "dataset name such as 'torch/cifar10' (root given by --data-dir)")


@dataclass
class DataSource:
    """Training and validation datasets (with a ``transform`` attribute for timm's loaders) and their classes."""
    train: Dataset
    val: Dataset
    num_classes: Optional[int]
    description: str
    kind: str = ''  # one of SOURCE_KINDS


@dataclass(frozen=True)
class SourceSpec:
    """What a ``--data`` value names, before anything is loaded.

    ``kind`` is one of ``SOURCE_KINDS``; ``name`` the timm dataset name (``''`` otherwise); ``root`` the folder
    (``None`` for the demo data, ``data_dir`` for a timm name).
    """
    kind: str
    name: str = ''
    root: Optional[str] = None


def resolve_source(data: str, data_dir: Optional[str] = None) -> SourceSpec:
    """Classify ``data`` (see the module docstring) without reading any image.

    Raises:
        FileNotFoundError: a folder path that does not exist.
        ValueError: anything else that is no data source, or two different roots for a timm name.
    """
    data = str(data)
    if data == 'demo':
        return SourceSpec('demo')
    if not data:
        raise ValueError(f'No data given: expected {_SYNTAX}.')
    exists = Path(data).expanduser().exists()
    prefix = data.split('/', 1)[0].lower() if '/' in data else ''
    if not exists and prefix in TIMM_PREFIXES:
        name, colon, root = data.partition(':')  # the older eval spelling torch/cifar10:ROOT
        if colon:
            if data_dir is not None and Path(data_dir).expanduser() != Path(root).expanduser():
                raise ValueError(f'{data!r} names the root {root!r} and --data-dir names {data_dir!r}: give one.')
            data_dir = root
        return SourceSpec('timm', name, data_dir)
    root = Path(data).expanduser()
    if not exists:
        if os.sep not in data and '/' not in data and not data.startswith('.'):
            raise ValueError(f'Unknown data {data!r}: expected {_SYNTAX}.')
        raise FileNotFoundError(f'Dataset folder not found: {root} (it does not exist; expected {_SYNTAX}).')
    if not root.is_dir():
        raise ValueError(f'Data path {root} is not a directory (expected an ImageFolder: ROOT/<class>/<image>).')
    return SourceSpec('image-folder' if _split_dirs(root) != (None, None) else 'folder', '', str(root))


def _find(root: Path, names: Tuple[str, ...]) -> Optional[Path]:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _split_dirs(root: Path) -> Tuple[Optional[Path], Optional[Path]]:
    """(train-like, val-like) subfolders of a split root, or (None, None) for a single folder of class folders.

    A root is split when it has a train-like subfolder, or when every subfolder is a split name (e.g. an
    ImageNet root with only ``val/`` extracted): a class that happens to be called ``test`` stays a class.
    """
    train_dir, val_dir = _find(root, _TRAIN_DIRS), _find(root, _VAL_DIRS)
    if train_dir is None and val_dir is not None:
        subdirs = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith('.')}
        if not subdirs <= set(_TRAIN_DIRS + _VAL_DIRS):
            val_dir = None
    return train_dir, val_dir


def check_image_folder(root: Path) -> List[str]:
    """The class folder names of an ImageFolder ``root`` in timm's (natural) order; a ValueError if it holds no
    images."""
    from timm.utils.misc import natural_key
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f'Dataset folder not found: {root} (it does not exist).')
    if not root.is_dir():
        raise ValueError(f'Data path {root} is not a directory (expected an ImageFolder: ROOT/<class>/<image>).')
    classes = sorted((d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith('.')), key=natural_key)
    if not classes:
        raise ValueError(f'Data directory {root} is empty: no class folders (expected ROOT/<class>/<image>, or '
                         f'ROOT/train/<class>/<image> and ROOT/val/<class>/<image>).')
    has_image = any(Path(f).suffix.lower() in IMG_EXTENSIONS
                    for c in classes for _, _, files in os.walk(root / c) for f in files)
    if not has_image:
        raise ValueError(f'Data directory {root} has class folders ({", ".join(classes[:5])}) but no images '
                         f'({", ".join(IMG_EXTENSIONS)}).')
    return classes


def _folder_dataset(root: Path, classes: List[str]) -> Dataset:
    """A timm ImageDataset of ``root`` whose labels are the indices of ``classes`` (the same in every split)."""
    from timm.data import create_dataset
    return create_dataset('', root=str(root), split='validation', search_split=False,
                          class_map={c: i for i, c in enumerate(classes)})


def holdout_split(n: int, fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """A fixed, seeded split of ``range(n)`` into (train, held-out) indices."""
    _check_fraction(fraction)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f'val_fraction must be a number in (0, 1), got {fraction!r}.')


def _split_side(split: str) -> str:
    """``'train'`` or ``'validation'``: the side of a train / val source that ``split`` names."""
    if split in _TRAIN_DIRS:
        return 'train'
    if split in _VAL_DIRS:
        return 'validation'
    raise ValueError(f'Unknown split {split!r}; accepted: {", ".join(_TRAIN_DIRS + _VAL_DIRS)}.')


def _open_timm(spec: SourceSpec, split: str, **kwargs: Any) -> Dataset:
    from timm.data import create_dataset
    try:
        return create_dataset(spec.name, root=spec.root, split=split, download=False, **kwargs)
    except (RuntimeError, FileNotFoundError, ValueError, AssertionError, TypeError, OSError) as e:
        hint = '' if spec.root else ' (no root given: pass --data-dir)'
        raise ValueError(f'Could not open the {split} split of dataset {spec.name!r} under {spec.root!r}{hint}: '
                         f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None


def _num_classes(dataset: Dataset) -> Optional[int]:
    dataset = _base_index(dataset)[0]
    classes = getattr(dataset, 'classes', None) or getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    return len(classes) if classes else None


def build_datasets(data: str, data_dir: Optional[str] = None, img_size: int = DEMO_IMG_SIZE,
                   val_fraction: float = 0.1, seed: int = 0) -> DataSource:
    """Training and validation datasets of ``data`` (see the module docstring), without transforms: the
    ``'train'`` and ``'validation'`` splits of ``open_split``.

    An ImageFolder with ``train/`` and ``val/`` (or ``validation/``...) subfolders uses them; a single folder of
    class folders holds out a fixed, seeded ``val_fraction`` (``holdout_split(n, val_fraction, seed)``).
    """
    _check_fraction(val_fraction)
    spec = resolve_source(data, data_dir)
    if spec.kind == 'image-folder':
        train_dir, val_dir = _split_dirs(Path(spec.root))
        if train_dir is None or val_dir is None:
            missing, names = ('training', _TRAIN_DIRS) if train_dir is None else ('validation', _VAL_DIRS)
            raise ValueError(f'{spec.root} has {(val_dir or train_dir).name}/ but no {missing} folder '
                             f'({", ".join(names)}).')
    fraction = val_fraction if spec.kind == 'folder' else None
    train = open_split(spec, 'train', img_size=img_size, val_fraction=fraction, seed=seed, training=True)
    val = open_split(spec, 'validation', img_size=img_size, val_fraction=fraction, seed=seed)
    if len(train) == 0:
        raise ValueError(f'Dataset {data!r} has no training images.')
    held_out = f'{len(val)} held-out val, {val_fraction:.0%} seeded split' if fraction else f'{len(val)} val'
    label = {'demo': f'demo shapes ({img_size}px', 'timm': f'{spec.name} (',
             'image-folder': f'ImageFolder {spec.root} (', 'folder': f'ImageFolder {spec.root} ('}[spec.kind]
    num_classes = _num_classes(train)
    return DataSource(train, val, num_classes, f'{label}{", " if spec.kind == "demo" else ""}{len(train)} train / '
                                               f'{held_out}, {num_classes} classes)', spec.kind)


def build_eval_dataset(data: str, split: str = 'validation', data_dir: Optional[str] = None,
                       img_size: Optional[int] = None, val_fraction: Optional[float] = None,
                       seed: int = 0) -> Dataset:
    """The evaluation set of ``data``, without transform: the ``split`` side of the source ``build_datasets``
    trains and validates on (``open_split``).

    ``split='validation'`` (the default) is exactly ``build_datasets(...).val`` when given the same
    ``data_dir``, ``img_size``, ``val_fraction`` and ``seed``. A single folder of class folders without
    ``val_fraction`` is evaluated whole. ``split`` may also name a subfolder of a split ImageFolder root
    (``test``), which is then labelled with the training folder's classes.
    """
    if val_fraction is not None:
        _check_fraction(val_fraction)
    spec = resolve_source(data, data_dir)
    if val_fraction is not None and spec.kind != 'folder':
        raise ValueError(f'val_fraction applies to a single folder of class folders; {data!r} is '
                         f'{"a train / val ImageFolder" if spec.kind == "image-folder" else "not one"}: its '
                         f'validation split is used as it is.')
    return open_split(spec, split, img_size=img_size, val_fraction=val_fraction, seed=seed)


def open_split(spec: SourceSpec, split: str, img_size: Optional[int] = None, val_fraction: Optional[float] = None,
               seed: int = 0, training: bool = False) -> Dataset:
    """The one reader of a split of a data source, without transform; ``training`` opens a timm dataset for
    training (its own shuffling / augmentation hooks)."""
    if spec.kind == 'timm':
        return _open_timm(spec, split, **({'is_training': True} if training else {}))
    if spec.kind == 'demo':
        from .demo import NoFrostShapes
        return NoFrostShapes('train' if _split_side(split) == 'train' else 'val', img_size=img_size or DEMO_IMG_SIZE)
    root = Path(spec.root)
    if spec.kind == 'image-folder':
        train_dir, val_dir = _split_dirs(root)
        named = root / split if split not in ('train', 'validation') and (root / split).is_dir() else None
        folder = named or (train_dir if _split_side(split) == 'train' else val_dir)
        if folder is None:
            raise ValueError(f'{root} has no {split} folder (expected one of '
                             f'{", ".join(_TRAIN_DIRS if _split_side(split) == "train" else _VAL_DIRS)}).')
        classes = check_image_folder(folder)
        if train_dir is not None and folder != train_dir:
            classes = check_image_folder(train_dir)  # labels as in training
        return _folder_dataset(folder, classes)
    classes = check_image_folder(root)
    full = _folder_dataset(root, classes)  # a new dataset object per split: their transforms differ
    if val_fraction is None:
        return full
    if len(full) < 2:
        raise ValueError(f'Data directory {root} has {len(full)} image(s); need at least 2 for a held-out split.')
    train_idx, val_idx = holdout_split(len(full), val_fraction, seed)
    return _TransformSubset(full, train_idx if _split_side(split) == 'train' else val_idx)


class _TransformSubset(Subset):
    """A ``Subset`` whose ``transform`` reaches the wrapped dataset (timm's loaders set ``dataset.transform``)."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value


def source_data_config(data: Any, model: nn.Module, img_size: Optional[int] = None) -> Dict[str, Any]:
    """The timm data config (input size, interpolation, crop, mean / std) for ``model`` on ``data``.

    The one place that decides it: ``train`` validates and ``eval`` evaluates through it, so a model trained at
    ``img_size`` is evaluated at ``img_size``. The demo data defaults to ``DEMO_IMG_SIZE`` and is not cropped.
    """
    demo = isinstance(data, str) and data == 'demo'
    size = DEMO_IMG_SIZE if img_size is None and demo else img_size
    args: Dict[str, Any] = {} if size is None else {'input_size': (3, size, size)}
    if demo:
        args['crop_pct'] = 1.0
    return timm.data.resolve_data_config(args, model=model)


def pixel_eval_transform(data_config: Dict[str, Any]) -> Callable:
    """timm's eval transform (resize, center crop) for ``data_config``, yielding pixels in [0, 1], not normalised:
    attacks work on pixels and the model normalises inside ``PixelModel``."""
    return timm.data.create_transform(**data_config, is_training=False, normalize=False)


def _base_index(dataset: Dataset) -> Tuple[Dataset, Callable[[int], int]]:
    """The dataset under any ``Subset`` wrappers, and index in ``dataset`` -> index in it."""
    if not isinstance(dataset, Subset):
        return dataset, int
    base, index = _base_index(dataset.dataset)
    indices = dataset.indices
    return base, lambda i: index(int(indices[i]))


def _name_fn(dataset: Dataset) -> Optional[Callable[[int], str]]:
    """index -> image path relative to the dataset root, or ``None`` for datasets without file names."""
    base, index = _base_index(dataset)
    filename = getattr(base, 'filename', None)  # timm's ImageDataset, NoFrostShapes
    if callable(filename):
        return lambda i: str(filename(index(i), basename=False, absolute=False))
    samples, root = getattr(base, 'samples', None), getattr(base, 'root', None)
    if isinstance(samples, list) and samples and isinstance(samples[0], (tuple, list)) \
            and isinstance(samples[0][0], str):  # torchvision ImageFolder
        return lambda i: os.path.relpath(samples[index(i)][0], root) if root else samples[index(i)][0]
    return None


def image_names(dataset: Dataset) -> Optional[List[str]]:
    """The image paths of ``dataset`` relative to its root, in dataset order (through Subsets); ``None`` when
    the dataset has no file names (e.g. torchvision's CIFAR-10)."""
    name = _name_fn(dataset)
    if name is None:
        return None
    try:
        names = [name(i) for i in range(len(dataset))]
    except (AttributeError, TypeError, KeyError, IndexError, NotImplementedError):
        return None
    return names if all(isinstance(n, str) and n for n in names) else None


def image_fingerprint(dataset: Dataset) -> Dict[str, Any]:
    """Which images ``dataset`` holds: ``n_images`` and ``images_sha256``, the sha256 of the newline-joined
    relative image paths (``hashed: 'paths'``), or of the dataset indices for datasets without file names
    (``hashed: 'indices'``). Train records its validation set's, eval its evaluated images', so the two can be
    compared. Empty for datasets without a length (streamed)."""
    try:
        n = len(dataset)
    except TypeError:
        return {}
    names = image_names(dataset)
    hashed = 'paths' if names is not None else 'indices'
    index = _base_index(dataset)[1]
    items = names if names is not None else [str(index(i)) for i in range(n)]
    return {'n_images': n, 'images_sha256': hashlib.sha256('\n'.join(items).encode()).hexdigest(), 'hashed': hashed}


def spread_indices(n_examples: int, dataset_size: int) -> List[int]:
    """``n_examples`` dataset indices spread evenly over ``range(dataset_size)``: ``floor(i * size / n)``.

    A fixed subset that visits every part of the validation set: ImageFolder sorts images by class, so the
    first N images would cover only the first few classes.
    """
    n = min(n_examples, dataset_size)
    return [i * dataset_size // n for i in range(n)]
