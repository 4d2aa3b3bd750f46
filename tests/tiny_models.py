"""Tiny classifiers trained in seconds, for attack and evaluation tests."""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def faint_colors(n: int = 256, size: int = 16, seed: int = 0, shift: float = 0.06):
    """4 classes told apart by a faint colour cast (channel 0, 1, 2) or its absence: easy to learn, and small
    perturbations (a few /255) are enough to flip an undefended model."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = 0.35 + 0.3 * torch.rand(n, 3, size, size, generator=generator)
    for i, label in enumerate(y.tolist()):
        if label < 3:
            x[i, label] += shift
    return x.clamp(0, 1), y


class TinyCNN(nn.Module):
    """A small undefended CNN taking normalised inputs (mean/std in its pretrained_cfg, like timm models)."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, num_classes)
        self.pretrained_cfg = {'mean': MEAN, 'std': STD, 'architecture': 'tiny_cnn', 'num_classes': num_classes,
                               'input_size': (3, 16, 16), 'crop_pct': 1.0, 'interpolation': 'bilinear'}

    def forward(self, x):
        return self.fc(self.features(x))


@functools.lru_cache(maxsize=None)
def trained_tiny_cnn(seed: int = 0, steps: int = 60) -> TinyCNN:
    torch.manual_seed(seed)
    model = TinyCNN()
    x, y = faint_colors(n=512, seed=seed)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def eval_data(n: int = 128, seed: int = 1):
    return faint_colors(n=n, seed=seed)


class CountingModel(nn.Module):
    """Counts the examples its forwards see: the work an attack or an evaluation spends."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.pretrained_cfg = model.pretrained_cfg
        self.examples = 0

    def forward(self, x):
        self.examples += x.shape[0]
        return self.model(x)
