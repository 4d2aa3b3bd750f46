"""The one evaluation loop: attack a batch with named attacks at given radii, and count what survives.

``evaluate()``, the ``train`` command's per-epoch and final evaluation and ``timm-train``'s robust validation
all go through :class:`RobustCounter`, so every robust number the package prints is counted the same way:

* an example counts as robust under an attack when it is clean-correct and still correct after the attack;
* the worst case (``worst-case``) counts the examples that survive every attack at that radius;
* with ``cascade=True`` each attack runs only on the examples that survived the previous ones (AutoAttack's
  protocol): the worst case is identical, per-attack accuracies are not measured;
* inside each attack, fooled examples leave the attack's loop (the active set, see ``Attack``).

Attacks get the whole batch and a mask of the rows to attack (see ``Attack.__call__``: each row's outcome is
the same alone, in a cascade or in a full run). Under DDP, ``reduce()`` sums the counts across ranks.
"""
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from ..attacks import FAST_STAGES, AttackSpec, ThreatModel, build_attack
from ..attacks.base import AttackResult, check_inputs, check_labels
from ..pixels import PixelModel, to_float_pixels
from .eval_set import EvalSet
from .robust_report import WORST_CASE

__all__ = ['correct_per_image', 'RobustCounter', 'EvalProgress', 'WORST_CASE', 'PROGRESS_INTERVAL_S', 'COST_KEYS']

PROGRESS_INTERVAL_S = 10.0  # at most one progress line per this many seconds when bars are off
COST_KEYS = ('forward', 'backward', 'seconds')  # per attack: images through the model each way, wall time


class EvalProgress:
    """Signs of life for evaluations that can take minutes: a bar over batches, or lines, or nothing.

    Args:
        mode: ``'bar'`` (tqdm on stderr, the current attack in its postfix), ``'lines'`` (a line on stderr when
            an attack finishes a batch, at most one per ``interval`` seconds, so short evaluations stay quiet),
            ``'off'``; ``'auto'`` / True: a bar on a terminal, else lines; False: off.
        total: Number of batches.
        desc: What is evaluated (shown in the bar or at the start of each line).
    """

    def __init__(self, mode: Union[bool, str], total: Optional[int], desc: str, interval: Optional[float] = None,
                 stream: Any = None):
        stream = stream or sys.stderr
        interval = PROGRESS_INTERVAL_S if interval is None else interval
        if mode is True or mode == 'auto':
            mode = 'bar' if getattr(stream, 'isatty', lambda: False)() else 'lines'
        elif mode is False or mode is None:
            mode = 'off'
        if mode not in ('bar', 'lines', 'off'):
            raise ValueError(f"Unknown progress mode {mode!r}; accepted: 'auto', 'bar', 'lines', 'off'.")
        self.mode, self.total, self.desc, self.interval, self.stream = mode, total, desc, interval, stream
        self.start = self.last = time.time()
        self.batch = 0
        self.printed = False
        self._bar = None
        if mode == 'bar':
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, unit='batch', leave=False, file=stream, dynamic_ncols=True)
            except ImportError:
                self.mode = 'lines'

    def attack_started(self, attack: str, eps_label: str, n_attacked: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f'{attack} @ {eps_label} on {n_attacked}', refresh=True)

    def attack_done(self, attack: str, eps_label: str, robust: int, seen: int) -> None:
        now = time.time()
        if self.mode == 'lines' and now - self.last >= self.interval:
            where = f'batch {self.batch + 1}/{self.total}' if self.total else f'batch {self.batch + 1}'
            print(f'[{self.desc}] {where}: {attack} @ {eps_label} done, {robust}/{seen} robust so far, '
                  f'{now - self.start:.0f} s', file=self.stream, flush=True)
            self.last, self.printed = now, True

    def batch_done(self) -> None:
        self.batch += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.printed:
            print(f'[{self.desc}] done: {self.batch} batches in {time.time() - self.start:.0f} s', file=self.stream,
                  flush=True)


