"""``evaluate(model, eval_set, protocol)``: robust accuracy of a model under a protocol's attacks and threat
models on an evaluation set, with sanity checks; resumable (``out`` / ``journal``) and, in a process group
(torchrun), spread over its ranks with per-image outcomes identical to one process."""
import hashlib
import inspect
import json
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
import torch.distributed as dist
import torch.nn as nn

from ..attacks import ESCALATION, autoattack_available
from ..attacks.base import check_inputs, count_passes
from ..checkpoint import content_checksum
from ..files import check_output_file
from ..pixels import PixelModel, unwrap_model
from ..pixels import amp_dtype as resolve_amp_dtype
from ..settings import flag_of, iter_settings
from ..version import __version__
from .engine import WORST_CASE, EvalProgress, RobustCounter
from .eval_set import EvalSet, build_eval_set
from .journal import EvalJournal, JournalError, differences, progress_folder
from .protocol import Protocol
from .robust_report import RobustReport
from .sanity import SanityFlag, check_black_box, check_monotone_in_eps, check_zero_gradients, run_attack_checks

__all__ = ['evaluate', 'evaluation_identity']

_PROTOCOL_FIELDS = frozenset(f.name for f in fields(Protocol))
_EVAL_SET_ARGS = frozenset(inspect.signature(build_eval_set).parameters) - {'data', 'model', 'seed'}


