"""Find the residual structure of a block with torch.fx and rescale it the normalizer-free way.

A block is traced with its children as leaves (plain containers are traced through), so its graph shows
how the branch and the shortcut meet, however the block is written: ``x += shortcut``, ``torch.add``,
functional or module activations, ``shortcut`` / ``downsample`` modules, pre- or post-activation.
The last add whose two operands both depend on the block input, with convolutions on one side, is the
residual add. The scaling multiplies the branch input by beta and the branch output by alpha:

    out = alpha * branch(beta * x) + shortcut(x)           (identity shortcut: shortcut(x) = x)
    out = alpha * branch(beta * x) + shortcut(beta * x)    (projection shortcut, as in NF-ResNets)

The trace is only read: the block keeps its class and forward, and hooks on its own modules apply the
scalings (``attach_scales``: beta on the modules that read the block input, alpha on the module whose output
enters the add). Where that is not exact (the input or the branch output goes through a function rather than a
module called once, see ``hook_sites``), ``rescale_residual`` rewrites the forward instead (a GraphModule).
"""
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..layers.residual_scale import ScaleInput, ScaleOutput
from .layers import is_container

__all__ = ['ResidualInfo', 'trace_block', 'find_residual', 'residual_sides', 'hook_sites', 'attach_scales',
           'rescale_residual']

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ('add', 'add_')


