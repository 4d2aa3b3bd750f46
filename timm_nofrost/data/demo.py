"""An embedded, procedurally generated image dataset for demos and tests: no download, deterministic.

``NoFrostShapes`` draws one of five shapes (circle, square, triangle, cross, ring) at a random position,
size and colour on a textured background with pixel noise, 32x32 RGB by default. A small CNN must actually
learn shapes (colour and position carry no label information), reaches high clean accuracy within a few
epochs, and, trained without adversarial examples, is fooled by L-inf perturbations of a few /255: a
demo set where both clean accuracy and robustness are meaningful, in seconds on a CPU. It is not a
benchmark: numbers on it say nothing about ImageNet.
"""
import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

__all__ = ['NoFrostShapes', 'DEMO_CLASSES', 'DEMO_MEAN', 'DEMO_STD', 'render_shapes', 'write_image_folder']

DEMO_CLASSES = ('circle', 'square', 'triangle', 'cross', 'ring')
DEMO_MEAN = (0.5, 0.5, 0.5)
DEMO_STD = (0.25, 0.25, 0.25)
_SPLIT_SEEDS = {'train': 0, 'val': 1_000_003}
_DEFAULT_SIZES = {'train': 2000, 'val': 500}


def _mask(label: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    dist = np.sqrt(dx ** 2 + dy ** 2)
    if label == 0:  # circle
        return dist <= r
    if label == 1:  # square (same area scale as the circle)
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if label == 2:  # triangle, apex up
        return (dy <= 0.8 * r) & (np.abs(dx) <= 0.6 * (dy + r))
    if label == 3:  # plus-shaped cross
        t = 0.35 * r
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    return (dist <= r) & (dist >= 0.55 * r)  # ring


def render_shapes(n: int, img_size: int = 32, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8, N x H x W x 3) and labels (int64), balanced over the classes, from ``seed``."""
    if n < 0 or img_size < 16:
        raise ValueError(f'Need n >= 0 and img_size >= 16, got n={n}, img_size={img_size}.')
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(DEMO_CLASSES)
    rng.shuffle(labels)
    # per image: a darker background with a random gradient, a brighter shape colour, radius, centre
    base = rng.uniform(0.1, 0.45, size=(n, 1, 1, 3))
    grad = rng.uniform(-0.1, 0.1, size=(n, 2, 1, 1, 3))
    fg = rng.uniform(0.55, 0.95, size=(n, 1, 1, 3))
    r = rng.uniform(0.25, 0.4, size=(n, 1, 1)) * img_size
    cx = rng.uniform(0, 1, size=(n, 1, 1)) * (img_size - 2 * r - 2) + r + 1
    cy = rng.uniform(0, 1, size=(n, 1, 1)) * (img_size - 2 * r - 2) + r + 1
    noise = rng.normal(0, 0.03, size=(n, img_size, img_size, 3))
    yy, xx = np.mgrid[0:img_size, 0:img_size].astype(np.float64)
    bg = base + (xx[None, :, :, None] / img_size - 0.5) * grad[:, 0] \
        + (yy[None, :, :, None] / img_size - 0.5) * grad[:, 1]
    mask = np.zeros((n, img_size, img_size), dtype=bool)
    for label in range(len(DEMO_CLASSES)):
        idx = labels == label
        mask[idx] = _mask(label, xx[None] - cx[idx], yy[None] - cy[idx], r[idx])
    images = np.where(mask[..., None], fg, bg) + noise
    return np.clip(np.round(images * 255), 0, 255).astype(np.uint8), labels.astype(np.int64)


class NoFrostShapes(torch.utils.data.Dataset):
    """The demo dataset, as PIL images with integer labels (timm's loaders set ``transform``).

    Args:
        split: ``'train'`` (2,000 images by default) or ``'val'`` (500); the splits use disjoint seeds.
        num_samples: Number of images (default per split as above).
        img_size: Side of the square images.
        transform, target_transform: Applied to the PIL image / the label.
    """

    def __init__(self, split: str = 'train', num_samples: Optional[int] = None, img_size: int = 32,
                 transform: Optional[Callable] = None, target_transform: Optional[Callable] = None):
        if split not in _SPLIT_SEEDS:
            raise ValueError(f'Unknown split {split!r}; accepted: {", ".join(_SPLIT_SEEDS)}.')
        n = _DEFAULT_SIZES[split] if num_samples is None else num_samples
        self.images, self.labels = render_shapes(n, img_size, seed=_SPLIT_SEEDS[split])
        self.split = split
        self.classes: List[str] = list(DEMO_CLASSES)
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])
        target = int(self.labels[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        """A stable name per image (timm's dataset interface)."""
        return f'{self.classes[self.labels[index]]}/{self.split}_{index:05d}.png'

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """All images as float pixels in [0, 1] (N, 3, H, W) and their labels."""
        x = torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255)
        return x, torch.from_numpy(self.labels)


def write_image_folder(root: Union[str, os.PathLike], split: str = 'train', num_samples: Optional[int] = None,
                       img_size: int = 32) -> Path:
    """Write a split as an ImageFolder (``root/<class>/<name>.png``), e.g. to try the ImageFolder path."""
    dataset = NoFrostShapes(split, num_samples=num_samples, img_size=img_size)
    root = Path(root)
    for cls in dataset.classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        Image.fromarray(dataset.images[i]).save(root / dataset.filename(i))
    return root