class RobustCounter:
    """Counts clean and robust examples batch by batch, for several attacks at several radii.

    Args:
        model: The classifier in pixel space (a ``PixelModel``).
        specs: Parsed attacks (``parse_attack``); ``clean`` is counted anyway and skipped here.
        eps: Threat models, or radii in ``norm`` (``'Linf'`` or ``'L2'``).
        cascade: Run each attack only on the survivors of the previous ones (worst case only).
        keep_per_example: Keep per-example 0/1 outcomes (for reports); off for large validations.
        attack_kwargs: Passed to every attack (``seed``, ``amp_dtype``, ``active_set``, ...).
    """

    def __init__(self, model: PixelModel, specs: Sequence[AttackSpec], eps: Sequence[Union[ThreatModel, float]],
                 norm: str = 'Linf', cascade: bool = False, keep_per_example: bool = True, **attack_kwargs: Any):
        if not isinstance(model, PixelModel):
            raise TypeError(f'RobustCounter needs a PixelModel (pixels in [0, 1]), got {type(model).__name__}.')
        self.model = model
        self.specs = [s for s in specs if s.kind != 'clean']
        self.attack_names = [s.name for s in self.specs]
        self.threats = [e if isinstance(e, ThreatModel) else ThreatModel(e, norm) for e in eps]
        self.cascade = cascade
        self.keep_per_example = keep_per_example
        self.labels = [t.label for t in self.threats]
        self.attacks = {(t.label, s.name): build_attack(s, model, threat=t, **attack_kwargs)
                        for t in self.threats for s in self.specs}
        self.total = 0
        self.clean_correct = 0
        names = self.attack_names + ([WORST_CASE] if self.attack_names else [])  # no attack: nothing robust measured
        self.correct: Dict[str, Dict[str, int]] = {label: {a: 0 for a in names} for label in self.labels}
        self.attacked: Dict[str, Dict[str, int]] = {label: {a: 0 for a in self.attack_names} for label in self.labels}
        self.zero_sums: Dict[str, Dict[str, float]] = {label: {a: 0.0 for a in self.attack_names}
                                                       for label in self.labels}
        # what each attack spent: images through the model forward and backward, and wall time
        self.cost: Dict[str, Dict[str, Dict[str, float]]] = {
            label: {a: dict.fromkeys(COST_KEYS, 0) for a in self.attack_names} for label in self.labels}
        self.per_example: Dict[str, Dict[str, List[int]]] = {
            label: {a: [] for a in ([WORST_CASE] if cascade and self.attack_names else names)} for label in self.labels}
        # fast-worst-case: eps label -> column -> stage -> attacked, broken, forward, backward, seconds
        self.ledgers: Dict[str, Dict[str, Dict[str, Dict[str, float]]]] = {label: {} for label in self.labels}
        self.per_example_clean: List[int] = []  # 0/1 per image: classified correctly without attack
        self._shown: Dict[str, int] = {}  # robust images and images attacked so far, for progress lines only
        self._seen = 0

    @torch.no_grad()
    def clean(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per example: classified correctly without attack (labels checked against the class count)."""
        logits = self.model(x)
        check_labels(y, logits.shape[1])
        return logits.argmax(dim=1) == y

    def update(self, x: torch.Tensor, y: torch.Tensor, progress: Optional[EvalProgress] = None,
               record: Optional[Dict[str, Any]] = None,
               on_attack: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """Attack one batch (pixels in [0, 1], or uint8; refused as ``check_inputs`` says) and add it to the counts
        (``run_batch``, then ``add_record``).

        Returns:
            ``{'clean': bool (N,), '<eps label>': {attack or 'worst-case': bool (N,)}}`` for this batch (in
            cascade mode only the worst case per radius).
        """
        record = self.run_batch(x, y, progress, record, on_attack)
        self.add_record(record)
        device = x.device
        out: Dict[str, Any] = {'clean': torch.tensor(record['clean'], dtype=torch.bool, device=device)}
        for label in self.labels:
            out[label] = {name: torch.tensor(values, dtype=torch.bool, device=device)
                          for name, values in self._outcomes(record, label).items()}
        return out

    def run_batch(self, x: torch.Tensor, y: torch.Tensor, progress: Optional[EvalProgress] = None,
                  record: Optional[Dict[str, Any]] = None,
                  on_attack: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """Attack one batch without adding it to the counts; returns its record (plain data: the clean and
        per-attack 0/1 outcomes per image, what each attack cost), which ``add_record`` counts.

        ``record``: this batch's record as far as it got before (an interrupted evaluation); the attacks it holds
        are not run again, their outcomes are used as recorded. ``on_attack(record)`` is called after each attack
        that ran, so that the caller can keep the progress.
        """
        x = check_inputs(x, y, model=self.model)
        record = record if record is not None else {}
        if 'clean' in record:
            if record.get('n') != x.shape[0]:
                raise ValueError(f"A recorded batch holds {record.get('n')} images, this one {x.shape[0]}: the "
                                 f'record belongs to another evaluation.')
            clean = torch.tensor(record['clean'], dtype=torch.bool, device=x.device)
        else:
            clean = self.clean(x, y)
            record.update(n=x.shape[0], clean=clean.int().tolist(), attacks={})
        done_attacks = record.setdefault('attacks', {})
        for label in self.labels:
            survived = clean.clone()
            results: Dict[str, Any] = {}
            done = done_attacks.setdefault(label, {})
            for spec in self.specs:
                mask = survived if self.cascade else clean
                n_attacked = int(mask.sum())
                entry = done.get(spec.name)
                if entry is None:
                    if progress is not None:
                        progress.attack_started(spec.name, label, n_attacked)
                    attack = self.attacks[(label, spec.name)]
                    ledger = _copy_ledger(getattr(attack, 'ledger', {}))
                    if spec.kind == 'fast' and not self.cascade:  # an apgd-ce column is its first stage, same rows
                        result = attack(x, y, mask=mask, first=results.get(FAST_STAGES[0]))
                    else:
                        result = attack(x, y, mask=mask)  # empty mask: all False, no model work
                    entry = done[spec.name] = {
                        'correct': result.correct.int().tolist(), 'attacked': n_attacked,
                        'zero_sum': result.zero_grad_frac * n_attacked,
                        'cost': {'forward': result.forward_passes, 'backward': result.backward_passes,
                                 'seconds': result.seconds},
                        'ledger': _ledger_delta(ledger, getattr(attack, 'ledger', {}))}
                    results[spec.name] = result
                    if on_attack is not None:
                        on_attack(record)
                else:
                    results[spec.name] = _recorded_result(x, entry)
                survived &= results[spec.name].correct  # rows outside the mask count as not robust
                if progress is not None:
                    progress.attack_done(spec.name, label, self._shown.get(label, 0) + int(survived.sum()),
                                         self._seen + x.shape[0])
            self._shown[label] = self._shown.get(label, 0) + int(survived.sum())
        self._seen += x.shape[0]
        if progress is not None:
            progress.batch_done()
        return record

    def add_record(self, record: Dict[str, Any]) -> None:
        """Count one batch's record (``run_batch``): the batches of an evaluation in their order."""
        self.total += record['n']
        self.clean_correct += sum(record['clean'])
        if self.keep_per_example:
            self.per_example_clean += record['clean']
        for label in self.labels:
            done = record['attacks'][label]
            for name in self.attack_names:
                entry = done[name]
                self.zero_sums[label][name] += entry['zero_sum']
                self.attacked[label][name] += entry['attacked']
                for key in COST_KEYS:
                    self.cost[label][name][key] += entry['cost'][key]
                _add_ledger(self.ledgers[label].setdefault(name, {}), entry['ledger'])
            for name, values in self._outcomes(record, label).items():
                self.correct[label][name] += sum(values)
                if self.keep_per_example:
                    self.per_example[label][name] += list(values)

    def _outcomes(self, record: Dict[str, Any], label: str) -> Dict[str, List[int]]:
        """Per attack (not in a cascade) and for the worst case, the batch's 0/1 outcomes at ``label``."""
        done = record['attacks'][label]
        survived = list(record['clean'])
        out: Dict[str, List[int]] = {}
        for name in self.attack_names:
            survived = [a & b for a, b in zip(survived, done[name]['correct'])]
            if not self.cascade:
                out[name] = list(done[name]['correct'])
        if self.attack_names:
            out[WORST_CASE] = survived
        return out

    def escalate(self, x: torch.Tensor, y: torch.Tensor, offset: int) -> None:
        """Second pass of an evaluation: AutoAttack's FAB-T and Square on the images of this batch (the
        evaluation's images ``offset`` on, as ``update`` saw them) that survived each ``fast-worst-case`` column;
        what they break leaves that column's and the worst case's counts."""
        self.add_escalation(offset, self.escalate_batch(x, y, offset))

    def escalate_batch(self, x: torch.Tensor, y: torch.Tensor, offset: int) -> Dict[str, Any]:
        """``escalate`` without changing the counts: per eps label and ``fast-worst-case`` column, the batch rows
        FAB-T and Square broke, and what they cost (``add_escalation`` applies it)."""
        x = check_inputs(x, y, model=self.model)
        n = x.shape[0]
        record: Dict[str, Any] = {'n': n}
        for label in self.labels:
            for spec in (s for s in self.specs if s.kind == 'fast'):
                key = spec.name if spec.name in self.per_example[label] else WORST_CASE  # cascade: worst case only
                mask = torch.tensor(self.per_example[label][key][offset:offset + n], dtype=torch.bool, device=x.device)
                if not bool(mask.any()):
                    continue
                attack = self.attacks[(label, spec.name)]
                ledger = _copy_ledger(attack.ledger)
                result = attack.escalate(x, y, mask)
                record.setdefault(label, {})[spec.name] = {
                    'broken': (mask & ~result.correct).nonzero()[:, 0].tolist(),
                    'cost': {'forward': result.forward_passes, 'backward': result.backward_passes,
                             'seconds': result.seconds},
                    'ledger': _ledger_delta(ledger, attack.ledger)}
        return record

    def add_escalation(self, offset: int, record: Dict[str, Any]) -> None:
        """Apply one batch's escalation record (``escalate_batch``) to the counts."""
        for label in self.labels:
            for name, entry in record.get(label, {}).items():
                key = name if name in self.per_example[label] else WORST_CASE
                for k in COST_KEYS:
                    self.cost[label][name][k] += entry['cost'][k]
                _add_ledger(self.ledgers[label].setdefault(name, {}), entry['ledger'])
                for i in entry['broken']:
                    for column in {key, WORST_CASE}:
                        if self.per_example[label][column][offset + i]:
                            self.per_example[label][column][offset + i] = 0
                            self.correct[label][column] -= 1

    def stages(self) -> Dict[str, Dict[str, Dict[str, Dict[str, float]]]]:
        """eps label -> ``fast-worst-case`` column -> stage -> attacked, broken, forward, backward, seconds."""
        return {label: {s.name: self.ledgers[label].get(s.name, {}) for s in self.specs if s.kind == 'fast'}
                for label in self.labels}

    def reduce(self, device: Union[str, torch.device] = 'cpu') -> None:
        """Sum the counts over the ranks of an initialised process group (a no-op otherwise)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        tables = ((self.correct, int), (self.attacked, int), (self.zero_sums, float))
        slots = [(table, label, name, cast) for table, cast in tables for label in self.labels for name in table[label]]
        slots += [(self.cost[label], name, key, float if key == 'seconds' else int) for label in self.labels
                  for name in self.attack_names for key in COST_KEYS]
        values = [self.total, self.clean_correct] + [table[label][name] for table, label, name, _ in slots]
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        v = t.tolist()
        self.total, self.clean_correct = int(v[0]), int(v[1])
        for (table, label, name, cast), value in zip(slots, v[2:]):
            table[label][name] = cast(value)
        self.per_example = {}  # per-example outcomes stay on their rank

    def accuracy(self) -> Dict[str, Dict[str, Optional[float]]]:
        """eps label -> attack (and ``worst-case``) -> accuracy; ``None`` where a cascade did not measure it."""
        if self.total == 0:
            raise ValueError('No examples were evaluated.')
        return {label: {name: (None if self.cascade and name != WORST_CASE else count / self.total)
                        for name, count in counts.items()} for label, counts in self.correct.items()}

    def zero_grad_fracs(self) -> Dict[str, Dict[str, float]]:
        """Fraction of exactly-zero input-gradient entries per attack, over the examples it attacked."""
        return {label: {a: s / max(self.attacked[label][a], 1) for a, s in sums.items()}
                for label, sums in self.zero_sums.items()}


@torch.inference_mode()
def correct_per_image(model: torch.nn.Module, eval_set: EvalSet, batch_size: int, device: torch.device,
                      expect_classes: Optional[int] = None, progress: Optional[EvalProgress] = None) -> torch.Tensor:
    """The one clean-accuracy loop: per image of ``eval_set``, whether ``model``'s argmax (over the set's
    ``class_subset`` when it has one) is the label. ``expect_classes``: refuse logits of another width."""
    mask = None
    if eval_set.class_subset is not None:
        mask = torch.zeros(expect_classes or max(eval_set.class_subset) + 1, dtype=torch.bool, device=device)
        mask[list(eval_set.class_subset)] = True
    correct: List[torch.Tensor] = []
    for x, y in eval_set.loader(batch_size):
        logits = model(to_float_pixels(x).to(device))
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or (expect_classes and
                                                                         logits.shape[1] != expect_classes):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f'model must return (batch, {expect_classes or "classes"}) logits, got {shape}')
        if mask is not None:
            logits = logits.masked_fill(~mask, float('-inf'))
        correct.append((logits.argmax(dim=1) == y.to(device)).cpu())
        if progress is not None:
            progress.batch_done()
    return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)


def _recorded_result(x: torch.Tensor, entry: Dict[str, Any]) -> AttackResult:
    """An attack's recorded outcome on a batch, as an ``AttackResult`` (no adversarial examples: the inputs
    stand in), so that a later attack reusing it (``fast-worst-case``'s first stage) sees what the attack did."""
    correct = torch.tensor(entry['correct'], dtype=torch.bool, device=x.device)
    cost = entry['cost']
    return AttackResult(x_adv=x, logits=x.new_zeros((x.shape[0], 0)), correct=correct,
                        zero_grad_frac=entry['zero_sum'] / max(entry['attacked'], 1),
                        forward_passes=cost['forward'], backward_passes=cost['backward'], seconds=cost['seconds'])


def _copy_ledger(ledger: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    return {stage: dict(values) for stage, values in ledger.items()}


def _ledger_delta(before: Dict[str, Dict[str, float]], after: Dict[str, Dict[str, float]]
                  ) -> Dict[str, Dict[str, float]]:
    """What one call added to an attack's per-stage ledger."""
    return {stage: {k: v - before.get(stage, {}).get(k, 0) for k, v in values.items()}
            for stage, values in after.items()}


def _add_ledger(total: Dict[str, Dict[str, float]], delta: Dict[str, Dict[str, float]]) -> None:
    for stage, values in delta.items():
        entry = total.setdefault(stage, {})
        for k, v in values.items():
            entry[k] = entry.get(k, 0) + v
