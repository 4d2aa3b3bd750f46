"""Clean and robust accuracy of a model under training, in pixel space, on a fixed validation subset."""
from typing import Dict

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from ..attacks.base import unwrap_model
from .data import spread_indices
from .train_config import TrainConfig

__all__ = ['clean_accuracy', 'robust_report', 'report_accuracy']


def _pixel_batches(loader_or_ds):
    for x, y in loader_or_ds:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        yield x, y


@torch.no_grad()
def clean_accuracy(model: nn.Module, val, device: torch.device, batch_size: int, workers: int) -> float:
    from ..attacks.base import PixelModel
    pixel = PixelModel.from_model(unwrap_model(model)).to(device).eval()
    loader = DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=workers)
    correct = total = 0
    for x, y in _pixel_batches(loader):
        x, y = x.to(device), y.to(device)
        correct += int((pixel(x).argmax(1) == y).sum())
        total += y.numel()
    return 100.0 * correct / max(total, 1)


def robust_report(model: nn.Module, val, cfg: TrainConfig, device: torch.device, attacks: str, sanity: bool,
                  name: str):
    """Clean and robust accuracy on ``robust_examples`` validation images spread evenly over the set (fixed)."""
    from ..evaluate import evaluate
    subset = Subset(val, spread_indices(cfg.robust_examples, len(val)))
    loader = DataLoader(subset, batch_size=min(cfg.batch_size, 128), shuffle=False,
                        num_workers=cfg.workers)
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(cfg.amp or '')
    return evaluate(model, loader, attacks=attacks, eps=[cfg.adv.eps], norm=cfg.adv.norm, device=device,
                    seed=cfg.seed, amp_dtype=amp, sanity=sanity, progress=False, model_name=name)


def report_accuracy(report) -> Dict[str, float]:
    """Percent accuracy per attack (clean first, worst case last) at the report's single eps."""
    by_attack = report.accuracy[report.eps_labels[0]]
    return {'clean': 100.0 * report.clean_accuracy, **{a: 100.0 * v for a, v in by_attack.items()}}

