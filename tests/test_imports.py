"""The package's import graph: no cycles, and data flows one way (cli -> study -> training -> evaluate -> attacks
-> models -> layers, convert beside models, hub above both). Imports inside functions count: a lazy import
hides a cycle from Python, not from the design."""
import ast
from pathlib import Path
from typing import Dict, List, Set

import timm_nofrost

ROOT = Path(timm_nofrost.__file__).parent
PACKAGE = 'timm_nofrost'

# a package may import only packages of a lower rank (the root __init__ re-exports everything and is exempt)
RANK = {
    'version': 0, 'files': 0, 'settings': 0, 'pixels': 1, 'layers': 1, 'checkpoint': 1, 'model_card': 1, 'data': 2, 'convert': 3, 'models': 4,
    'signal_propagation': 4, 'hub': 5, 'attacks': 5, 'evaluate': 6, 'training': 7, 'study': 8, 'cli': 9,
    '__main__': 10,
}


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix('').parts]
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> Dict[str, Set[str]]:
    """module -> the package modules it imports (anywhere in its code), and the packages those live in."""
    modules = {_module_name(p): p for p in ROOT.rglob('*.py')}
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        package = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = '.'.join(package[:len(package) - node.level + 1] + [node.module or '']) if node.level \
                    else node.module or ''
                base = base.rstrip('.')
                for alias in node.names:
                    targets.add(f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        edges = set()
        for target in targets:
            if target not in modules or target == name:
                continue
            edges.add(target)
            parts = target.split('.')  # importing a.b.c runs a.b's __init__ too (not the importer's own packages)
            for i in range(2, len(parts)):
                parent = '.'.join(parts[:i])
                if not name.startswith(parent + '.') and parent != name:
                    edges.add(parent)
        graph[name] = edges
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _top(module: str) -> str:
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else ''


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_data_flows_one_way():
    graph = import_graph()
    assert set(RANK) >= {_top(m) for m in graph if _top(m)}, 'a new package needs a rank in this test'
    wrong = sorted(f'{m} -> {t}' for m, targets in graph.items() for t in targets
                   if _top(m) and _top(t) != _top(m) and RANK[_top(t)] >= RANK[_top(m)])
    assert wrong == []


def test_the_walker_sees_cycles_and_lazy_imports():
    graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
    assert cycles(graph) == [['a', 'b', 'c']]
    graph = import_graph()
    # a lazy import inside a function counts (the hub imports the converter only when exporting)
    assert 'timm_nofrost.convert' in graph['timm_nofrost.hub']
    assert 'timm_nofrost.models.converted' in graph['timm_nofrost.hub']


def test_no_two_modules_share_a_file_name():
    """Names that explain themselves: ``report.py`` in three packages said nothing about what each held."""
    names = [p.name for p in ROOT.rglob('*.py') if p.name != '__init__.py']
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_every_function_is_under_60_lines():
    """Functions that do one thing each: evaluate() and everything else stays under 60 lines."""
    import ast
    long = [f'{p.relative_to(ROOT)}:{n.name} ({n.end_lineno - n.lineno + 1})' for p in ROOT.rglob('*.py')
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 >= 60]
    assert long == []
