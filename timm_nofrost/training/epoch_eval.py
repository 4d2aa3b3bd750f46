"""Clean and robust accuracy of a model under training, in pixel space, on a fixed validation subset."""
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.data import Subset

from ..data.sources import spread_indices
from ..evaluate import EvalSet, Protocol, evaluate
from ..evaluate.engine import correct_per_image
from ..pixels import PixelModel, unwrap_model
from .train_config import TrainConfig

__all__ = ['clean_accuracy', 'robust_report', 'report_accuracy']


def clean_accuracy(model: nn.Module, val, device: torch.device, batch_size: int, workers: int,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> float:
    """Top-1 (%) on ``val`` (pixels in [0, 1] or uint8), normalised with ``mean`` / ``std`` (default: the
    model's timm ``pretrained_cfg``; the train command passes its data config's)."""
    pixel = PixelModel.from_model(unwrap_model(model), mean, std).to(device).eval()
    correct = correct_per_image(pixel, EvalSet(val, 'validation', workers=workers), batch_size, device)
    return 100.0 * int(correct.sum()) / max(correct.numel(), 1)


def robust_report(model: nn.Module, val, cfg: TrainConfig, device: torch.device, attacks: str, sanity: bool,
                  name: str, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                  progress: Union[bool, str] = 'lines', run: str = '', out: Optional[Path] = None):
    """Clean and robust accuracy on ``robust_examples`` validation images spread evenly over the set (fixed),
    normalised inside the attacked model with ``mean`` / ``std`` (default: the model's timm ``pretrained_cfg``).

    Goes through ``evaluate()`` and its engine, like ``timm-nofrost eval``; ``progress`` as there (``'lines'``:
    a line on stderr at most every 10 s, so a long final evaluation shows signs of life without bars); ``name``:
    the model as built, ``run``: which run it is; ``out``: where the report goes (its progress kept meanwhile)."""
    indices = spread_indices(cfg.robust_examples, len(val))
    eval_set = EvalSet(Subset(val, indices), cfg.data, 'validation', {'kind': 'spread', 'n': len(indices),
                       'indices': indices}, mean=mean, std=std, workers=cfg.workers)
    threat = cfg.adv.threat
    protocol = Protocol(attacks=attacks, eps=[threat.eps], norm=threat.norm, seed=cfg.seed, sanity=sanity,
                        batch_size=min(cfg.batch_size, 128))
    # out: resumable, and a report of other weights left there by an earlier run is replaced, never kept
    return evaluate(model, eval_set, protocol, device=device, amp_dtype=cfg.amp, progress=progress, model_name=name,
                    run=run, out=out, overwrite=True)


def report_accuracy(report) -> Dict[str, Optional[float]]:
    """Percent accuracy per attack (clean first, worst case last) at the report's single eps."""
    by_attack = report.accuracy[report.eps_labels[0]]
    return {'clean': 100.0 * report.clean_accuracy,
            **{a: None if v is None else 100.0 * v for a, v in by_attack.items()}}
