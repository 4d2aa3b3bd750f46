"""Safe checkpoint reading and validation for NoFrost models.

Accepts the formats that NoFrost weights circulate in:
  * the authors' ``best_RA.pth`` / ``best_SA.pth``: a plain state_dict of a DDP model (``module.`` keys),
  * the authors' ``latest.pth``: a dict holding the state_dict under ``model``,
  * timm checkpoints (``state_dict`` / ``state_dict_ema``) and safetensors files,
  * ``torch.compile`` wrappers (``_orig_mod.`` keys).

Pickled files are only ever read with ``torch.load(weights_only=True)``: a file that needs arbitrary
Python objects is refused, never executed.
"""
import contextlib
import hashlib
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = ['CheckpointError', 'CHECKSUM_KEY', 'content_checksum', 'read_checkpoint', 'read_state_dict',
           'load_checkpoint', 'compare_state_dict', 'clean_state_dict', 'checkpoint_filter_fn', 'describe_key_mismatch',
           'translate_load_errors', 'unsafe_pickle_globals']

# keys under which training scripts nest the weights, in order of preference
_NESTED_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model', 'net')
# prefixes added by wrappers: DistributedDataParallel / DataParallel and torch.compile
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')
_MAX_LISTED_KEYS = 6
# the key (or safetensors metadata entry) under which files this project writes carry their checksum
CHECKSUM_KEY = 'checksum'


class CheckpointError(ValueError):
    """A file or state_dict that cannot be loaded as weights of the requested model.

    Besides the one-line message, the fields say what went wrong, for programs: ``path`` (the file, when there
    is one) and the ``missing``, ``unexpected`` and ``mismatched`` (``'key: checkpoint (..) vs model (..)'``)
    keys when the weights do not fit the model.
    """

    def __init__(self, message: str, path: Optional[Union[str, Path]] = None, missing: Sequence[str] = (),
                 unexpected: Sequence[str] = (), mismatched: Sequence[str] = ()):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)

    def with_source(self, source: str, path: Optional[Union[str, Path]] = None) -> 'CheckpointError':
        """The same error, its message prefixed with ``source`` (and ``path`` recorded)."""
        return CheckpointError(f'{source}: {self}', path=path if path is not None else self.path,
                               missing=self.missing, unexpected=self.unexpected, mismatched=self.mismatched)


