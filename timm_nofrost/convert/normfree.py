"""``convert_to_normfree``: rewrite a BatchNorm network into a normalizer-free one that trains.

The rewrite follows NF-ResNets (Brock et al., 2021): every normalizer is removed, convolutions become
scaled weight-standardised convolutions with the activation's gain folded into their scale, and each
residual block computes ``alpha * branch(beta * x) + shortcut`` with ``beta = 1/sqrt(expected variance)``
tracked through the network (reset after transition blocks) and a zero-initialised gain on the branch's
last conv. See ``docs/converter.md`` for the maths and the trade-offs.
"""
import math
from typing import Any, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from ..layers import WS_CONV_TYPES, is_preact_nf_block
from .layers import (
    NORM_KINDS, OTHER_NORMS, activation_gamma, convertible_conv, detect_activation, eval_mode, is_attention,
    is_container, is_std_conv, norm_classes, norm_replacement, normed_convs, to_scaled_std_conv,
)
from .conversion_report import BlockReport, ConversionReport
from .concrete import ConcreteResidual, find_residual_concrete
from .residual import ResidualInfo, attach_scales, find_residual, hook_sites, rescale_residual

__all__ = ['convert_to_normfree', 'NormFreeConversionError', 'normfree_blocks', 'INIT_MODES']

INIT_MODES = ('keep', 'fresh')
_FORCE_REWRITE = False  # tests: convert every block by rewriting its forward, as before the hooks existed
_ALREADY_NF = 'already normalizer-free'


class NormFreeConversionError(ValueError):
    """``strict=True`` conversion that would leave part of the model unconverted."""


def _unwrap(model: nn.Module) -> Tuple[nn.Module, Optional[str]]:
    wrapper = None
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            wrapper = wrapper or type(model).__name__
            model = model.module
        elif type(model).__name__ == 'OptimizedModule' and hasattr(model, '_orig_mod'):
            wrapper = wrapper or 'torch.compile (OptimizedModule)'
            model = model._orig_mod
        else:
            return model, wrapper


