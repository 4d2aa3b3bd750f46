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
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = [
    'CheckpointError',
    'read_state_dict',
    'clean_state_dict',
    'checkpoint_filter_fn',
    'describe_key_mismatch',
    'translate_load_errors',
    'unsafe_pickle_globals',
]

# keys under which training scripts nest the weights, in order of preference
_NESTED_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model', 'net')
# prefixes added by wrappers: DistributedDataParallel / DataParallel and torch.compile
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')
_MAX_LISTED_KEYS = 6


class CheckpointError(ValueError):
    """A file or state_dict that cannot be loaded as weights of the requested model."""


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                changed = True
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
    for key in _NESTED_KEYS:
        nested = checkpoint.get(key, None)
        if isinstance(nested, Mapping) and nested:
            checkpoint = nested
            break
    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            continue  # optimizer state, epoch counters and other metadata are not weights
        state_dict[_strip_prefixes(str(key))] = value
    if not state_dict:
        raise CheckpointError(
            f'{name} holds no tensors: expected a state_dict, or a dict with one under one of {_NESTED_KEYS}.')
    return state_dict


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read weights from a ``.safetensors`` file or a PyTorch checkpoint, safely.

    Pickle-based files are loaded with ``weights_only=True`` on the CPU; anything else is refused.

    Raises:
        FileNotFoundError: The path does not exist.
        CheckpointError: The file is corrupted, not a checkpoint, or would need arbitrary code to unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint file not found: {path}')
    name = f"checkpoint '{path}'"
    try:
        if _is_safetensors(path):
            import safetensors.torch
            checkpoint = safetensors.torch.load_file(str(path), device='cpu')
        else:
            checkpoint = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure to read becomes a CheckpointError naming the file
        raise _diagnose(path, e) from None
    return clean_state_dict(checkpoint, name=name)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == '.safetensors':
        return True
    # safetensors files start with an 8-byte little endian header length followed by '{'
    with path.open('rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{'


def _diagnose(path: Path, error: BaseException) -> CheckpointError:
    """Explain why ``path`` could not be read, without ever executing its pickle."""
    name = f"checkpoint '{path}'"
    if _is_safetensors_error(error) or _is_safetensors(path):
        return CheckpointError(f'{name} is not a valid safetensors file ({error}).')
    unsafe = unsafe_pickle_globals(path)
    if unsafe:
        return CheckpointError(
            f'refusing to load {name}: its pickle imports {", ".join(unsafe)}, which could execute code. '
            f'Only tensor state_dicts are loaded (torch.load weights_only=True); re-save the weights with '
            f'torch.save(model.state_dict()) or as safetensors if you trust the file.')
    if unsafe is None:
        return CheckpointError(f'{name} is not a PyTorch or safetensors checkpoint.')
    return CheckpointError(f'{name} is truncated or corrupted ({type(error).__name__}: {error}).')


_SAFE_GLOBAL_ROOTS = ('torch', 'collections', '_codecs')


def unsafe_pickle_globals(path: Union[str, Path]) -> Optional[List[str]]:
    """Globals a pickle-based checkpoint would import, other than torch's own; ``None`` if it is no pickle.

    Reads opcodes only (``pickletools``), so nothing in the file runs.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
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


def describe_key_mismatch(
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[str] = (),
) -> str:
    """One-line summary of key differences between a checkpoint and a model."""
    def _fmt(label: str, keys: Sequence[str]) -> str:
        keys = list(keys)
        shown = ', '.join(keys[:_MAX_LISTED_KEYS])
        more = f', ... (+{len(keys) - _MAX_LISTED_KEYS} more)' if len(keys) > _MAX_LISTED_KEYS else ''
        return f'{len(keys)} {label} ({shown}{more})'
    parts = []
    if missing:
        parts.append(_fmt('missing keys', missing))
    if unexpected:
        parts.append(_fmt('unexpected keys', unexpected))
    if mismatched:
        parts.append(_fmt('shape mismatches', mismatched))
    return '; '.join(parts)


def _prefix_match(key: str, names: Sequence[str]) -> bool:
    return any(key == n or key.startswith(n + '.') for n in names)


def _as_names(value: Optional[Union[str, Sequence[str]]]) -> List[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


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

    model_state = model.state_dict()
    missing = [k for k in model_state if k not in state_dict and not _prefix_match(k, classifiers)]
    unexpected = [k for k in state_dict if k not in model_state and not _prefix_match(k, classifiers)]
    mismatched = []
    for key, value in state_dict.items():
        target = model_state.get(key, None)
        if target is None or tuple(target.shape) == tuple(value.shape):
            continue
        if _prefix_match(key, first_convs):
            continue  # timm adapts the first conv to in_chans
        if _prefix_match(key, classifiers) and head_reset:
            continue  # timm drops the classifier when num_classes differs
        mismatched.append(f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}')
    if missing or unexpected or mismatched:
        arch = pretrained_cfg.get('architecture') or type(model).__name__
        hint = ''
        if mismatched and all(_prefix_match(m.split(':')[0], classifiers) for m in mismatched) \
                and not missing and not unexpected:
            n_ckpt = state_dict[classifiers[0] + '.weight'].shape[0]
            hint = f' The checkpoint was trained for {n_ckpt} classes: pass num_classes={n_ckpt}.'
        raise CheckpointError(
            f'weights do not fit {arch}: {describe_key_mismatch(missing, unexpected, mismatched)}.{hint}')
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
        raise CheckpointError(f'{source}: {e}') from e
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


