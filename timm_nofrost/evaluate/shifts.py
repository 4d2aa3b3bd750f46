"""Robustness of ImageNet-1k classifiers to natural distribution shifts, read from local folders.

Benchmarks, each read from ``root`` in the layout it is published in (nothing is ever downloaded):

``imagenet-c``
    ``ROOT/<corruption>/<severity 1..5>/<wnid>/<image>.JPEG`` (Hendrycks & Dietterich, ICLR 2019).
    Reported: accuracy per corruption and severity, Corruption Error per corruption
    ``CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}`` and their mean, mCE (in %), plus the
    unnormalised mean accuracy (``top1``).
``imagenet-r``, ``imagenet-a``
    ``ROOT/<wnid>/<image>`` over a published 200-class subset of ImageNet-1k. The model's 1000-way
    logits are restricted to that subset before the argmax, as in the authors' evaluation code.
``imagenet-sketch``
    ``ROOT/<wnid>/<image>`` over the 1000 ImageNet-1k classes (or any subset of wnid folders): top-1.

Folder wnids are mapped to ImageNet-1k indices through the standard sorted wnid order (timm's
``ImageNetInfo``), never to the order of the folders present, so a partial copy is scored correctly.
All accuracies and errors are percentages.
"""
import dataclasses
import functools
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from ..pixels import resolve_mean_std
from .engine import EvalProgress, correct_per_image
from .eval_set import EvalSet


__all__ = [
    'SHIFT_BENCHMARKS', 'IMAGENET_C_CORRUPTIONS', 'IMAGENET_C_SEVERITIES', 'ALEXNET_CORRUPTION_ERRORS',
    'IMAGENET_R_WNIDS', 'IMAGENET_A_WNIDS', 'ShiftResult', 'evaluate_shift', 'corruption_errors', 'imagenet_wnids',
]

SHIFT_BENCHMARKS = ('imagenet-c', 'imagenet-r', 'imagenet-a', 'imagenet-sketch')

# the 15 corruptions of the ImageNet-C benchmark (the 4 extra "held-out" ones are not part of mCE)
IMAGENET_C_CORRUPTIONS: Tuple[str, ...] = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression',
)
IMAGENET_C_SEVERITIES: Tuple[int, ...] = (1, 2, 3, 4, 5)

# AlexNet top-1 error on ImageNet-C, per corruption, averaged over the 5 severities (fraction).
# These are the normalisers of mCE in Hendrycks & Dietterich, "Benchmarking Neural Network Robustness
# to Common Corruptions and Perturbations" (ICLR 2019), as published by the authors' group in the
# ImageNet-C evaluation of AugMix (github.com/google-research/augmix, imagenet.py, ``ALEXNET_ERR``:
# "Raw AlexNet errors taken from https://github.com/hendrycks/robustness"); the same constants are
# used by e.g. OpenMMLab's mCE metric. Since each value is a mean over 5 severities,
# sum_s E_s / sum_s E^AlexNet_s == mean_s E_s / ALEXNET_CORRUPTION_ERRORS[c].
ALEXNET_CORRUPTION_ERRORS: Dict[str, float] = {
    'gaussian_noise': 0.886428,
    'shot_noise': 0.894468,
    'impulse_noise': 0.922640,
    'defocus_blur': 0.819880,
    'glass_blur': 0.826268,
    'motion_blur': 0.785948,
    'zoom_blur': 0.798360,
    'snow': 0.866816,
    'frost': 0.826572,
    'fog': 0.819324,
    'brightness': 0.564592,
    'contrast': 0.853204,
    'elastic_transform': 0.646056,
    'pixelate': 0.717840,
    'jpeg_compression': 0.606500,
}

# The 200 ImageNet-R classes (Hendrycks et al., "The Many Faces of Robustness", ICCV 2021) and the 200 ImageNet-A
# classes (Hendrycks et al., "Natural Adversarial Examples", CVPR 2021), sorted, as shipped with timm
# (timm/data/_info): the same lists as the authors' eval.py in github.com/hendrycks/imagenet-r and
# github.com/hendrycks/natural-adv-examples (``thousand_k_to_200``).
IMAGENET_R_WNIDS = tuple(pkgutil.get_data('timm.data', '_info/imagenet_r_synsets.txt').decode().split())
IMAGENET_A_WNIDS = tuple(pkgutil.get_data('timm.data', '_info/imagenet_a_synsets.txt').decode().split())

