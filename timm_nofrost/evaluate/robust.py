"""``evaluate``: robust accuracy of a model under named attacks at one or more eps, with sanity checks."""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..attacks import ThreatModel, parse_attack
from ..pixels import PixelModel, unwrap_model
from ..pixels import amp_dtype as resolve_amp_dtype
from .engine import EvalProgress, RobustCounter
from ..data.sources import image_fingerprint
from .data import load_dataset, read_id_list, select_subset
from .report import RobustReport
from .sanity import check_monotone_in_eps, check_zero_gradients, run_attack_checks

__all__ = ['evaluate']


def _as_list(value: Union[str, float, Sequence]) -> List:
    if isinstance(value, str):
        return [v for v in (s.strip() for s in value.split(',')) if v]
    if isinstance(value, (int, float)):
        return [value]
    return list(value)


def evaluate(
        model: nn.Module,
        data: Union[str, Path, Dataset, DataLoader],
        attacks: Union[str, Sequence[str]] = ('clean', 'pgd-20', 'apgd-ce'),
        eps: Union[str, float, Sequence[Union[str, float]]] = ('8/255',),
        norm: str = 'Linf',
        n_examples: Optional[int] = None,
        subset_ids: Optional[Union[str, Path, Sequence[str]]] = None,
        batch_size: int = 64,
        device: Union[str, torch.device] = 'cpu',
        seed: int = 0,
        amp_dtype: Optional[Union[torch.dtype, str]] = None,
        sanity: bool = True,
        sanity_examples: int = 32,
        analysis: bool = False,
        progress: Union[bool, str] = 'auto',
        split: str = 'validation',
        model_name: Optional[str] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        data_dir: Optional[str] = None,
        img_size: Optional[int] = None,
        val_fraction: Optional[float] = None,
        split_seed: int = 0,
        cascade: bool = False,
        active_set: bool = True,
) -> RobustReport:
    """Evaluate clean and robust accuracy, per attack and per eps, plus the per-example worst case.

    Args:
        model: A classifier taking normalised inputs (a timm model); mean/std from ``mean``/``std`` or its
            timm ``pretrained_cfg`` (see below).
        data: A source in the syntax of ``timm-nofrost train --data`` (``'demo'``, an ImageFolder root with or
            without train / val subfolders, a timm dataset name such as ``torch/cifar10`` with ``data_dir``;
            see ``timm_nofrost.data.sources``), a Dataset yielding [0, 1] image tensors, or a DataLoader of
            ``(images in [0, 1], labels)``.
        attacks: Names (``'clean,pgd-20,apgd-ce,autoattack'``); see ``timm_nofrost.attacks.ATTACK_NAMES``.
        eps: One or more radii (``'4/255,8/255'``).
        norm: ``'Linf'`` or ``'L2'``.
        n_examples: Evaluate a fixed, seeded random subset of this size (recorded in the report).
        subset_ids: A list, or a file, of dataset indices or relative image paths (e.g. RobustBench's
            5,000-image ImageNet list); takes precedence over ``n_examples``.
        sanity: Run the sanity checks (on up to ``sanity_examples`` correctly classified examples).
        analysis: Add decision-margin and local-smoothness statistics.
        progress: ``'auto'`` (a bar on a terminal, else a line on stderr when an attack finishes a batch, at most
            every 10 s), ``'bar'``, ``'lines'``, or False for silence.
        cascade: Run each attack only on the examples that survived the previous ones (AutoAttack's protocol):
            the same worst case for less work; per-attack accuracies are then not measured (``None``).
        active_set: Attacks stop working on an example once it is fooled (same outcomes, less work); False runs
            every step on every example.
        mean, std: Normalisation of the model's inputs; default: its timm ``pretrained_cfg``. A model without
            one (torchvision, custom) needs them, else a ValueError before anything runs: ``mean=(0, 0, 0),
            std=(1, 1, 1)`` for a model that takes [0, 1] pixels (see ``timm_nofrost.pixels.resolve_mean_std``).
        data_dir: Root of a timm dataset name given as ``data`` (``torch/cifar10``).
        img_size: Input resolution of the eval transform (default: the model's; 32 on ``'demo'``, which is also
            rendered at this size): pass the training ``--img-size``.
        val_fraction, split_seed: For a single folder of class folders, evaluate the held-out part of the seeded
            split ``timm-nofrost train --val-fraction F --seed SEED`` made (default: the whole folder).

    The report's ``data`` holds the evaluated images' fingerprint (``image_fingerprint``), comparable with the
    ``data`` entry of a training run's results.json.
    """
    threats = sorted({ThreatModel(e, norm) for e in _as_list(eps)}, key=lambda t: t.eps)
    if not threats:
        raise ValueError('No eps given.')
    specs = [parse_attack(a) for a in _as_list(attacks)]
    if not specs:
        raise ValueError('No attacks given.')
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}.')
    amp_dtype = resolve_amp_dtype(amp_dtype)  # 'bf16' / torch.bfloat16 / None
    device = torch.device(device)
    model = unwrap_model(model).to(device).eval()
    pixel_model = PixelModel.from_model(model, mean, std)  # a ValueError before any work if mean/std are unknown
    name = model_name or (getattr(model, 'pretrained_cfg', {}) or {}).get('architecture') or type(model).__name__

    subset_info: Dict[str, Any] = {'kind': 'loader'}
    if isinstance(data, DataLoader):
        loader, dataset_name = data, type(data.dataset).__name__
    else:
        dataset = load_dataset(data, model, split=split, data_dir=data_dir, img_size=img_size,
                               val_fraction=val_fraction, split_seed=split_seed)
        ids = None
        if subset_ids is not None:
            ids = read_id_list(subset_ids) if isinstance(subset_ids, (str, Path)) else [str(i) for i in subset_ids]
        dataset, subset_info = select_subset(
            dataset, n_examples, seed, ids, str(subset_ids) if isinstance(subset_ids, (str, Path)) else None)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        dataset_name = str(data) if isinstance(data, (str, Path)) else type(data).__name__

    counter = RobustCounter(pixel_model, specs, threats, cascade=cascade, seed=seed, amp_dtype=amp_dtype,
                            active_set=active_set)
    sanity_x, sanity_y = [], []
    bar = EvalProgress(progress, len(loader), f'evaluating {name}')
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = counter.update(x, y, bar)
            if sanity and sum(t.shape[0] for t in sanity_x) < sanity_examples:
                clean = out['clean']
                sanity_x.append(counter.last_pixels[clean])
                sanity_y.append(y[clean])
    finally:
        bar.close()

    if counter.total == 0:
        raise ValueError('The dataset yielded no examples.')
    total = counter.total
    accuracy = counter.accuracy()
    zero_fracs = counter.zero_grad_fracs()
    attack_specs = counter.specs

    flags = []
    if sanity:
        flags.append(check_monotone_in_eps({t.eps: accuracy[t.label] for t in threats}, total))
        flags.append(check_zero_gradients({f'{a}@{l}': v for l, d in zero_fracs.items() for a, v in d.items()}))
        xs = torch.cat(sanity_x)[:sanity_examples] if sanity_x else None
        if xs is not None and xs.shape[0]:
            ys = torch.cat(sanity_y)[:sanity_examples]
            steps = next((s.steps for s in attack_specs if s.kind == 'pgd'), 10)
            flags += run_attack_checks(pixel_model, xs, ys, threats[0] if threats[0].eps else threats[-1], steps,
                                       seed=seed, amp_dtype=amp_dtype)

    report = RobustReport(
        model=name, dataset=dataset_name, norm=norm, eps=[t.eps for t in threats], attacks=counter.attack_names,
        n_examples=total, subset=dict(subset_info), clean_accuracy=counter.clean_correct / total, accuracy=accuracy,
        zero_grad_frac=zero_fracs, sanity=[f.to_dict() for f in flags], per_example=counter.per_example,
        cascade=cascade,
        settings=dict(seed=seed, batch_size=batch_size, device=str(device), norm=norm, cascade=cascade,
                      active_set=active_set,
                      amp_dtype=str(amp_dtype) if amp_dtype else None, timm=timm.__version__,
                      torch=torch.__version__),
        data=image_fingerprint(loader.dataset))
    if analysis and sanity_x:
        from .analysis import margin_and_smoothness
        xs, ys = torch.cat(sanity_x)[:sanity_examples], torch.cat(sanity_y)[:sanity_examples]
        report.analysis = margin_and_smoothness(pixel_model, xs, ys, threats[-1].eps, norm, seed=seed)
    return report
