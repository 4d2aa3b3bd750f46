"""What ``convert_to_normfree`` did to a model, as data and as text."""
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ['BlockReport', 'ConversionReport']


@dataclass
class BlockReport:
    """One residual block rescaled as ``out = alpha * branch(beta * x) + shortcut``."""
    name: str
    source_type: str
    transition: bool  # projection shortcut: the expected variance is reset after this block
    alpha: float
    beta: float
    expected_var: float  # of the block input, as tracked through the stage
    branch_convs: List[str]
    last_conv: Optional[str]  # its gain starts at zero when zero_init_last
    shortcut: str  # 'identity' or the projection's module names
    # how alpha / beta are applied: hooks on the block's own modules (the block keeps its class and forward),
    # or a rewrite of the forward with torch.fx (the block becomes a GraphModule) where hooks cannot be exact
    scaled_by: str = 'hooks'
    beta_on: List[str] = field(default_factory=list)  # modules whose input is multiplied by beta
    alpha_on: Optional[str] = None  # module whose output is multiplied by alpha
    rewrite_reason: Optional[str] = None

    @property
    def rewritten(self) -> bool:
        return self.scaled_by == 'rewrite'


@dataclass
class ConversionReport:
    """Structured account of a conversion: what changed, what was kept on purpose, what was left and why."""
    model_type: str
    init: str
    alpha: float
    activation: str
    gamma: float
    unwrapped: Optional[str] = None
    convs: List[str] = field(default_factory=list)
    norms_removed: List[Tuple[str, str]] = field(default_factory=list)
    blocks: List[BlockReport] = field(default_factory=list)
    kept: List[Tuple[str, str]] = field(default_factory=list)  # by design, e.g. attention modules
    unchanged: List[Tuple[str, str]] = field(default_factory=list)  # not converted, with the reason
    # modules with convolutions whose residual structure could not be traced or found: no alpha / beta scaling
    unscaled: List[Tuple[str, str]] = field(default_factory=list)
    # left bit-identical: 'already normalizer-free' (NF blocks, weight-standardised convs) or 'no normalization to
    # remove' (convs outside residual blocks with no normalizer after them, e.g. a ViT patch embedding)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.convs or self.norms_removed or self.blocks)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """Human-readable report."""
        lines = [f'normalizer-free conversion of {self.model_type} (init={self.init}, alpha={self.alpha}, '
                 f'activation={self.activation}, gamma={self.gamma:.4f})']
        if self.unwrapped:
            lines.append(f'  unwrapped {self.unwrapped}: the converted module is returned without the wrapper')
        if not self.changed:
            lines.append('  nothing to convert: no normalization layer to remove; returned unchanged')
        lines.append(f'  convolutions -> scaled weight-standardised: {len(self.convs)}')
        lines.append(f'  normalization layers removed: {len(self.norms_removed)}'
                     + (f' ({_count_types(self.norms_removed)})' if self.norms_removed else ''))
        n_transition = sum(b.transition for b in self.blocks)
        lines.append(f'  residual blocks rescaled: {len(self.blocks)} ({n_transition} transition)')
        if not self.blocks and self.changed:
            lines.append('  no residual blocks found: generic conversion, no alpha/beta signal-propagation scaling')
        for block in self.blocks:
            kind = 'transition' if block.transition else 'identity'
            how = (f'REWRITTEN ({block.rewrite_reason})' if block.rewritten else
                   f'beta on {", ".join(block.beta_on)}, alpha on {block.alpha_on}')
            lines.append(f'    {block.name:<24} {block.source_type:<16} {kind:<10} beta={block.beta:.4f} '
                         f'expected_var={block.expected_var:.3f}  {how}')
        for label, items in (('UNSCALED', self.unscaled), ('kept', self.kept), ('skipped', self.skipped),
                             ('UNCHANGED', self.unchanged)):
            lines += [f'  {label} {name}: {why}' for name, why in items]
        return '\n'.join(lines + [f'  note: {note}' for note in self.notes])


def _count_types(items: List[Tuple[str, str]]) -> str:
    return ', '.join(f'{n} {t}' for t, n in sorted(Counter(t for _, t in items).items()))