def _strip_prefixes(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split('.', 1)[1]  # every wrapper prefix is one dotted component
    return key


def clean_state_dict(checkpoint: Mapping[str, Any], name: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """Unwrap a nested training checkpoint and strip DDP / compile prefixes.

    Args:
        checkpoint: A state_dict, or a dict holding one under a known key (``model``, ``state_dict``, ...).
        name: How to call the source in error messages.

    Returns:
        A flat ``{parameter name: tensor}`` dict.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{name} does not hold a state_dict (found {type(checkpoint).__name__}).')
    nested = (checkpoint.get(key) for key in _NESTED_KEYS)
    checkpoint = next((n for n in nested if isinstance(n, Mapping) and n), checkpoint)
    # optimizer state, epoch counters and other metadata are not weights
    state_dict = {_strip_prefixes(str(k)): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CheckpointError(
            f'{name} holds no tensors: expected a state_dict, or a dict with one under one of {_NESTED_KEYS}.')
    return state_dict


def read_checkpoint(path: Union[str, Path]) -> Any:
    """The whole content of a ``.safetensors`` file or a PyTorch checkpoint, read safely: the one place that
    opens checkpoint files (weights, the authors' formats, training checkpoints).

    Pickle-based files are loaded with ``weights_only=True`` on the CPU; anything else is refused.

    Raises:
        FileNotFoundError: The path does not exist (or is a folder).
        CheckpointError: The file is corrupted, not a checkpoint, or would need arbitrary code to unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint file not found: {path}' + (' (a folder)' if path.is_dir() else ''))
    try:
        if _is_safetensors(path):
            import safetensors
            import safetensors.torch
            with safetensors.safe_open(str(path), 'pt') as f:
                recorded = (f.metadata() or {}).get(CHECKSUM_KEY)
            content = safetensors.torch.load_file(str(path), device='cpu')
        else:
            content = torch.load(str(path), map_location='cpu', weights_only=True)
            recorded = content.pop(CHECKSUM_KEY, None) if isinstance(content, dict) else None
    except Exception as e:  # noqa: BLE001 - every failure to read becomes a CheckpointError naming the file
        raise _diagnose(path, e) from None
    if recorded is not None and recorded != content_checksum(content):
        raise CheckpointError(f"checkpoint '{path}' is corrupted: its content does not match the checksum it was "
                              f"written with ({recorded[:19]}...).", path=path)
    return content


def content_checksum(content: Any) -> str:
    """``sha256:<hex>`` of a checkpoint's content (nested dicts, lists, tensors and plain values), for the
    checksum that files this project writes carry under ``CHECKSUM_KEY`` and that ``read_checkpoint`` verifies."""
    digest = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            digest.update(f'T{value.dtype}{tuple(value.shape)}'.encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b'')
        elif isinstance(value, Mapping):
            digest.update(f'D{len(value)}'.encode())
            for key in sorted(value, key=str):
                digest.update(f'K{key!r}'.encode())
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f'L{len(value)}'.encode())
            for item in value:
                visit(item)
        else:
            digest.update(f'V{value!r}'.encode())
    visit(content)
    return f'sha256:{digest.hexdigest()}'


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read weights from a ``.safetensors`` file or a PyTorch checkpoint, safely (``read_checkpoint``), and
    unwrap them (``clean_state_dict``).

    Raises:
        FileNotFoundError: The path does not exist.
        CheckpointError: The file is corrupted, not a checkpoint, or would need arbitrary code to unpickle.
    """
    try:
        return clean_state_dict(read_checkpoint(path), name=f"checkpoint '{path}'")
    except CheckpointError as e:
        raise CheckpointError(str(e), path=path) from None


def load_checkpoint(model: nn.Module, checkpoint: Union[str, Path, Mapping[str, Any]]) -> nn.Module:
    """Load weights into ``model``: read safely, unwrap (authors' formats, DDP / compile prefixes), check every
    key and shape against the model, then ``load_state_dict``. Used by the CLI, the train command, export,
    convert and the study.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: Unreadable or unsafe file, or weights that do not fit (its ``missing``,
            ``unexpected`` and ``mismatched`` fields list them; the message says what to pass).
    """
    is_file = isinstance(checkpoint, (str, Path))
    state_dict = read_state_dict(checkpoint) if is_file else clean_state_dict(checkpoint)
    _check_fit(f"checkpoint '{checkpoint}'" if is_file else 'state_dict', state_dict, model,
               *compare_state_dict(state_dict, model), path=checkpoint if is_file else None)
    model.load_state_dict(state_dict)
    return model


def compare_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, skip: Sequence[str] = ()) -> tuple:
    """``(missing, unexpected, mismatched)`` keys of ``state_dict`` against ``model``, ignoring the modules in
    ``skip`` (qualified names); ``mismatched`` as ``'key: checkpoint (..) vs model (..)'``."""
    model_state = model.state_dict()
    missing = [k for k in model_state if k not in state_dict and not _prefix_match(k, skip)]
    unexpected = [k for k in state_dict if k not in model_state and not _prefix_match(k, skip)]
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}'
                  for k, v in state_dict.items()
                  if k in model_state and tuple(model_state[k].shape) != tuple(v.shape) and not _prefix_match(k, skip)]
    return missing, unexpected, mismatched


def _check_fit(source: str, state_dict: Mapping[str, torch.Tensor], model: nn.Module, missing: List[str],
               unexpected: List[str], mismatched: List[str], path: Optional[Union[str, Path]] = None) -> None:
    """Raise a ``CheckpointError`` saying that ``source`` does not fit ``model`` when any key is missing, unexpected
    or mismatched, with ' pass num_classes=N.' when only the classifier differs."""
    if not (missing or unexpected or mismatched):
        return
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifiers, hint = _as_names(cfg.get('classifier')), ''
    if classifiers and mismatched and not missing and not unexpected \
            and all(_prefix_match(m.split(':')[0], classifiers) for m in mismatched):
        weight = state_dict.get(classifiers[0] + '.weight')
        if weight is not None:
            hint = f' The checkpoint was trained for {weight.shape[0]} classes: pass num_classes={weight.shape[0]}.'
    raise CheckpointError(f"{source} does not fit {cfg.get('architecture') or type(model).__name__}: "
                          f'{describe_key_mismatch(missing, unexpected, mismatched)}.{hint}', path=path,
                          missing=missing, unexpected=unexpected, mismatched=mismatched)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == '.safetensors':
        return True
    # safetensors files start with an 8-byte little endian header length followed by '{'
    with path.open('rb') as f:
        head = f.read(9)
    return head[8:9] == b'{'


def _diagnose(path: Path, error: BaseException) -> CheckpointError:
    """Explain why ``path`` could not be read, without ever executing its pickle."""
    name = f"checkpoint '{path}'"
    if _is_safetensors_error(error) or _is_safetensors(path):
        return CheckpointError(f'{name} is not a valid safetensors file ({_first_line(error)}).', path=path)
    unsafe = unsafe_pickle_globals(path)
    if unsafe:
        return CheckpointError(
            f'refusing to load {name}: its pickle imports {", ".join(unsafe)}, which could execute code. '
            f'Only tensor state_dicts are loaded (torch.load weights_only=True); re-save the weights with '
            f'torch.save(model.state_dict()) or as safetensors if you trust the file.', path=path)
    if unsafe is None:
        return CheckpointError(f'{name} is not a PyTorch or safetensors checkpoint.', path=path)
    return CheckpointError(f'{name} is truncated or corrupted ({type(error).__name__}: {_first_line(error)}).',
                           path=path)


def _first_line(error: BaseException) -> str:
    """The first line of an error from torch / safetensors, for a one-line message (shown, never parsed)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_SAFE_GLOBAL_ROOTS = ('torch', 'collections', '_codecs')


def unsafe_pickle_globals(path: Union[str, Path]) -> Optional[List[str]]:
    """Globals a pickle-based checkpoint would import, other than torch's own; ``None`` if it is no pickle.

    Reads opcodes only (``pickletools``), so nothing in the file runs.
    """
    path = Path(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # a zip whose end records are damaged: a corrupted checkpoint, not another format
        return []
    if is_zip:
        try:
            from torch.serialization import get_unsafe_globals_in_checkpoint
            return list(get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - a zip that torch cannot read as a checkpoint
            return None
    found: List[str] = []
    strings: List[str] = []
    with path.open('rb') as f:
        if f.peek(1)[:1] != b'\x80':  # torch.save and pickle protocol >= 2 start with PROTO
            return None
        while f.peek(1)[:1] == b'\x80':  # legacy torch files are several pickles in a row
            try:
                for opcode, arg, _ in pickletools.genops(f):
                    if opcode.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE', 'BINUNICODE8'):
                        strings.append(str(arg))
                    elif opcode.name == 'GLOBAL':
                        found.append(str(arg).replace(' ', '.'))
                    elif opcode.name == 'STACK_GLOBAL' and len(strings) >= 2:
                        found.append(f'{strings[-2]}.{strings[-1]}')
            except Exception:  # noqa: BLE001 - truncated pickle: report what was seen
                break
    return sorted({g for g in found if g.split('.', 1)[0] not in _SAFE_GLOBAL_ROOTS})


def describe_key_mismatch(missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str] = ()) -> str:
    """One-line summary of key differences between a checkpoint and a model."""
    def _fmt(label: str, keys: Sequence[str]) -> str:
        keys = list(keys)
        shown = ', '.join(keys[:_MAX_LISTED_KEYS])
        more = f', ... (+{len(keys) - _MAX_LISTED_KEYS} more)' if len(keys) > _MAX_LISTED_KEYS else ''
        return f'{len(keys)} {label} ({shown}{more})'
    return '; '.join(_fmt(label, keys) for label, keys in (
        ('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', mismatched)) if keys)


def _prefix_match(key: str, names: Sequence[str]) -> bool:
    return any(key == n or key.startswith(n + '.') for n in names)


def _as_names(value: Optional[Union[str, Sequence[str]]]) -> List[str]:
    return [] if not value else [value] if isinstance(value, str) else list(value)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: accept the authors' formats and validate against ``model``.

    Keys and shapes are checked before timm loads the weights so that a checkpoint of another
    architecture fails with a summary instead of a wall of ``size mismatch`` lines. The classifier
    (reset by timm when ``num_classes`` differs) and the first conv (adapted by timm when
    ``in_chans`` differs) are left to timm.
    """
    state_dict = clean_state_dict(state_dict)
    pretrained_cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    classifiers = _as_names(pretrained_cfg.get('classifier'))
    first_convs = _as_names(pretrained_cfg.get('first_conv'))
    head_reset = getattr(model, 'num_classes', None) != pretrained_cfg.get('num_classes', None)

    missing, unexpected, _ = compare_state_dict(state_dict, model, skip=classifiers)
    _, _, mismatched = compare_state_dict(state_dict, model)
    # timm adapts the first conv to in_chans, and drops the classifier when num_classes differs
    mismatched = [m for m in mismatched if not _prefix_match(m.split(':')[0], first_convs)
                  and not (head_reset and _prefix_match(m.split(':')[0], classifiers))]
    _check_fit('weights', state_dict, model, missing, unexpected, mismatched)
    return state_dict


@contextlib.contextmanager
def translate_load_errors(source: str, file: Optional[Union[str, Path]] = None) -> Iterator[None]:
    """Re-raise loading failures as ``CheckpointError`` naming ``source``.

    When the weights came from a local ``file``, a failure is diagnosed by reading that file safely
    (corrupted, not a checkpoint, or a pickle that would run code).
    """
    try:
        yield
    except CheckpointError as e:
        raise e.with_source(source, file) from e
    except Exception as e:  # noqa: BLE001 - narrowed below, everything else re-raised unchanged
        if file is not None and Path(file).is_file():
            try:
                read_state_dict(file)
            except CheckpointError as diagnosis:
                raise diagnosis from None
        if _is_safetensors_error(e):
            raise CheckpointError(f'{source} is not a valid safetensors file ({e}).') from None
        raise


def _is_safetensors_error(e: BaseException) -> bool:
    return type(e).__name__ == 'SafetensorError' or 'safetensors' in type(e).__module__