_NUM_CLASSES = 1000
_LAYOUTS = {
    'imagenet-c': 'ROOT/<corruption>/<severity 1..5>/<wnid>/<image>.JPEG',
    'imagenet-r': 'ROOT/<wnid>/<image> (200 ImageNet-R wnid folders)',
    'imagenet-a': 'ROOT/<wnid>/<image> (200 ImageNet-A wnid folders)',
    'imagenet-sketch': 'ROOT/<wnid>/<image> (ImageNet-1k wnid folders)',
}
_SUBSETS = {'imagenet-r': IMAGENET_R_WNIDS, 'imagenet-a': IMAGENET_A_WNIDS}
# counts the images of ``samples`` classified correctly, the logits restricted to a wnid subset (None: all 1000)
_Run = Callable[[List[Tuple[Path, int]], Optional[Sequence[str]], str], int]


@dataclass
class ShiftResult:
    """Outcome of one benchmark: top-1 accuracy (%) over ``n_examples`` images and its breakdown."""

    benchmark: str
    top1: float
    n_examples: int
    details: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """A plain (JSON-serialisable) dict of the result."""
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> Tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in the standard (sorted) class-index order, from timm."""
    from timm.data import ImageNetInfo

    wnids = tuple(ImageNetInfo('imagenet-1k').label_names())
    if len(wnids) != _NUM_CLASSES:  # pragma: no cover - guards against a changed timm asset
        raise RuntimeError(f'timm ImageNetInfo lists {len(wnids)} ImageNet-1k classes, expected 1000')
    return wnids


@functools.lru_cache(maxsize=1)
def _wnid_to_index() -> Dict[str, int]:
    return {wnid: i for i, wnid in enumerate(imagenet_wnids())}


def corruption_errors(
        errors: Mapping[str, Union[float, Sequence[float]]],
) -> Tuple[Dict[str, float], float]:
    """Corruption Errors and mCE (both in %) from a model's top-1 errors (fractions in [0, 1]).

    ``errors`` maps a corruption name to its error, either one per severity or already averaged over
    severities. ``CE_c = mean_s E_{s,c} / E^AlexNet_c`` (AlexNet error averaged over severities);
    mCE is the mean of CE over the corruptions given (the standard number needs all 15).
    """
    ces: Dict[str, float] = {}
    for name, err in errors.items():
        if name not in ALEXNET_CORRUPTION_ERRORS:
            raise ValueError(f'unknown ImageNet-C corruption {name!r}; expected one of {IMAGENET_C_CORRUPTIONS}')
        values = [float(err)] if isinstance(err, (int, float)) else [float(e) for e in err]
        if not values:
            raise ValueError(f'no error values given for corruption {name!r}')
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f'errors for {name!r} must be fractions in [0, 1], got {values}')
        ces[name] = 100.0 * (sum(values) / len(values)) / ALEXNET_CORRUPTION_ERRORS[name]
    if not ces:
        raise ValueError('no corruption errors given')
    return ces, sum(ces.values()) / len(ces)


class _WnidFolder(Dataset):
    """``(image, ImageNet-1k index)`` pairs from ``root/<wnid>/<image>``; labels follow the 1k order."""

    def __init__(self, samples: List[Tuple[Path, int]], transform: Callable) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, target = self.samples[index]
        return self.transform(default_loader(str(path))), target


def _scan_wnid_folders(
        root: Path,
        layout: str,
        allowed: Optional[Iterable[str]] = None,
        benchmark: str = '',
        max_per_class: Optional[int] = None,
) -> List[Tuple[Path, int]]:
    """Sorted ``(path, ImageNet-1k index)`` samples of every ``root/<wnid>/`` folder, validated."""
    _check_root(root, benchmark, layout)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    if not class_dirs:
        raise ValueError(f'{benchmark} folder {str(root)!r} holds no class folders; expected layout {layout}')
    index_of = _wnid_to_index()
    allowed_set = set(allowed) if allowed is not None else None
    samples: List[Tuple[Path, int]] = []
    for class_dir in class_dirs:
        wnid = class_dir.name
        if wnid not in index_of:
            raise ValueError(
                f'folder {str(class_dir)!r}: {wnid!r} is not an ImageNet-1k wnid; expected layout {layout}')
        if allowed_set is not None and wnid not in allowed_set:
            raise ValueError(
                f'folder {str(class_dir)!r}: {wnid!r} is an ImageNet-1k wnid but not one of the '
                f'{len(allowed_set)} {benchmark} classes; expected layout {layout}')
        files = sorted((p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith('.')
                        and p.suffix.lower() in IMG_EXTENSIONS), key=lambda p: p.name)
        samples.extend((p, index_of[wnid]) for p in files[:max_per_class])
    if not samples:
        raise ValueError(
            f'{benchmark} folder {str(root)!r} holds no images (extensions {IMG_EXTENSIONS}); '
            f'expected layout {layout}')
    return samples


def _check_root(root: Path, benchmark: str, layout: str) -> None:
    if not root.is_dir():
        raise FileNotFoundError(f'{benchmark} folder {str(root)!r} does not exist; expected layout {layout}')


def _count_correct(model: nn.Module, samples: List[Tuple[Path, int]], transform: Callable, batch_size: int,
                   device: torch.device, num_workers: int, subset: Optional[Sequence[str]], progress: bool,
                   desc: str) -> int:
    """Images whose (optionally class-restricted) argmax is their ImageNet-1k label: the benchmark's images as an
    ``EvalSet`` through the evaluation's one clean-accuracy loop."""
    eval_set = EvalSet(_WnidFolder(samples, transform), desc, 'test', {'kind': 'all', 'n': len(samples)},
                       class_subset=None if subset is None else [_wnid_to_index()[w] for w in subset],
                       workers=num_workers)
    bar = EvalProgress('bar' if progress else False, -(-len(samples) // batch_size), desc)
    try:
        return int(correct_per_image(model, eval_set, batch_size, device, _NUM_CLASSES, bar).sum())
    finally:
        bar.close()


def _normalise_benchmark(benchmark: str) -> str:
    name = str(benchmark).strip().lower().replace('_', '-')
    if name not in SHIFT_BENCHMARKS:
        raise ValueError(f'unknown benchmark {benchmark!r}; expected one of {SHIFT_BENCHMARKS}')
    return name


def _evaluate_imagenet_c(
        root: Path,
        corruptions: Optional[Sequence[str]],
        severities: Sequence[int],
        run: _Run,
        max_per_class: Optional[int],
) -> ShiftResult:
    layout = _LAYOUTS['imagenet-c']
    names = tuple(IMAGENET_C_CORRUPTIONS if corruptions is None else corruptions)
    unknown = [c for c in names if c not in ALEXNET_CORRUPTION_ERRORS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f'corruptions must be distinct names from {IMAGENET_C_CORRUPTIONS}, got {list(names)}')
    sevs = tuple(int(s) for s in severities)
    if not sevs or len(set(sevs)) != len(sevs) or any(s not in IMAGENET_C_SEVERITIES for s in sevs):
        raise ValueError(f'severities must be distinct values from {IMAGENET_C_SEVERITIES}, got {list(severities)}')
    _check_root(root, 'imagenet-c', layout)
    # check the whole layout before the (long) evaluation starts
    for c, s in ((c, s) for c in names for s in sevs if not (root / c / str(s)).is_dir()):
        raise FileNotFoundError(f'imagenet-c: missing folder {str(root / c / str(s))!r} (corruption {c!r}, '
                                f'severity {s}); expected layout {layout}')
    accuracy: Dict[str, Dict[int, float]] = {c: {} for c in names}
    counts: Dict[str, Dict[int, int]] = {c: {} for c in names}
    for c in names:
        for s in sevs:
            samples = _scan_wnid_folders(root / c / str(s), layout, None, 'imagenet-c', max_per_class)
            correct = run(samples, None, f'imagenet-c {c}/{s}')
            accuracy[c][s] = 100.0 * correct / len(samples)
            counts[c][s] = len(samples)
    mean_accuracy = {c: sum(accuracy[c].values()) / len(sevs) for c in names}
    ces, mce = corruption_errors({c: [1.0 - a / 100.0 for a in accuracy[c].values()] for c in names})
    top1 = sum(mean_accuracy.values()) / len(names)
    details: Dict[str, Any] = {
        'accuracy': accuracy, 'mean_accuracy': mean_accuracy, 'corruption_error': ces, 'mce': mce,
        'mean_error_unnormalized': 100.0 - top1, 'n_examples_per_severity': counts, 'corruptions': list(names),
        'severities': list(sevs),
        # mCE is the published benchmark number only over all 15 corruptions x 5 severities
        'mce_standard': set(names) == set(IMAGENET_C_CORRUPTIONS) and set(sevs) == set(IMAGENET_C_SEVERITIES),
        'alexnet_error': {c: ALEXNET_CORRUPTION_ERRORS[c] for c in names},
    }
    n_examples = sum(n for per_sev in counts.values() for n in per_sev.values())
    return ShiftResult('imagenet-c', top1, n_examples, details)


def evaluate_shift(
        model: nn.Module,
        benchmark: str,
        root: Union[str, Path],
        transform: Optional[Callable] = None,
        batch_size: int = 64,
        device: Union[str, torch.device] = 'cpu',
        num_workers: int = 0,
        max_per_class: Optional[int] = None,
        corruptions: Optional[Sequence[str]] = None,
        severities: Sequence[int] = (1, 2, 3, 4, 5),
        progress: bool = True,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
) -> ShiftResult:
    """Top-1 accuracy (%) of an ImageNet-1k classifier on a natural-shift benchmark in a local folder.

    ``transform`` defaults to timm's eval transform for ``model``, normalising with ``mean`` / ``std`` (default:
    the model's timm ``pretrained_cfg``; a model without one needs them, see ``timm_nofrost.pixels``). The model
    is moved to ``device`` and evaluated in eval mode (its previous train/eval mode is restored afterwards).
    ``max_per_class`` keeps the first N sorted images of each class folder; ``corruptions`` and
    ``severities`` select ImageNet-C subsets (mCE is standard only for all of them).
    """
    name = _normalise_benchmark(benchmark)
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f'max_per_class must be >= 1 or None, got {max_per_class}')
    root = Path(root).expanduser()
    dev = torch.device(device)
    transform = _eval_transform(model, transform, mean, std)
    was_training = model.training
    model = model.to(dev).eval()

    def run(samples: List[Tuple[Path, int]], subset: Optional[Sequence[str]], desc: str) -> int:
        return _count_correct(model, samples, transform, batch_size, dev, num_workers, subset, progress, desc)

    try:
        if name == 'imagenet-c':
            return _evaluate_imagenet_c(root, corruptions, severities, run, max_per_class)
        return _evaluate_wnid_benchmark(name, root, run, max_per_class)
    finally:
        model.train(was_training)


def _eval_transform(model: nn.Module, transform: Optional[Callable], mean: Optional[Sequence[float]],
                    std: Optional[Sequence[float]]) -> Callable:
    """``transform``, or timm's eval transform for ``model`` normalising with ``mean`` / ``std``; both is refused."""
    if transform is None:
        from timm.data import create_transform, resolve_data_config

        mean, std = resolve_mean_std(model, mean, std)  # never timm's silent ImageNet default
        return create_transform(**resolve_data_config({'mean': mean, 'std': std}, model=model))
    if mean is not None or std is not None:
        raise ValueError('mean/std set the normalisation of the default transform; a transform given normalises '
                         'itself. Pass one or the other.')
    return transform


def _evaluate_wnid_benchmark(name: str, root: Path, run: _Run, max_per_class: Optional[int]) -> ShiftResult:
    """ImageNet-R / -A / -Sketch: top-1 over the ``root/<wnid>/`` folders, the logits restricted to the
    benchmark's class subset where it has one."""
    subset = _SUBSETS.get(name)
    samples = _scan_wnid_folders(root, _LAYOUTS[name], subset, name, max_per_class)
    correct = run(samples, subset, name)
    details = {'n_correct': correct, 'n_classes': len({label for _, label in samples}),
               'class_subset_size': len(subset) if subset is not None else _NUM_CLASSES,
               'logits_masked': subset is not None}
    return ShiftResult(name, 100.0 * correct / len(samples), len(samples), details)