class _Converter:
    """One pass over the model in module order, tracking the expected variance of the residual stream."""

    def __init__(self, report: ConversionReport, norm_kinds: Tuple[str, ...], alpha: float, gamma: float,
                 zero_init_last: bool):
        self.report = report
        self.norm_kinds = norm_kinds
        self.norms = norm_classes(norm_kinds)
        self.alpha = alpha
        self.gamma = gamma
        self.zero_init_last = zero_init_last
        self.expected_var = 1.0
        self.last_convs: List[nn.Module] = []
        self.normed: Set[nn.Module] = set()  # convs followed by a normalizer to remove
        self.root: Optional[nn.Module] = None  # the model, for sample runs of blocks torch.fx cannot trace

    def convert(self, model: nn.Module) -> nn.Module:
        """Convert ``model`` in place; returned, as a model that is itself a normalizer or a conv is replaced."""
        self.root = model
        wrapped = isinstance(model, self.norms) or convertible_conv(model)
        top = nn.Sequential(model) if wrapped else model
        self.normed = normed_convs(top, self.norms)
        self.visit(top)
        return top[0] if wrapped else model

    def visit(self, module: nn.Module, prefix: str = '', in_block: bool = False) -> None:
        for name, child in list(module.named_children()):
            qual = f'{prefix}{name}'
            replacement = self.convert_layer(child, qual, in_block)
            if replacement is not None:
                setattr(module, name, replacement)
            elif is_container(child):
                self.visit(child, qual + '.', in_block)
            elif is_attention(child):
                self.visit_attention(child, qual)
            elif not in_block and self.try_block(module, name, child, qual):
                pass
            else:
                self.visit(child, qual + '.', in_block)

    def convert_layer(self, child: nn.Module, qual: str, in_block: bool) -> Optional[nn.Module]:
        if isinstance(child, self.norms):
            self.report.norms_removed.append((qual, type(child).__name__))
            return norm_replacement(child)
        if not in_block and (convertible_conv(child) or is_std_conv(child)):
            self.expected_var = 1.0  # a conv outside residual blocks re-standardises the stream
        if not in_block and isinstance(child, nn.modules.conv._ConvNd) and (is_std_conv(child)
                                                                           or child not in self.normed):
            self.report.skipped.append((qual, _ALREADY_NF if is_std_conv(child) else 'no normalization to remove'))
            return None
        if convertible_conv(child):
            self.report.convs.append(qual)
            return to_scaled_std_conv(child, self.gamma)
        if isinstance(child, OTHER_NORMS):
            self.report.unchanged.append((qual, f'{type(child).__name__} kept: not a requested normalizer kind '
                                                f'(norms={self.norm_kinds})'))
        elif isinstance(child, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)) or (
                isinstance(child, nn.Conv2d) and not isinstance(child, WS_CONV_TYPES)):
            self.report.unchanged.append((qual, f'{type(child).__name__} has no weight-standardised counterpart'))
        return None

    def visit_attention(self, module: nn.Module, qual: str) -> None:
        """Attention gates keep their plain convs (as in timm's NF nets); normalizers inside still go."""
        for name, child in list(module.named_modules()):
            if name and isinstance(child, self.norms):
                parent_name, _, attr = name.rpartition('.')
                parent = module.get_submodule(parent_name) if parent_name else module
                setattr(parent, attr, norm_replacement(child))
                self.report.norms_removed.append((f'{qual}.{name}', type(child).__name__))
        self.report.kept.append((qual, f'{type(module).__name__}: attention gate, convs stay plain'))

    def try_block(self, parent: nn.Module, name: str, child: nn.Module, qual: str) -> bool:
        if _is_normfree_block(child):  # scaled by its own design or by an earlier conversion: left as it is
            self.report.skipped.append((qual, _ALREADY_NF))
            return True
        if not any(isinstance(m, nn.Conv2d) for m in child.modules()) or not any(
                isinstance(m, self.norms) for m in child.modules()):
            return False  # no normalizer to remove: no scaling; a conv in it is converted if a removed norm follows
        try:
            info = find_residual(child)
        except Exception as e:  # noqa: BLE001 - untraceable forward (control flow on values): run it instead
            return self.try_block_concrete(child, qual, e)
        if info is None:
            if sum(isinstance(m, nn.Conv2d) for m in child.modules()) >= 2:  # a block of convs, not e.g. ConvNormAct
                self.report.unscaled.append((qual, f'{type(child).__name__}: no residual add found'))
            return False
        # convert the layers of the block, then find its residual structure again on the converted layers
        self.visit(child, qual + '.', in_block=True)
        info = find_residual(child)
        placed = None if _FORCE_REWRITE else hook_sites(info)
        if isinstance(placed, tuple):  # the user's block stays; hooks apply beta and alpha
            return self.scale_with_hooks(child, qual, info, placed)
        # the forward has to be rewritten for an exact scaling: a GraphModule, reported (strict refuses)
        beta = 1.0 / math.sqrt(self.expected_var)
        report = self.block_report(qual, child, info, beta, scaled_by='rewrite', rewrite_reason=placed or 'forced')
        block = rescale_residual(info, self.alpha, beta)
        setattr(parent, name, block)
        return self.finish_block(block, report)

    def scale_with_hooks(self, block: nn.Module, qual: str, found: Union[ResidualInfo, ConcreteResidual],
                         sites: Tuple[List[str], str]) -> bool:
        """Scale a block by hooks on its own modules (``sites``: the beta modules, the alpha module)."""
        beta = 1.0 / math.sqrt(self.expected_var)
        attach_scales(block, *sites, self.alpha, beta, found.transition)
        return self.finish_block(block, self.block_report(qual, block, found, beta, beta_on=sites[0],
                                                          alpha_on=sites[1]))

    def block_report(self, qual: str, block: nn.Module, found: Union[ResidualInfo, ConcreteResidual], beta: float,
                     **fields: Any) -> BlockReport:
        """The report of a residual block as found (traced or on a sample input), before its scaling is placed."""
        return BlockReport(
            name=qual, source_type=type(block).__name__, transition=found.transition, alpha=self.alpha, beta=beta,
            expected_var=self.expected_var, branch_convs=found.branch_convs, last_conv=found.last_conv,
            shortcut=', '.join(found.shortcut_convs) or 'identity', **fields)

    def finish_block(self, block: nn.Module, report: BlockReport) -> bool:
        """Record a scaled block: its report, its last conv for zero-init, the variance after it."""
        if self.zero_init_last and report.last_conv is not None:
            last = block.get_submodule(report.last_conv)
            if hasattr(last, 'gain'):
                self.last_convs.append(last)
        self.report.blocks.append(report)
        self.expected_var = (1.0 if report.transition else self.expected_var) + self.alpha ** 2
        return True

    def try_block_concrete(self, child: nn.Module, qual: str, error: Exception) -> bool:
        """A block torch.fx cannot trace: find its structure from one forward on a sample of its real input and
        scale it with hooks; if that fails too, it is converted layer by layer and reported unscaled."""
        why = f'its forward cannot be traced by torch.fx ({type(error).__name__})'
        x = self.sample_input(child)
        found, reason = None, None
        if x is None:
            reason = f'{why}, and the model could not run on a sample image'
        else:
            try:
                found = find_residual_concrete(child, x)
            except Exception as e:  # noqa: BLE001 - the sample run failed: layer by layer
                reason = f'{why}, and a sample run failed ({type(e).__name__})'
            else:
                if found is None:
                    reason = f'{why}; no residual add on a sample input'
                elif not isinstance(found.sites, tuple):
                    reason = f'{why}; {found.sites}'
        if reason is not None:
            self.report.notes.append(f'{qual} ({type(child).__name__}): {reason}; converted layer by layer')
            self.report.unscaled.append((qual, f'{type(child).__name__}: {reason}, so no residual scaling'))
            return False
        self.visit(child, qual + '.', in_block=True)
        self.report.notes.append(f'{qual} ({type(child).__name__}): {why}; its structure was found on a sample '
                                 f'input and is scaled by hooks, its forward (control flow included) kept')
        return self.scale_with_hooks(child, qual, found, found.sites)

    def sample_input(self, block: nn.Module) -> Optional[torch.Tensor]:
        """The input ``block`` receives when the (partly converted) model runs on a random image; None if the
        model cannot run on one."""
        root = self.root  # set by convert before any block is visited
        captured: List[torch.Tensor] = []

        def grab(module: nn.Module, args: tuple) -> None:
            captured.append(args[0].detach().clone())
            raise _Captured

        first = next((m for m in root.modules() if isinstance(m, nn.Conv2d)), None)
        size = tuple((getattr(root, 'pretrained_cfg', None) or {}).get('input_size', (3, 64, 64)))[-2:]
        x = torch.rand(1, first.in_channels if first is not None else 3, *size,
                       generator=torch.Generator().manual_seed(0))
        handle = block.register_forward_pre_hook(grab)
        try:
            with eval_mode(root), torch.no_grad():
                root(x)
        except _Captured:
            pass
        except Exception:  # noqa: BLE001 - a model that needs other inputs: no sample
            return None
        finally:
            handle.remove()
        return captured[0] if captured else None