class _LeafTracer(fx.Tracer):
    """Every child module is a leaf except plain containers, which are traced through."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not is_container(m)


@dataclass
class ResidualInfo:
    graph_module: fx.GraphModule
    add: fx.Node
    branch: fx.Node
    shortcut: fx.Node
    branch_only: Set[fx.Node]  # nodes that feed the branch but not the shortcut
    shortcut_only: Set[fx.Node]
    branch_convs: List[str]
    shortcut_convs: List[str]
    last_conv: Optional[str]  # qualified name of the conv whose output ends the branch

    @property
    def transition(self) -> bool:
        return bool(self.shortcut_convs)


def trace_block(block: nn.Module) -> fx.GraphModule:
    graph = _LeafTracer().trace(block)
    return fx.GraphModule(block, graph, class_name=f'NormFree{type(block).__name__}')


def ancestors(node: Any, inputs: Callable[[Any], Iterable[Any]] = lambda n: n.all_input_nodes) -> Set[Any]:
    """``node`` and every node it is computed from, in any graph (``inputs``: a node's direct inputs)."""
    seen: Set[Any] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(inputs(n))
    return seen


def _is_add(node: fx.Node) -> bool:
    if node.op == 'call_function' and node.target in _ADD_FUNCTIONS:
        return len(node.args) >= 2 and 'alpha' not in node.kwargs
    return node.op == 'call_method' and node.target in _ADD_METHODS and len(node.args) >= 2


def conv_names(block: nn.Module, target: str) -> List[str]:
    """Qualified names of the convs of ``block``'s submodule ``target`` (itself included)."""
    return [f'{target}.{n}' if n else target
            for n, m in block.get_submodule(target).named_modules() if isinstance(m, nn.Conv2d)]


def _node_convs(gm: fx.GraphModule, node: fx.Node) -> List[str]:
    return conv_names(gm, node.target) if node.op == 'call_module' else []


def last_conv(branch: Any, allowed: Set[Any], inputs: Callable[[Any], Iterable[Any]],
              convs: Callable[[Any], List[str]]) -> Optional[str]:
    """The conv closest to the end of the branch (the one whose gain is zero-initialised), in any graph: breadth
    first from ``branch`` back through ``allowed`` nodes, ``convs`` naming the convs a node runs."""
    frontier = [branch]
    seen: Set[Any] = set()
    while frontier:
        node = frontier.pop(0)
        if node in seen or node not in allowed:
            continue
        seen.add(node)
        found = convs(node)
        if found:
            return found[-1]
        frontier.extend(inputs(node))
    return None


def residual_sides(a: Any, b: Any, x: Any, ancestors: Callable[[Any], Set[Any]],
                   convs: Callable[[Set[Any]], List[str]]) -> Optional[Tuple]:
    """The two operands of an add seen as a residual connection, in any graph (torch.fx nodes or a recorded
    forward): ``(branch, shortcut, branch_only, shortcut_only, branch_convs, shortcut_convs)``, the branch being
    the side with more convolutions of its own; None unless both sides read the block input ``x`` and
    convolutions feed one of them."""
    anc_a, anc_b = ancestors(a), ancestors(b)
    if x not in anc_a or x not in anc_b:
        return None
    only_a, only_b = anc_a - anc_b, anc_b - anc_a
    convs_a, convs_b = convs(only_a), convs(only_b)
    if not convs_a and not convs_b:
        return None
    if len(convs_a) >= len(convs_b):
        return a, b, only_a, only_b, convs_a, convs_b
    return b, a, only_b, only_a, convs_b, convs_a


def find_residual(block: nn.Module) -> Optional[ResidualInfo]:
    """Trace ``block`` and locate its residual add; ``None`` if it has none (or cannot be traced)."""
    gm = trace_block(block)
    placeholders = [n for n in gm.graph.nodes if n.op == 'placeholder']
    if len(placeholders) != 1:
        return None
    x = placeholders[0]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    output = next(n for n in gm.graph.nodes if n.op == 'output')
    live = ancestors(output)
    candidates = []
    for node in gm.graph.nodes:
        if node not in live or not _is_add(node):
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        sides = residual_sides(a, b, x, ancestors, lambda nodes: [
            c for n in sorted(nodes, key=order.get) for c in _node_convs(gm, n)])
        if sides is None:
            continue
        branch, shortcut, branch_only, shortcut_only, bc, sc = sides
        candidates.append(ResidualInfo(
            graph_module=gm, add=node, branch=branch, shortcut=shortcut, branch_only=branch_only,
            shortcut_only=shortcut_only, branch_convs=bc, shortcut_convs=sc,
            last_conv=last_conv(branch, branch_only, lambda n: n.all_input_nodes, lambda n: _node_convs(gm, n))))
    return candidates[-1] if candidates else None


def rescale_residual(info: ResidualInfo, alpha: float, beta: float) -> fx.GraphModule:
    """Insert the beta input scaling and the alpha branch scaling into the traced block."""
    gm = info.graph_module
    graph = gm.graph
    x = next(n for n in graph.nodes if n.op == 'placeholder')
    readers = _input_readers(info, x)
    with graph.inserting_after(x):
        scaled = graph.call_function(operator.mul, (x, float(beta)))
    for user in readers:
        user.replace_input_with(x, scaled)
    with graph.inserting_before(info.add):
        branch = graph.call_function(operator.mul, (info.branch, float(alpha)))
    info.add.replace_input_with(info.branch, branch)
    graph.lint()
    gm.recompile()
    gm.nf_alpha = float(alpha)
    gm.nf_beta = float(beta)
    gm.nf_transition = info.transition
    return gm


def _input_readers(info: ResidualInfo, x: fx.Node) -> List[fx.Node]:
    """The users of the block input ``x`` that must see ``beta * x``: all but an identity shortcut (which carries
    the unscaled input)."""
    return [u for u in x.users if info.transition or not (u is info.add or u in info.shortcut_only)]


def hook_sites(info: ResidualInfo):
    """``(beta modules, alpha module)``: where hooks scale the block exactly, as qualified names; or, when they
    cannot, the reason (a string) the forward has to be rewritten (see ``scale_sites``)."""
    gm = info.graph_module
    x = next(n for n in gm.graph.nodes if n.op == 'placeholder')

    def site(node: fx.Node, ok: bool) -> Tuple[Optional[str], str, bool]:
        if node.op == 'call_module':
            return node.target, '', ok
        return None, f'{node.op} {getattr(node.target, "__name__", node.target)}', ok
    readers = [site(u, u.args == (x,) and not u.kwargs) for u in _input_readers(info, x)]
    calls = Counter(n.target for n in gm.graph.nodes if n.op == 'call_module')
    return scale_sites(readers, site(info.branch, set(info.branch.users) == {info.add}), calls)


def scale_sites(readers: List[Tuple[Optional[str], str, bool]], branch: Tuple[Optional[str], str, bool],
                calls: Dict[str, int]):
    """``(beta modules, alpha module)`` in any graph, or why hooks cannot scale the block exactly.

    ``readers`` are the nodes that read the scaled input and ``branch`` the node that ends the branch, each as
    ``(module name or None, what it is otherwise, called on the block input alone / read by the add alone)``;
    ``calls`` counts the calls of each module. Exact means: every consumer of the scaled input is a module called
    once, on that input alone; the branch output comes from a module called once whose only consumer is the add.
    """
    beta_on = []
    for module, what, alone in readers:
        if module is None:
            return f'the block input goes through {what}'
        if calls[module] != 1 or not alone:
            return f'module {module} is called more than once or with more than the block input'
        beta_on.append(module)
    module, what, alone = branch
    if module is None:
        return f'the branch ends in {what}, not a module'
    if calls[module] != 1 or not alone:
        return f'the branch output of module {module} is used elsewhere or the module runs twice'
    if module in beta_on:
        return f'module {module} both reads the block input and ends the branch'
    return beta_on, module


def attach_scales(block: nn.Module, beta_on: List[str], alpha_on: str, alpha: float, beta: float,
                  transition: bool) -> nn.Module:
    """Put ``nf_alpha`` / ``nf_beta`` on the user's block and the hooks that apply them on its modules."""
    block.nf_alpha = float(alpha)
    block.nf_beta = float(beta)
    block.nf_transition = bool(transition)
    block.nf_scaled_modules = {'beta': list(beta_on), 'alpha': alpha_on}  # where the hooks are, for reading
    for name in beta_on:
        block.get_submodule(name).register_forward_pre_hook(ScaleInput(block, 'nf_beta'))
    block.get_submodule(alpha_on).register_forward_hook(ScaleOutput(block, 'nf_alpha'))
    return block
