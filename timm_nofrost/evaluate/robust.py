"""``evaluate``: robust accuracy of a model under named attacks at one or more eps, with sanity checks."""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..attacks import NORMS, PixelModel, build_attack, parse_attack, parse_eps, unwrap_model
from ..attacks.base import check_inputs
from .data import load_dataset, read_id_list, select_subset
from .report import WORST_CASE, RobustReport, format_eps
from .sanity import check_monotone_in_eps, check_zero_gradients, run_attack_checks

__all__ = ['evaluate']


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit='batch', leave=False)


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
        amp_dtype: Optional[torch.dtype] = None,
        sanity: bool = True,
        sanity_examples: int = 32,
        analysis: bool = False,
        progress: bool = True,
        split: str = 'validation',
        model_name: Optional[str] = None,
) -> RobustReport:
    """Evaluate clean and robust accuracy, per attack and per eps, plus the per-example worst case.

    Args:
        model: A timm classifier (normalised inputs); mean/std come from its pretrained config.
        data: An ImageFolder directory, a timm dataset name (``torch/cifar10:ROOT``), a Dataset yielding
            [0, 1] image tensors, or a DataLoader of ``(images in [0, 1], labels)``.
        attacks: Names (``'clean,pgd-20,apgd-ce,autoattack'``); see ``timm_nofrost.attacks.ATTACK_NAMES``.
        eps: One or more radii (``'4/255,8/255'``).
        norm: ``'Linf'`` or ``'L2'``.
        n_examples: Evaluate a fixed, seeded random subset of this size (recorded in the report).
        subset_ids: A list, or a file, of dataset indices or relative image paths (e.g. RobustBench's
            5,000-image ImageNet list); takes precedence over ``n_examples``.
        sanity: Run the sanity checks (on up to ``sanity_examples`` correctly classified examples).
        analysis: Add decision-margin and local-smoothness statistics.
    """
    if norm not in NORMS:
        raise ValueError(f'Unknown norm {norm!r}; accepted: {", ".join(NORMS)}.')
    specs = [parse_attack(a) for a in _as_list(attacks)]
    if not specs:
        raise ValueError('No attacks given.')
    eps_values = sorted({parse_eps(e) for e in _as_list(eps)})
    if not eps_values:
        raise ValueError('No eps given.')
    if norm == 'Linf' and eps_values[-1] > 1:
        raise ValueError(f'Linf eps {eps_values[-1]:g} is above 1, the whole pixel range.')
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}.')
    device = torch.device(device)
    model = unwrap_model(model).to(device).eval()
    pixel_model = PixelModel.from_model(model)
    name = model_name or (getattr(model, 'pretrained_cfg', {}) or {}).get('architecture') or type(model).__name__

    subset_info: Dict[str, Any] = {'kind': 'loader'}
    if isinstance(data, DataLoader):
        loader, dataset_name = data, type(data.dataset).__name__
    else:
        dataset = load_dataset(data, model, split=split)
        ids = None
        if subset_ids is not None:
            ids = read_id_list(subset_ids) if isinstance(subset_ids, (str, Path)) else [str(i) for i in subset_ids]
        dataset, subset_info = select_subset(
            dataset, n_examples, seed, ids, str(subset_ids) if isinstance(subset_ids, (str, Path)) else None)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        dataset_name = str(data) if isinstance(data, (str, Path)) else type(data).__name__

    attack_specs = [s for s in specs if s.kind != 'clean']
    attack_names = [s.name for s in attack_specs]
    labels = [format_eps(e, norm) for e in eps_values]
    correct_counts = {label: {a: 0 for a in attack_names + [WORST_CASE]} for label in labels}
    zero_sums = {label: {a: 0.0 for a in attack_names} for label in labels}
    per_example = {label: {a: [] for a in attack_names + [WORST_CASE]} for label in labels}
    clean_correct_total = 0
    total = 0
    sanity_x, sanity_y = [], []
    built = {(label, s.name): build_attack(s, pixel_model, e, norm=norm, seed=seed, amp_dtype=amp_dtype)
             for e, label in zip(eps_values, labels) for s in attack_specs}

    for x, y in _progress(loader, len(loader), progress, f'evaluating {name}'):
        x, y = x.to(device), y.to(device)
        if x.dtype == torch.uint8:  # timm's un-normalised eval transform yields uint8 tensors
            x = x.float().div_(255)
        with torch.no_grad():
            logits = pixel_model(x)
        check_inputs(x, y, logits.shape[1])
        clean = logits.argmax(dim=1) == y
        clean_correct_total += int(clean.sum())
        total += x.shape[0]
        if sanity and sum(t.shape[0] for t in sanity_x) < sanity_examples:
            sanity_x.append(x[clean])
            sanity_y.append(y[clean])
        for label in labels:
            worst = clean.clone()
            for spec in attack_specs:
                correct = clean.clone()
                idx = clean.nonzero()[:, 0]
                if idx.numel():
                    result = built[(label, spec.name)](x[idx], y[idx])
                    correct[idx] = result.correct
                    zero_sums[label][spec.name] += result.zero_grad_frac * idx.numel()
                correct_counts[label][spec.name] += int(correct.sum())
                per_example[label][spec.name] += correct.int().tolist()
                worst &= correct
            correct_counts[label][WORST_CASE] += int(worst.sum())
            per_example[label][WORST_CASE] += worst.int().tolist()

    if total == 0:
        raise ValueError('The dataset yielded no examples.')
    accuracy = {label: {a: c / total for a, c in counts.items()} for label, counts in correct_counts.items()}
    zero_fracs = {label: {a: s / max(clean_correct_total, 1) for a, s in sums.items()}
                  for label, sums in zero_sums.items()}

    flags = []
    if sanity:
        flags.append(check_monotone_in_eps({e: accuracy[l] for e, l in zip(eps_values, labels)}, total))
        flags.append(check_zero_gradients({f'{a}@{l}': v for l, d in zero_fracs.items() for a, v in d.items()}))
        xs = torch.cat(sanity_x)[:sanity_examples] if sanity_x else None
        if xs is not None and xs.shape[0]:
            ys = torch.cat(sanity_y)[:sanity_examples]
            steps = next((s.steps for s in attack_specs if s.kind == 'pgd'), 10)
            flags += run_attack_checks(pixel_model, xs, ys, eps_values[0] or eps_values[-1], norm, steps,
                                       seed=seed, amp_dtype=amp_dtype)

    report = RobustReport(
        model=name, dataset=dataset_name, norm=norm, eps=eps_values, attacks=attack_names, n_examples=total,
        subset=dict(subset_info), clean_accuracy=clean_correct_total / total, accuracy=accuracy,
        zero_grad_frac=zero_fracs, sanity=[f.to_dict() for f in flags], per_example=per_example,
        settings=dict(seed=seed, batch_size=batch_size, device=str(device), norm=norm,
                      amp_dtype=str(amp_dtype) if amp_dtype else None, timm=timm.__version__,
                      torch=torch.__version__))
    if analysis and sanity_x:
        from .analysis import margin_and_smoothness
        xs, ys = torch.cat(sanity_x)[:sanity_examples], torch.cat(sanity_y)[:sanity_examples]
        report.analysis = margin_and_smoothness(pixel_model, xs, ys, eps_values[-1], norm, seed=seed)
    return report
