"""Residual structure of a block from one real forward pass, for blocks torch.fx cannot trace.

torch.fx traces symbolically and fails on Python control flow over tensor values (``if out.mean() > 0:``). Such
a block is run once on a sample of its real input, with a ``TorchFunctionMode`` recording every tensor
operation outside its leaf modules and forward hooks recording each leaf module call (plain containers are
looked through, as in the fx trace). The recorded data flow gives the same answers as the fx analysis: the
residual add, the branch and shortcut sides, their convolutions, and where hooks can apply beta and alpha. It
describes the path this input took; the hooks sit on modules, so they act on whichever path runs.
"""
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .layers import eval_mode, is_container
from .residual import ancestors, conv_names, last_conv, residual_sides, scale_sites

__all__ = ['ConcreteResidual', 'find_residual_concrete']

_ADDS = ('add', 'add_', '__add__', '__iadd__', '__radd__')


@dataclass
class _Node:
    kind: str  # 'input', 'module' or 'function'
    target: str  # module qualified name, or function name
    inputs: List[int]
    users: List[int] = field(default_factory=list)


@dataclass
class ConcreteResidual:
    """What the converter needs of a block (the fx analysis' ``ResidualInfo`` fields, plus the hook sites)."""
    transition: bool
    branch_convs: List[str]
    shortcut_convs: List[str]
    last_conv: Optional[str]
    sites: Union[Tuple[List[str], str], str]  # (beta modules, alpha module), or why hooks cannot be exact


def _leaves(block: nn.Module) -> Dict[nn.Module, str]:
    """The block's leaf modules (children, looking through plain containers), by qualified name."""
    leaves: Dict[nn.Module, str] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if is_container(child):
                walk(child, f'{prefix}{name}.')
            else:
                leaves[child] = f'{prefix}{name}'
    walk(block, '')
    return leaves


class _Recorder(TorchFunctionMode):
    def __init__(self, nodes: List[_Node], producer: Dict[int, int], keep: List[Any]):
        super().__init__()
        self.nodes, self.producer, self.keep = nodes, producer, keep
        self.depth = 0  # > 0 inside a leaf module: its own operations are not recorded

    def record(self, kind: str, target: str, inputs: Any, output: Any) -> None:
        sources = [self.producer[id(t)] for t in tree_flatten(inputs)[0]
                   if isinstance(t, torch.Tensor) and id(t) in self.producer]
        outputs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        if not sources or not outputs:
            return
        index = len(self.nodes)
        self.nodes.append(_Node(kind, target, sources))
        for s in set(sources):
            self.nodes[s].users.append(index)
        for t in outputs:
            self.producer[id(t)] = index
            self.keep.append(t)  # ids stay unique while the trace lives

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth == 0:
            self.record('function', getattr(func, '__name__', str(func)), (args, kwargs or {}), out)
        return out


def _trace(block: nn.Module, x: torch.Tensor) -> Tuple[List[_Node], int]:
    nodes = [_Node('input', 'x', [])]
    x = x.detach().clone()
    producer, keep = {id(x): 0}, [x]
    recorder = _Recorder(nodes, producer, keep)
    leaves = _leaves(block)

    def pre(module: nn.Module, args: Any) -> None:
        recorder.depth += 1

    def post(module: nn.Module, args: Any, output: Any) -> None:
        recorder.depth -= 1
        if recorder.depth == 0:
            recorder.record('module', leaves[module], args, output)

    handles = [h for leaf in leaves for h in (leaf.register_forward_pre_hook(pre, prepend=True),
                                              leaf.register_forward_hook(post))]
    try:
        with eval_mode(block), torch.no_grad(), recorder:
            out = block(x)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or id(out) not in producer:
        raise ValueError('the block does not return a tensor computed from its input')
    return nodes, producer[id(out)]


def _convs(block: nn.Module, nodes: List[_Node], indices: Set[int]) -> List[str]:
    return [c for i in sorted(indices) if nodes[i].kind == 'module' for c in conv_names(block, nodes[i].target)]


def find_residual_concrete(block: nn.Module, x: torch.Tensor) -> Optional[ConcreteResidual]:
    """The residual structure of ``block`` on input ``x`` (one forward, no gradients); None without one."""
    nodes, output = _trace(block, x)

    def inputs(n: int) -> List[int]:
        return nodes[n].inputs
    found = None
    for i in sorted(ancestors(output, inputs)):
        node = nodes[i]
        if node.kind != 'function' or node.target not in _ADDS or len(node.inputs) < 2:
            continue
        sides = residual_sides(node.inputs[0], node.inputs[1], 0, lambda n: ancestors(n, inputs),
                               lambda indices: _convs(block, nodes, indices))
        if sides is not None:
            found = (i, sides)  # the last such add, as in the fx analysis
    if found is None:
        return None
    add, (branch, _, branch_only, shortcut_only, branch_convs, shortcut_convs) = found
    transition = bool(shortcut_convs)
    last = last_conv(branch, branch_only, inputs, lambda n: _convs(block, nodes, {n}))
    return ConcreteResidual(transition, branch_convs, shortcut_convs, last,
                            _sites(nodes, add, branch, shortcut_only, transition))


def _sites(nodes: List[_Node], add: int, branch: int, shortcut_only: Set[int], transition: bool):
    """As ``residual.hook_sites``, on the recorded data flow."""
    def site(i: int, ok: bool) -> Tuple[Optional[str], str, bool]:
        return (nodes[i].target, '', ok) if nodes[i].kind == 'module' else (None, f'function {nodes[i].target}', ok)
    readers = [site(u, nodes[u].inputs == [0]) for u in dict.fromkeys(nodes[0].users)
               if transition or not (u == add or u in shortcut_only)]
    calls = Counter(n.target for n in nodes if n.kind == 'module')
    return scale_sites(readers, site(branch, set(nodes[branch].users) == {add}), calls)
