"""``evaluate(model, eval_set, protocol)``: robust accuracy of a model under a protocol's attacks and threat
models on an evaluation set, with sanity checks."""
import inspect
import time
from dataclasses import fields, replace
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn

from ..attacks import ESCALATION, autoattack_available
from ..attacks.base import count_passes
from ..pixels import PixelModel, unwrap_model
from ..pixels import amp_dtype as resolve_amp_dtype
from .engine import WORST_CASE, EvalProgress, RobustCounter
from .eval_set import EvalSet, build_eval_set
from .protocol import Protocol
from .robust_report import RobustReport
from .sanity import SanityFlag, check_black_box, check_monotone_in_eps, check_zero_gradients, run_attack_checks

__all__ = ['evaluate']

_PROTOCOL_FIELDS = frozenset(f.name for f in fields(Protocol))
_EVAL_SET_ARGS = frozenset(inspect.signature(build_eval_set).parameters) - {'data', 'model', 'seed'}


def evaluate(model: nn.Module, eval_set: Any, protocol: Optional[Protocol] = None, *,
             device: Union[str, torch.device] = 'cpu', amp_dtype: Optional[Union[torch.dtype, str]] = None,
             progress: Union[bool, str] = 'auto', model_name: Optional[str] = None, **settings: Any) -> RobustReport:
    """Clean and robust accuracy of ``model`` on ``eval_set`` under ``protocol``, per attack and threat model,
    plus the per-example worst case and the protocol's sanity checks.

    Args:
        model: A classifier taking normalised inputs (a timm model); it normalises with the set's mean/std, by
            default its timm ``pretrained_cfg`` (a model without one needs them: ``timm_nofrost.pixels``).
        eval_set: An ``EvalSet``, or anything ``build_eval_set`` takes (``'demo'``, a folder, a timm dataset
            name, a Dataset or DataLoader of [0, 1] images); ``settings`` may then hold its arguments
            (``n_examples``, ``data_dir``, ``img_size``, ``mean``, ``std``, ...).
        protocol: Attacks, threat models, cascade, sanity checks, seed, batch size (``Protocol``); ``settings``
            naming its fields override it: ``evaluate(model, 'demo', attacks='clean,apgd-ce', eps='4/255')``.
        progress: ``'auto'`` (a bar on a terminal, else a line on stderr when an attack finishes a batch, at most
            every 10 s), ``'bar'``, ``'lines'``, or False for silence.

    The report's ``data`` holds the evaluated images' fingerprint, comparable with a training run's results.json.
    """
    unknown = sorted(set(settings) - _PROTOCOL_FIELDS - _EVAL_SET_ARGS)
    if unknown:
        raise TypeError(f'evaluate() got unknown settings {unknown}; accepted: Protocol fields '
                        f'{sorted(_PROTOCOL_FIELDS)} and build_eval_set arguments {sorted(_EVAL_SET_ARGS)}.')
    protocol = replace(protocol or Protocol(), **{k: v for k, v in settings.items() if k in _PROTOCOL_FIELDS})
    eval_set = build_eval_set(eval_set, model, seed=protocol.seed,
                              **{k: v for k, v in settings.items() if k in _EVAL_SET_ARGS})
    device, amp = torch.device(device), resolve_amp_dtype(amp_dtype)
    model = unwrap_model(model).to(device).eval()
    pixel_model = PixelModel.from_model(model, eval_set.mean, eval_set.std)  # a ValueError before any work
    name = model_name or (getattr(model, 'pretrained_cfg', {}) or {}).get('architecture') or type(model).__name__
    bar = EvalProgress(progress, -(-len(eval_set) // protocol.batch_size), f'evaluating {name}')
    counter, xs, ys, positions = _attack_all(pixel_model, eval_set, protocol, device, amp, bar)
    with count_passes(pixel_model.model) as passes:  # the checks' own cost (each check wraps the model anew)
        start = time.perf_counter()
        flags = _sanity_flags(pixel_model, counter, protocol, xs, ys, positions, amp) if protocol.sanity else []
        sanity_cost = {'forward': passes[0], 'backward': passes[1], 'seconds': time.perf_counter() - start}
    escalation = _escalate(counter, eval_set, protocol, flags, device, progress, name)
    report = RobustReport(
        model=name, dataset=eval_set.source, norm=protocol.norm, eps=[t.eps for t in protocol.threats],
        attacks=counter.attack_names, n_examples=counter.total, subset=dict(eval_set.subset),
        clean_accuracy=counter.clean_correct / counter.total, accuracy=counter.accuracy(),
        zero_grad_frac=counter.zero_grad_fracs(), sanity=[f.to_dict() for f in flags], cost=counter.cost,
        per_example=counter.per_example, cascade=protocol.cascade, stages=counter.stages(), escalation=escalation,
        sanity_cost=sanity_cost,
        settings=dict(seed=protocol.seed, batch_size=protocol.batch_size, device=str(device), norm=protocol.norm,
                      cascade=protocol.cascade, active_set=protocol.active_set, early_stop=protocol.early_stop,
                      escalate=protocol.escalate, split=eval_set.split,
                      amp_dtype=str(amp) if amp else None, timm=timm.__version__, torch=torch.__version__),
        data=eval_set.fingerprint())
    if protocol.analysis and xs is not None:
        from .analysis import margin_and_smoothness
        report.analysis = margin_and_smoothness(pixel_model, xs, ys, protocol.threats[-1].eps, protocol.norm,
                                                seed=protocol.seed)
    return report


def _attack_all(pixel_model: PixelModel, eval_set: EvalSet, protocol: Protocol, device: torch.device,
                amp: Optional[torch.dtype], bar: EvalProgress
                ) -> Tuple[RobustCounter, Optional[torch.Tensor], Optional[torch.Tensor], List[int]]:
    """Every batch through the engine; the first ``sanity_examples`` correctly classified images for the checks,
    and their positions in the evaluation."""
    counter = RobustCounter(pixel_model, protocol.specs, protocol.threats, cascade=protocol.cascade,
                            seed=protocol.seed, amp_dtype=amp, active_set=protocol.active_set,
                            early_stop=protocol.early_stop)
    kept_x, kept_y, positions = [], [], []
    try:
        for x, y in eval_set.loader(protocol.batch_size):
            x, y = x.to(device), y.to(device)
            offset = counter.total
            clean = counter.update(x, y, bar)['clean']
            if len(positions) < protocol.sanity_examples:
                kept_x.append(counter.last_pixels[clean])
                kept_y.append(y[clean])
                positions += (offset + clean.nonzero()[:, 0]).tolist()
    finally:
        bar.close()
    if counter.total == 0:
        raise ValueError('The dataset yielded no examples.')
    if not positions:
        return counter, None, None, []
    n = protocol.sanity_examples
    return counter, torch.cat(kept_x)[:n], torch.cat(kept_y)[:n], positions[:n]


def _escalate(counter: RobustCounter, eval_set: EvalSet, protocol: Protocol, flags: List[SanityFlag],
              device: torch.device, progress: Union[bool, str], name: str) -> Dict[str, Any]:
    """``fast-worst-case``'s second pass: AutoAttack's FAB-T and Square on its survivors when a sanity check
    flagged the model or the protocol asks for them. Returns what ran and why, for the report."""
    if not any(s.kind == 'fast' for s in counter.specs):
        return {}
    failed = [f.name for f in flags if not f.ok]
    if protocol.escalate:
        reason = 'asked for (--escalate)'
    elif failed:
        reason = 'sanity checks flagged the model: ' + '; '.join(failed)
    else:
        why = 'no sanity check flagged the model' if protocol.sanity else 'the sanity checks were skipped (--no-sanity)'
        return {'ran': False, 'attacks': list(ESCALATION), 'reason': why}
    if not autoattack_available():
        return {'ran': False, 'attacks': list(ESCALATION), 'reason': f"{reason}; not run: needs the 'pyautoattack' "
                f'package (pip install pyautoattack), so fast-worst-case is an upper bound'}
    bar = EvalProgress(progress, -(-len(eval_set) // protocol.batch_size), f'escalating {name} (FAB-T, Square)')
    offset = 0
    try:
        for x, y in eval_set.loader(protocol.batch_size):
            counter.escalate(x.to(device), y.to(device), offset)
            offset += x.shape[0]
            bar.batch_done()
    finally:
        bar.close()
    return {'ran': True, 'attacks': list(ESCALATION), 'reason': reason}


def _sanity_flags(pixel_model: PixelModel, counter: RobustCounter, protocol: Protocol,
                  xs: Optional[torch.Tensor], ys: Optional[torch.Tensor], positions: List[int],
                  amp: Optional[torch.dtype]) -> List[SanityFlag]:
    """Accuracy not rising with eps, no zero gradients, and the attack checks on correctly classified images;
    with ``fast-worst-case``, a black-box attack on the sample's white-box survivors."""
    threats, accuracy = protocol.threats, counter.accuracy()
    flags = [check_monotone_in_eps({t.eps: accuracy[t.label] for t in threats}, counter.total),
             check_zero_gradients({f'{a}@{l}': v for l, d in counter.zero_grad_fracs().items() for a, v in d.items()})]
    if xs is not None:
        threat = threats[0] if threats[0].eps else threats[-1]
        steps = next((s.steps for s in counter.specs if s.kind == 'pgd'), 10)
        flags += run_attack_checks(pixel_model, xs, ys, threat, steps, seed=protocol.seed, amp_dtype=amp)
        if any(s.kind == 'fast' for s in counter.specs):
            survived = counter.per_example[threat.label][WORST_CASE]
            flags.append(check_black_box(pixel_model, xs, ys, torch.tensor([bool(survived[i]) for i in positions]),
                                         threat, seed=protocol.seed))
    return flags