class _Captured(BaseException):
    """Stops the sample run once the block's input is captured (a BaseException: user code's `except Exception`
    does not swallow it)."""


def _reinit(model: nn.Module) -> None:
    """Normalizer-free initialisation, as timm's NF nets: fan-in Kaiming convs, N(0, 0.01) linear layers."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_in', nonlinearity='linear')
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, WS_CONV_TYPES) and hasattr(module, 'gain'):
                nn.init.ones_(module.gain)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0., .01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def convert_to_normfree(
        model: nn.Module,
        alpha: float = 0.2,
        init: str = 'keep',
        norms: Sequence[str] = ('batch',),
        act_layer: Optional[str] = None,
        zero_init_last: bool = True,
        strict: bool = False,
) -> nn.Module:
    """Remove every normalization layer and rescale the network as a normalizer-free ResNet.

    Works on timm and torchvision ResNets (basic / bottleneck, ResNet-D, SE / ECA, ResNeXt, wide) and on
    user-defined residual blocks (found by tracing them with torch.fx), and on any other BN model through a
    generic path (normalizers removed, convs standardised, no residual scaling where there is no residual).
    The model is modified in place (deep-copy it first to keep the original) and returned. DDP /
    DataParallel / ``torch.compile`` wrappers are unwrapped: the converted inner module is returned.

    Args:
        model: The module to convert.
        alpha: Variance added by each residual block (NF-ResNets use 0.2).
        init: ``'keep'`` keeps the source conv weights (warm start from a pretrained BN model);
            ``'fresh'`` re-initialises the weights as NF nets do.
        norms: Normalizer kinds to remove: ``'batch'`` (always meant: BatchNorm1d/2d/3d, SyncBatchNorm,
            timm's BatchNormAct2d, FrozenBatchNorm2d), ``'group'``, ``'layer'``.
        act_layer: Activation whose gain is folded into the conv scale (timm name, e.g. ``'relu'``);
            detected from the model's activation modules when omitted.
        zero_init_last: Zero the gain of each residual branch's last conv so every block starts as the
            identity (NF-ResNet / SkipInit). With ``init='keep'``, ``False`` keeps pretrained branches active.
        strict: Raise ``NormFreeConversionError`` if anything (a normalizer or a conv) is left unconverted, or if
            there is nothing to convert (no normalizer to remove).

    What it does not own stays bit-identical, listed in ``report.skipped``: NF blocks, blocks converted before and
    weight-standardised convs, and convs outside residual blocks with no normalizer after them (a ViT patch embed).

    Returns:
        The converted module; its report is ``module.normfree_report`` (a ``ConversionReport``).
    """
    _check_arguments(model, alpha, init, norms)
    model, wrapper = _unwrap(model)
    act = act_layer or detect_activation(model)
    report = ConversionReport(
        model_type=type(model).__name__, init=init, alpha=float(alpha), activation=act or 'relu',
        gamma=activation_gamma(act or 'relu'), unwrapped=wrapper)
    if act is None:
        report.notes.append('no activation modules found (functional activations?): assumed relu for the gain')

    converter = _Converter(report, tuple(norms), float(alpha), report.gamma, zero_init_last)
    model = converter.convert(model)
    if init == 'fresh' and report.changed:
        _reinit(model)
    for conv in converter.last_convs:
        nn.init.zeros_(conv.gain)

    if strict:
        _check_strict(report, norms)
    if not report.changed:
        report.notes.append('model returned unchanged')
    model.normfree_report = report
    return model


def _check_arguments(model: nn.Module, alpha: float, init: str, norms: Sequence[str]) -> None:
    """Refuse a conversion request before anything is changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f'convert_to_normfree expects a torch.nn.Module, got {type(model).__name__}.')
    if init not in INIT_MODES:
        raise ValueError(f'Unknown init {init!r}; accepted: {", ".join(INIT_MODES)}.')
    unknown = [k for k in norms if k not in NORM_KINDS]
    if unknown or not norms:
        raise ValueError(f'Unknown normalizer kind(s) {unknown or list(norms)}; accepted: {", ".join(NORM_KINDS)}.')
    if not isinstance(alpha, (int, float)) or not 0. < alpha <= 1.:
        raise ValueError(f'alpha must be a number in (0, 1], got {alpha!r}.')


