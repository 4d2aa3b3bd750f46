"""``RobustReport``: robust-evaluation results as JSON, a Markdown table and an accuracy-vs-eps plot."""
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..attacks.threat import ThreatModel
from ..files import atomic_json, atomic_write

__all__ = ['RobustReport', 'WORST_CASE', 'save_figure']

WORST_CASE = 'worst-case'
_STRONG = ('apgd', 'autoattack', 'fast-worst-case')


@dataclass
class RobustReport:
    """Accuracy per attack and eps, per-example worst case, sanity flags, and how the examples were chosen and
    which they were (``data``: their fingerprint)."""
    model: str
    dataset: str
    norm: str
    eps: List[float]
    attacks: List[str]
    n_examples: int
    subset: Dict[str, Any]
    clean_accuracy: float
    accuracy: Dict[str, Dict[str, float]]  # eps label -> attack -> accuracy (incl. 'worst-case')
    zero_grad_frac: Dict[str, Dict[str, float]]
    sanity: List[Dict[str, Any]] = field(default_factory=list)
    per_example: Dict[str, Dict[str, List[int]]] = field(default_factory=dict)
    analysis: Dict[str, Any] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=dict)
    # which images were evaluated: n_images and images_sha256 (timm_nofrost.data.sources.image_fingerprint),
    # comparable with the ``data`` entry of a training run's results.json
    data: Dict[str, Any] = field(default_factory=dict)
    # cascade: each attack ran only on the survivors of the previous ones; per-attack accuracies are None
    cascade: bool = False
    # eps label -> attack -> images through the model forward / backward (input gradients) and wall seconds
    cost: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)
    # fast-worst-case: eps label -> column -> stage -> attacked, broken, forward, backward, seconds; and whether
    # AutoAttack's FAB-T and Square ran on its survivors, and why
    stages: Dict[str, Dict[str, Dict[str, Dict[str, float]]]] = field(default_factory=dict)
    escalation: Dict[str, Any] = field(default_factory=dict)
    sanity_cost: Dict[str, float] = field(default_factory=dict)  # forward, backward, seconds of the sanity checks
    # what was evaluated (model weights, images, protocol, versions: ``evaluation_identity``): an interrupted
    # evaluation continues, and a finished one is reused, only under the same identity
    identity: Dict[str, Any] = field(default_factory=dict)
    run: str = ''  # which run these weights come from (a study's 'nofrost seed 0'), when the caller says

    @property
    def eps_labels(self) -> List[str]:
        return [ThreatModel(e, self.norm).label for e in self.eps]

    @property
    def flags_failed(self) -> List[Dict[str, Any]]:
        return [f for f in self.sanity if not f['ok']]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def save_json(self, path: Union[str, Path]) -> Path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return atomic_json(path, self.to_dict(), sort_keys=False)

    def to_markdown(self) -> str:
        labels = self.eps_labels
        split = self.settings.get('split')
        lines = [f'## Robust accuracy of {self.model}' + (f' ({self.run})' if self.run else '') +
                 f' on {self.dataset}' + (f', {split} split' if split else ''), '',
                 f'{self.n_examples} examples ({self.subset.get("kind")}), {self.norm} threat model, '
                 f'clean accuracy {self.clean_accuracy:.2%}.', '']
        if not self.attacks:
            return '\n'.join(lines + ['No attack ran: robust accuracy not measured.']) + '\n'
        lines += ['| attack | ' + ' | '.join(f'eps {e}' for e in labels) + ' |', '|---|' + '---:|' * len(labels)]
        for attack in self.attacks + [WORST_CASE]:
            values = [self.accuracy[e].get(attack, '-') for e in labels]
            cells = ['not measured (cascade)' if v is None else v if v == '-' else f'{v:.2%}' for v in values]
            name = f'**{attack}** (per example, all attacks)' if attack == WORST_CASE else \
                (f'{attack} (ran on the survivors of the attacks above)' if self.cascade else attack)
            lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
        if self.escalation:
            e = self.escalation
            lines += ['', '### fast-worst-case', '',
                      "APGD-CE, then targeted APGD on linearly ranked targets on its survivors; AutoAttack's "
                      f"{' and '.join(e['attacks'])} {'ran' if e['ran'] else 'did not run'} on what survived: "
                      f"{e['reason']}. This is not AutoAttack: quote it as the fast worst case.", '',
                      '| eps | stage | attacked | broken | forward | backward | seconds |',
                      '|---|---|---:|---:|---:|---:|---:|']
            lines += [f'| {label} | {stage} | {c["attacked"]} | {c["broken"]} | {c["forward"]:,} | {c["backward"]:,} '
                      f'| {c["seconds"]:.1f} |' for label, columns in self.stages.items() for ledger in columns.values()
                      for stage, c in ledger.items()]
        if self.cost:
            lines += ['', '### Cost', '', 'Images sent through the model per attack (forward; backward: with input '
                      'gradients), comparable across machines, and the wall time on this one.', '',
                      '| eps | attack | forward | backward | seconds |', '|---|---|---:|---:|---:|']
            lines += [f'| {label} | {attack} | {c["forward"]:,} | {c["backward"]:,} | {c["seconds"]:.1f} |'
                      for label, by_attack in self.cost.items() for attack, c in by_attack.items()]
            if self.sanity_cost:
                c = self.sanity_cost
                lines.append(f'| | sanity checks | {c["forward"]:,} | {c["backward"]:,} | {c["seconds"]:.1f} |')
        if not any(a.startswith(_STRONG) for a in self.attacks):
            lines += ['', '> Only weak attacks were run: PGD alone overstates robustness. Add `apgd-ce`, `apgd-t` '
                          'or `autoattack` before quoting these numbers.']
        if self.sanity:
            lines += ['', '### Sanity checks', '']
            lines += [f'- {"ok" if f["ok"] else "**FLAG**"} {f["name"]}: {f["value"]}. {f["message"]}'
                      for f in self.sanity]
        if self.analysis:
            lines += ['', '### Decision margin and local smoothness', '']
            lines += [f'- {k}: {v:.4g}' for k, v in self.analysis.items() if isinstance(v, (int, float))]
        return '\n'.join(lines) + '\n'

    def plot(self, path: Union[str, Path]) -> Path:
        """Accuracy vs eps, one line per attack plus the per-example worst case (needs matplotlib)."""
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install 'timm-nofrost[eval]'") from None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        xs = [0.0] + list(self.eps)
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for attack in self.attacks + [WORST_CASE]:
            values = [self.accuracy[e].get(attack) for e in self.eps_labels]
            if all(v is None for v in values):  # not measured in a cascade
                continue
            ys = [self.clean_accuracy] + [float('nan') if v is None else v for v in values]
            ax.plot(xs, [100 * v for v in ys], marker='o', linewidth=2.5 if attack == WORST_CASE else 1.5,
                    linestyle='-' if attack == WORST_CASE else '--', label=attack)
        ax.set_xticks(xs, ['0'] + self.eps_labels)
        ax.set(xlabel=f'eps ({self.norm})', ylabel='accuracy (%)', ylim=(0, 100),
               title=f'{self.model}: robust accuracy, {self.n_examples} examples')
        return save_figure(plt, fig, ax, Path(path))


def save_figure(plt: Any, fig: Any, ax: Any, path: Path, legend_size: Optional[float] = None) -> Path:
    """Grid, legend, tight layout, write ``path`` and close the figure (the report's and the study's plots)."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix.lstrip('.') or 'png'))
    plt.close(fig)
    return Path(path)
