"""Clean and robust accuracy of a model under training, in pixel space, on a fixed validation subset."""
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from ..pixels import PixelModel, amp_dtype, to_float_pixels, unwrap_model
from ..data.sources import spread_indices
from .train_config import TrainConfig

__all__ = ['clean_accuracy', 'robust_report', 'report_accuracy']


def _pixel_batches(loader_or_ds):
    for x, y in loader_or_ds:
        yield to_float_pixels(x), y


@torch.no_grad()
def clean_accuracy(model: nn.Module, val, device: torch.device, batch_size: int, workers: int,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> float:
    """Top-1 (%) on ``val`` (pixels in [0, 1] or uint8), normalised with ``mean`` / ``std`` (default: the
    model's timm ``pretrained_cfg``; the train command passes its data config's)."""
    pixel = PixelModel.from_model(unwrap_model(model), mean, std).to(device).eval()
    loader = DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=workers)
    correct = total = 0
    for x, y in _pixel_batches(loader):
        x, y = x.to(device), y.to(device)
        correct += int((pixel(x).argmax(1) == y).sum())
        total += y.numel()
    return 100.0 * correct / max(total, 1)


def robust_report(model: nn.Module, val, cfg: TrainConfig, device: torch.device, attacks: str, sanity: bool,
                  name: str, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                  progress: Union[bool, str] = 'lines'):
    """Clean and robust accuracy on ``robust_examples`` validation images spread evenly over the set (fixed),
    normalised inside the attacked model with ``mean`` / ``std`` (default: the model's timm ``pretrained_cfg``).

    Goes through ``evaluate()`` and its engine, like ``timm-nofrost eval``; ``progress`` as there (``'lines'``:
    a line on stderr at most every 10 s, so a long final evaluation shows signs of life without bars)."""
    from ..evaluate import evaluate
    subset = Subset(val, spread_indices(cfg.robust_examples, len(val)))
    loader = DataLoader(subset, batch_size=min(cfg.batch_size, 128), shuffle=False,
                        num_workers=cfg.workers)
    return evaluate(model, loader, attacks=attacks, eps=[cfg.adv.eps], norm=cfg.adv.norm, device=device,
                    seed=cfg.seed, amp_dtype=amp_dtype(cfg.amp), sanity=sanity, progress=progress, model_name=name,
                    mean=mean, std=std)


def report_accuracy(report) -> Dict[str, Optional[float]]:
    """Percent accuracy per attack (clean first, worst case last) at the report's single eps."""
    by_attack = report.accuracy[report.eps_labels[0]]
    return {'clean': 100.0 * report.clean_accuracy,
            **{a: None if v is None else 100.0 * v for a, v in by_attack.items()}}