def evaluate(model: nn.Module, eval_set: Any, protocol: Optional[Protocol] = None, *,
             device: Union[str, torch.device] = 'cpu', amp_dtype: Optional[Union[torch.dtype, str]] = None,
             progress: Union[bool, str] = 'auto', model_name: Optional[str] = None,
             run: str = '', out: Optional[Union[str, Path]] = None, journal: Optional[Union[str, Path]] = None,
             overwrite: bool = False, shard: bool = False, **settings: Any) -> RobustReport:
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
        model_name: The model as built, for the report (default: its timm architecture, else its class).
        run: Which run the weights come from (a study's ``'nofrost seed 0'``), for the report.
        out: Write the JSON report here, last and atomically; meanwhile the progress is kept in
            ``OUT.progress/`` (``journal``) and a killed evaluation, run again, continues where it stopped. A
            finished report of the same evaluation in ``out`` is returned without attacking anything.
        journal: Keep the progress in this folder (default with ``out``: ``OUT.progress``); without ``out`` the
            folder stays when done, holding the finished report, for the caller to remove once it has used it.
        overwrite: Discard a report or progress of another evaluation in ``out`` / ``journal`` (without it, a
            ``JournalError`` names what differs).

        shard: Split the batches over the ranks of the initialised process group (torchrun); every rank must
            call ``evaluate`` and returns the same report (per-image outcomes identical to one process); only the
            first rank writes ``out``. Off: this process evaluates every image, whatever the other ranks do.
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
    return _resumable(pixel_model, eval_set, protocol, device, amp, progress, name, run, out, journal, overwrite,
                      shard)


def _resumable(pixel_model: PixelModel, eval_set: EvalSet, protocol: Protocol, device: torch.device,
               amp: Optional[torch.dtype], progress: Union[bool, str], name: str, run: str,
               out: Optional[Union[str, Path]], journal: Optional[Union[str, Path]], overwrite: bool,
               shard: bool) -> RobustReport:
    """``_measure`` with its progress in the journal: a finished report of the same evaluation returned as it
    is, an interrupted one continued, the report written last (by the first rank)."""
    rank, world = _rank_world() if shard else (0, 1)
    n_batches = -(-len(eval_set) // protocol.batch_size)
    identity = evaluation_identity(pixel_model.model, eval_set, protocol, device, amp, name)
    if out is not None:
        out = Path(out)
        check_output_file(out, 'Report file')
        finished = _finished_report(out, identity, overwrite) if rank == 0 else None
        if _agree(finished is not None, world):
            return finished if rank == 0 else RobustReport(**json.loads(Path(out).read_text()))
        journal = journal or progress_folder(out)
    log = _Journal(journal, identity, n_batches, overwrite, rank, world)
    try:
        done = log.journal.report()
        if done is not None:  # finished before the caller used it (killed in between): that report
            report = RobustReport(**done)
        else:
            report = _measure(pixel_model, eval_set, protocol, device, amp, progress, name, log, rank, world,
                              shown=f'{run} ({name})' if run else name)
            report.identity, report.run = identity, run
            if rank == 0:
                log.journal.save_report(report.to_dict())
        if out is not None and rank == 0:
            report.save_json(out)
            log.journal.remove()
    finally:
        log.release()
    return report


def _measure(pixel_model: PixelModel, eval_set: EvalSet, protocol: Protocol, device: torch.device,
             amp: Optional[torch.dtype], progress: Union[bool, str], name: str, log: '_Journal', rank: int,
             world: int, shown: str) -> RobustReport:
    """The evaluation itself: every batch through the engine (this rank's share), then the sanity checks (first
    rank), then the escalation if one is due (shared again). ``shown``: what the progress lines call it."""
    counter = RobustCounter(pixel_model, protocol.specs, protocol.threats, cascade=protocol.cascade,
                            seed=protocol.seed, amp_dtype=amp, active_set=protocol.active_set,
                            early_stop=protocol.early_stop)
    records = _attack_all(counter, eval_set, protocol, device, progress, shown, log, rank, world)
    for index in range(len(records)):
        counter.add_record(records[index])
    if counter.total == 0:
        raise ValueError('The dataset yielded no examples.')
    flags, sanity_cost, analysis = _checks(pixel_model, counter, eval_set, protocol, device, amp, log, rank, world)
    escalation = _escalate(counter, eval_set, protocol, flags, device, progress, shown, log, rank, world)
    return RobustReport(
        model=name, dataset=eval_set.source, norm=protocol.norm, eps=[t.eps for t in protocol.threats],
        attacks=counter.attack_names, n_examples=counter.total, subset=dict(eval_set.subset),
        clean_accuracy=counter.clean_correct / counter.total, accuracy=counter.accuracy(),
        zero_grad_frac=counter.zero_grad_fracs(), sanity=[f.to_dict() for f in flags], cost=counter.cost,
        per_example=counter.per_example, cascade=protocol.cascade, stages=counter.stages(), escalation=escalation,
        sanity_cost=sanity_cost, analysis=analysis,
        settings=dict(seed=protocol.seed, batch_size=protocol.batch_size, device=str(device), norm=protocol.norm,
                      cascade=protocol.cascade, active_set=protocol.active_set, early_stop=protocol.early_stop,
                      escalate=protocol.escalate, split=eval_set.split,
                      amp_dtype=str(amp) if amp else None, timm=timm.__version__, torch=torch.__version__),
        data=eval_set.fingerprint())


def evaluation_identity(model: nn.Module, eval_set: EvalSet, protocol: Protocol, device: torch.device,
                        amp: Optional[torch.dtype], name: str) -> Dict[str, Any]:
    """What makes two evaluations the same one, as plain data: the model's weights, the images (their
    fingerprint, the subset, the first batch's pixels), every protocol setting by its flag, the device type,
    autocast and the versions. An interrupted evaluation continues only under the same identity."""
    subset = {k: v for k, v in eval_set.subset.items() if k != 'indices'}
    if 'indices' in eval_set.subset:
        subset['indices_sha256'] = hashlib.sha256(json.dumps(eval_set.subset['indices']).encode()).hexdigest()
    first = next(iter(eval_set.loader(protocol.batch_size)), None)
    pixels = hashlib.sha256(first[0].contiguous().numpy().tobytes()).hexdigest() if first is not None else None
    values = asdict(protocol)
    return {
        'model': name, 'model class': type(model).__name__, 'model weights': content_checksum(model.state_dict()),
        'data': {'source': eval_set.source, 'split': eval_set.split, 'subset': subset, **eval_set.fingerprint(),
                 'first_batch_sha256': pixels,
                 'mean': None if eval_set.mean is None else [float(v) for v in eval_set.mean],
                 'std': None if eval_set.std is None else [float(v) for v in eval_set.std]},
        **{flag_of(f): _plain(values[f.name]) for f in iter_settings(Protocol)},
        'run': {'device': device.type, 'amp': str(amp) if amp else None, 'torch': torch.__version__,
                'timm': timm.__version__, 'timm_nofrost': __version__},
    }


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _finished_report(out: Path, identity: Dict[str, Any], overwrite: bool) -> Optional[RobustReport]:
    """The report already in ``out`` when it is this evaluation's; another one is refused, or removed with
    ``overwrite`` before anything runs (it must not look current while this evaluation runs)."""
    if not out.exists():
        return None
    try:
        recorded = json.loads(out.read_text())
        same = isinstance(recorded, dict) and json.loads(json.dumps(identity)) == recorded.get('identity')
    except (OSError, UnicodeDecodeError, ValueError):
        recorded, same = None, False
    if same:
        print(f'{out} holds this evaluation, finished: reusing it (remove it to evaluate again).', file=sys.stderr)
        return RobustReport(**recorded)
    if not overwrite:
        found = differences(recorded.get('identity') or {}, json.loads(json.dumps(identity))) \
            if isinstance(recorded, dict) and recorded.get('identity') else ['not a report of this evaluation']
        raise JournalError(f'{out} holds another report ({"; ".join(found[:3])}): pass --overwrite to replace it, '
                           f'or choose another output file.')
    out.unlink()
    return None


# -- the passes --------------------------------------------------------------------------------------------
def _attack_all(counter: RobustCounter, eval_set: EvalSet, protocol: Protocol, device: torch.device,
                progress: Union[bool, str], name: str, log: '_Journal', rank: int, world: int
                ) -> List[Dict[str, Any]]:
    """Every batch's record, in order: this rank's batches attacked (or read back from the journal, an
    interrupted batch continued after its last recorded attack), the others' gathered from their ranks."""
    wanted = [(label, s.name) for label in counter.labels for s in counter.specs]
    records: Dict[int, Dict[str, Any]] = {}
    todo: List[Tuple[int, Optional[Dict[str, Any]]]] = []
    for index in log.share():
        record = log.journal.batch(index)
        if record is not None and 'clean' in record and all(n in record.get('attacks', {}).get(label, {})
                                                             for label, n in wanted):
            records[index] = record
        else:
            todo.append((index, record))
    if todo:
        bar = EvalProgress(progress, len(todo), f'evaluating {name}' + (f' (rank {rank})' if world > 1 else ''))
        try:
            loader = eval_set.loader(protocol.batch_size, batches=[index for index, _ in todo])
            for (index, partial), (x, y) in zip(todo, loader):
                def keep(record: Dict[str, Any], index: int = index) -> None:
                    log.journal.save_batch(index, record)
                records[index] = counter.run_batch(x.to(device), y.to(device), bar, partial, keep)
                if not counter.specs:  # clean only: no attack recorded it
                    keep(records[index])
        finally:
            bar.close()
    records = log.gather(records)
    return [records[index] for index in range(log.n_batches)]


def _checks(pixel_model: PixelModel, counter: RobustCounter, eval_set: EvalSet, protocol: Protocol,
            device: torch.device, amp: Optional[torch.dtype], log: '_Journal', rank: int, world: int
            ) -> Tuple[List[SanityFlag], Dict[str, float], Dict[str, Any]]:
    """The sanity checks and the analysis, on the first rank, on the first ``sanity_examples`` correctly
    classified images; recorded in the journal, shared with the other ranks."""
    if not (protocol.sanity or protocol.analysis):
        return [], {}, {}
    result = log.journal.sanity() if rank == 0 else None
    if rank == 0 and result is None:
        xs, ys, positions = _sanity_images(counter, eval_set, protocol, device, pixel_model)
        with count_passes(pixel_model.model) as passes:  # the checks' own cost (each check wraps the model anew)
            start = time.perf_counter()
            flags = _sanity_flags(pixel_model, counter, protocol, xs, ys, positions, amp) if protocol.sanity else []
            cost = {'forward': passes[0], 'backward': passes[1], 'seconds': time.perf_counter() - start}
        analysis: Dict[str, Any] = {}
        if protocol.analysis and xs is not None:
            from .analysis import margin_and_smoothness
            analysis = margin_and_smoothness(pixel_model, xs, ys, protocol.threats[-1].eps, protocol.norm,
                                             seed=protocol.seed)
        result = {'flags': [f.to_dict() for f in flags], 'cost': cost if protocol.sanity else {},
                  'analysis': analysis}
        log.journal.save_sanity(result)
    result = log.broadcast(result)
    return [SanityFlag(**f) for f in result['flags']], result['cost'], result['analysis']


def _sanity_images(counter: RobustCounter, eval_set: EvalSet, protocol: Protocol, device: torch.device,
                   pixel_model: PixelModel) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], List[int]]:
    """The first ``sanity_examples`` correctly classified images, as the evaluation saw them, and their positions."""
    clean = counter.per_example_clean
    positions = [i for i, ok in enumerate(clean) if ok][:protocol.sanity_examples]
    if not positions:
        return None, None, []
    items = [eval_set.dataset[i] for i in positions]
    x = torch.stack([torch.as_tensor(item[0]) for item in items]).to(device)
    y = torch.tensor([int(item[1]) for item in items], device=device)
    return check_inputs(x, y, model=pixel_model), y, positions


