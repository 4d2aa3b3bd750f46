"""Pretrained-weight plumbing shared by the NoFrost model family.

Wraps timm's ``build_model_with_cfg`` so that a bad weight source fails with an error that names it:
an unknown tag lists the valid ones, a bad file becomes a ``CheckpointError`` naming the file, and a
failed Hub download says which repo and endpoint were tried.
"""
import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Type

import torch.nn as nn
from timm.models import (
    PretrainedCfg, build_model_with_cfg, get_arch_pretrained_cfgs, list_pretrained, resolve_pretrained_cfg)

from ..checkpoint import checkpoint_filter_fn, translate_load_errors

__all__ = ['build_nofrost_model', 'describe_pretrained_source', 'explain_load_errors']


def _check_tag(variant: str, pretrained_cfg: Any) -> None:
    if not isinstance(pretrained_cfg, str) or not pretrained_cfg:
        return
    tags = [name.split('.', 1)[1] for name in get_arch_pretrained_cfgs(variant) if '.' in name]
    if pretrained_cfg not in tags:
        accepted = ', '.join(repr(t) for t in tags) or 'none'
        raise ValueError(
            f"Unknown pretrained tag {pretrained_cfg!r} for {variant}; accepted tags: {accepted}. "
            f"Weighted models: {', '.join(list_pretrained(variant + '*'))}.")


def _resolve(variant: str, pretrained_cfg: Any, overlay: Optional[Dict[str, Any]]) -> Optional[PretrainedCfg]:
    try:
        return resolve_pretrained_cfg(variant, pretrained_cfg, overlay)
    except Exception:  # noqa: BLE001 - timm raises its own error on the same input later
        return None


def describe_pretrained_source(cfg: Optional[PretrainedCfg], variant: str) -> str:
    """Human description of where ``create_model(..., pretrained=True)`` reads weights from."""
    if cfg is None:
        return f'the pretrained weights of {variant}'
    if cfg.source == 'local-dir':
        return f"local directory '{cfg.file}'"
    if cfg.source == 'hf-hub' or (cfg.hf_hub_id and not cfg.file and cfg.state_dict is None):
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
        return f"Hugging Face Hub repo '{cfg.hf_hub_id}' (endpoint {endpoint})"
    if cfg.state_dict is not None:
        return 'the state_dict passed in pretrained_cfg'
    if cfg.file:
        return f"checkpoint file '{cfg.file}'"
    if cfg.url:
        return f"url '{cfg.url}'"
    return f'the pretrained weights of {variant}'


@contextlib.contextmanager
def _explain_download_errors(source: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if type(e).__module__.startswith('huggingface_hub'):
            e.add_note(
                f'timm-nofrost: could not fetch weights from {source}. Check the repo id, HF_ENDPOINT and '
                f'network access; offline, set HF_HUB_OFFLINE=1 after a first download, or load a local file '
                f'with pretrained_cfg_overlay=dict(file=...).')
        elif isinstance(e, FileNotFoundError) and not str(e):
            raise FileNotFoundError(f'Pretrained weights not found: {source}') from None
        raise


@contextlib.contextmanager
def explain_load_errors(source: str, file: Optional[str] = None) -> Iterator[None]:
    """Errors while loading pretrained weights name their source (and diagnose a local ``file``)."""
    with translate_load_errors(source, file=file), _explain_download_errors(source):
        yield


def build_nofrost_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool = False,
        filter_fn: Callable = checkpoint_filter_fn,
        **kwargs: Any,
) -> nn.Module:
    """``build_model_with_cfg`` with NoFrost's checkpoint filter and clear pretrained-load errors."""
    _check_tag(variant, kwargs.get('pretrained_cfg'))
    if not pretrained:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    cfg = _resolve(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    source = describe_pretrained_source(cfg, variant)
    file = cfg.file if cfg is not None and cfg.source != 'local-dir' and cfg.state_dict is None else None
    with explain_load_errors(source, file):
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
