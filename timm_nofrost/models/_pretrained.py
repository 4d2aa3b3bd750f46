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
from ..model_card import AUTHORS_CODE_URL as AUTHORS_CODE

__all__ = ['build_nofrost_model', 'describe_pretrained_source', 'explain_load_errors', 'weights_not_on_hub_note',
           'HF_HUB_ORG', 'AUTHORS_CODE']


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
        return f"Hugging Face Hub repo '{cfg.hf_hub_id}' (endpoint {constants.ENDPOINT})"
    if cfg.state_dict is not None:
        return 'the state_dict passed in pretrained_cfg'
    if cfg.file:
        return f"checkpoint file '{cfg.file}'"
    if cfg.url:
        return f"url '{cfg.url}'"
    return f'the pretrained weights of {variant}'


# the Hub organisation the registered tags point at; its repos are created when the weights are published
HF_HUB_ORG = 'timm-nofrost'


def weights_not_on_hub_note(hub_id: str, variant: str) -> str:
    """What to do while the project's Hub repos do not exist yet: the authors' files, loaded two ways."""
    arch = variant.split('.', 1)[0]
    return (f"timm-nofrost: the NoFrost weights are not published on the Hub yet (repo '{hub_id}' does not exist). "
            f"Download the authors' checkpoint (best_RA.pth for .at_in1k, the NoFrost* one for .at_deepaug_in1k; "
            f"Google Drive links in the README of {AUTHORS_CODE}) and load it with "
            f"timm.create_model('{arch}', pretrained=True, pretrained_cfg_overlay=dict(file='best_RA.pth')), or "
            f"run `timm-nofrost export best_RA.pth --model {variant} --out DIR` and load 'local-dir:DIR'.")


@contextlib.contextmanager
def _explain_download_errors(source: str, hub_id: Optional[str] = None, variant: str = '') -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if type(e).__module__.startswith('huggingface_hub'):
            from huggingface_hub.errors import RepositoryNotFoundError
            if isinstance(e, RepositoryNotFoundError) and hub_id and hub_id.startswith(f'{HF_HUB_ORG}/'):
                e.add_note(weights_not_on_hub_note(hub_id, variant))
            e.add_note(
                f'timm-nofrost: could not fetch weights from {source}. Check the repo id, HF_ENDPOINT and '
                f'network access; offline, set HF_HUB_OFFLINE=1 after a first download, or load a local file '
                f'with pretrained_cfg_overlay=dict(file=...).')
        elif isinstance(e, FileNotFoundError) and not str(e):
            raise FileNotFoundError(f'Pretrained weights not found: {source}') from None
        raise


@contextlib.contextmanager
def explain_load_errors(source: str, file: Optional[str] = None, hub_id: Optional[str] = None,
                        variant: str = '') -> Iterator[None]:
    """Errors while loading pretrained weights name their source (and diagnose a local ``file``); a missing
    repo of the project's own Hub organisation says how to load the authors' files instead."""
    with translate_load_errors(source, file=file), _explain_download_errors(source, hub_id, variant):
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
    hub_id = cfg.hf_hub_id if cfg is not None else None
    tagged = f'{variant}.{cfg.tag}' if cfg is not None and cfg.tag else variant
    with explain_load_errors(source, file, hub_id, tagged):
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