def _check_strict(report: ConversionReport, norms: Sequence[str]) -> None:
    """``strict=True``: refuse a conversion with nothing to convert, or that left a layer unconverted, or a block
    rewritten or unscaled."""
    if not report.norms_removed:
        raise NormFreeConversionError(f'strict conversion of {report.model_type}: nothing to convert, no '
                                      f'{"/".join(norms)} normalization layer to remove (already normalizer-free?)')
    if report.unchanged:
        details = '; '.join(f'{name}: {why}' for name, why in report.unchanged)
        raise NormFreeConversionError(f'strict conversion of {report.model_type} left {len(report.unchanged)} '
                                      f'layer(s) unconverted: {details}')
    rewritten = [b for b in report.blocks if b.rewritten]
    if rewritten or report.unscaled:
        details = '; '.join([f'{b.name}: rewritten ({b.rewrite_reason})' for b in rewritten]
                            + [f'{name}: {why}' for name, why in report.unscaled])
        raise NormFreeConversionError(
            f'strict conversion of {report.model_type}: {len(rewritten)} block(s) would lose their class (forward '
            f'rewritten) and {len(report.unscaled)} block(s) with convolutions have no residual scaling: {details}')


def normfree_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Residual blocks of a normalizer-free model: converted blocks and timm / NoFrost NF blocks."""
    return [(name, module) for name, module in model.named_modules() if _is_normfree_block(module)]


def _is_normfree_block(module: nn.Module) -> bool:
    """A timm / NoFrost NF block, or a block converted before (hooked or rewritten: it has ``nf_beta``)."""
    return is_preact_nf_block(module) or hasattr(module, 'nf_beta')
