"""Shared fixtures: tiny NoFrost models and checkpoints in the authors' formats, built in the test."""
from pathlib import Path
from typing import Dict

import pytest
import timm
import torch

import timm_nofrost  # noqa: F401  registers the models

from hub_server import configure_hub_env

# a narrow NF-ResNet-18 for 32x32 inputs: the real architecture, small enough for fast CPU tests
TINY_MODEL = 'nf_resnet18_cifar_nofrost'
TINY_ARGS = dict(channels=(8, 16, 32, 64), stem_chs=8)


def tiny_model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(TINY_MODEL, **{**TINY_ARGS, **kwargs})


def randomize_gains(model: torch.nn.Module) -> torch.nn.Module:
    """Give zero-initialised residual gains non-zero values so that every weight affects the logits."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('gain'):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model


def authors_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The authors' best_RA.pth layout: the state_dict of a DDP-wrapped model."""
    return {f'module.{k}': v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path_factory):
    """No test reaches a real hub: offline, a private cache, and an endpoint nothing listens on.

    Hub tests opt in by calling ``configure_hub_env`` again with a loopback ``HubServer``.
    """
    configure_hub_env(monkeypatch, 'http://127.0.0.1:9', tmp_path_factory.mktemp('hf_home'), offline=True)


@pytest.fixture
def sample_batch() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def authors_checkpoint(tmp_path: Path):
    """A trained-looking tiny model saved as the authors' best_RA.pth (module.-prefixed state_dict)."""
    model = randomize_gains(tiny_model()).eval()
    path = tmp_path / 'best_RA.pth'
    torch.save(authors_state_dict(model), path)
    return model, path


def interrupt_after_epochs(monkeypatch, epochs: int) -> None:
    """Make a training run stop (a full disk) when it writes its checkpoint after ``epochs`` epochs: the folder
    holds an unfinished run, as after a kill."""
    import errno
    from timm_nofrost import files
    writes = []

    def full_disk(path: Path, stage: str) -> None:
        if path.name == 'checkpoint-last.pth' and stage == 'begin':
            writes.append(path)
            if len(writes) > epochs:
                monkeypatch.setattr(files, 'WRITE_HOOK', None)
                raise OSError(errno.ENOSPC, 'No space left on device (injected)')
    monkeypatch.setattr(files, 'WRITE_HOOK', full_disk)


def image_folders(root: Path, train: int, val: int, img_size: int = 16) -> Path:
    """``root`` holding ``train/`` and ``val/`` class folders of generated shape images."""
    from timm_nofrost.data import write_image_folder
    write_image_folder(root / 'train', 'train', num_samples=train, img_size=img_size)
    write_image_folder(root / 'val', 'val', num_samples=val, img_size=img_size)
    return root