def _escalate(counter: RobustCounter, eval_set: EvalSet, protocol: Protocol, flags: List[SanityFlag],
              device: torch.device, progress: Union[bool, str], name: str, log: '_Journal', rank: int,
              world: int) -> Dict[str, Any]:
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
    records: Dict[int, Dict[str, Any]] = {}
    todo = []
    for index in log.share():
        record = log.journal.escalation(index)
        if record is not None:
            records[index] = record
        else:
            todo.append(index)
    bar = EvalProgress(progress, len(todo), f'escalating {name} (FAB-T, Square)')
    try:
        for index, (x, y) in zip(todo, eval_set.loader(protocol.batch_size, batches=todo)):
            records[index] = counter.escalate_batch(x.to(device), y.to(device), index * protocol.batch_size)
            log.journal.save_escalation(index, records[index])
            bar.batch_done()
    finally:
        bar.close()
    records = log.gather(records)
    for index in range(log.n_batches):
        counter.add_escalation(index * protocol.batch_size, records[index])
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


# -- the ranks and the journal -----------------------------------------------------------------------------
def _rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(value: bool, world: int) -> bool:
    """The first rank's ``value`` on every rank."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


class _Journal:
    """The evaluation's journal on every rank: opened (checked, held) by the first one, which tells the others
    whether that failed so that none waits forever; records gathered and shared across ranks."""

    def __init__(self, folder: Optional[Union[str, Path]], identity: Dict[str, Any], n_batches: int,
                 overwrite: bool, rank: int, world: int):
        from ..files import hold_folder
        self.rank, self.world, self.n_batches, self._hold = rank, world, n_batches, None
        error: Optional[str] = None
        if rank == 0:
            try:
                if folder is not None:
                    self._hold = hold_folder(folder, 'timm-nofrost eval (progress of an evaluation)')
                    self._hold.__enter__()
                self.journal = EvalJournal(folder, identity, n_batches, overwrite, writer=True)
            except (ValueError, OSError) as e:
                if world == 1:
                    self.release()
                    raise
                error = f'{type(e).__name__}: {e}'
        if world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None:
                self.release()
                raise JournalError(box[0]) if rank else JournalError(error)
            if rank:
                self.journal = EvalJournal(folder, identity, n_batches, writer=False)

    def share(self) -> range:
        """This rank's batches: batch i goes to rank i mod world size."""
        return range(self.rank, self.n_batches, self.world)

    def gather(self, records: Dict[int, Dict[str, Any]]) -> Dict[int, Dict[str, Any]]:
        """Every rank's records, on every rank."""
        if self.world == 1:
            return records
        parts: List[Any] = [None] * self.world
        dist.all_gather_object(parts, records)
        return {index: record for part in parts for index, record in part.items()}

    def broadcast(self, value: Any) -> Any:
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def release(self) -> None:
        if self._hold is not None:
            self._hold.__exit__(None, None, None)
            self._hold = None
