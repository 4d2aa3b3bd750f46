"""``normfree_converted``: any timm model, converted to normalizer-free, as a registered timm model.

A converted model's architecture is "timm model X after ``convert_to_normfree`` with options Y". Registering
that as one entrypoint makes converted models first-class timm models: ``config.json`` records
``base_model`` and ``conversion`` in ``model_args``, so folders written by ``timm-nofrost convert`` load
with ``timm.create_model('local-dir:DIR')`` / ``'hf-hub:ORG/NAME'`` like any other::

    model = timm.create_model('normfree_converted', base_model='resnet50', num_classes=10)
"""
from typing import Any, Dict, Optional

import timm
import torch.nn as nn
from timm.models import load_pretrained, register_model, resolve_pretrained_cfg
from timm.models._registry import generate_default_cfgs

from ..checkpoint import checkpoint_filter_fn
from ..convert import convert_to_normfree
from ._pretrained import describe_pretrained_source, explain_load_errors

__all__ = ['create_converted', 'CONVERTED_ARCH', 'WEIGHT_SOURCE_KEYS']

CONVERTED_ARCH = 'normfree_converted'
# pretrained-cfg keys that say where weights come from: a converted model has none of its base model's
WEIGHT_SOURCE_KEYS = ('url', 'file', 'hf_hub_id', 'hf_hub_filename', 'state_dict', 'source', 'tag')

# placeholder cfg so timm's registry knows the architecture; the real one is the base model's
default_cfgs = generate_default_cfgs({CONVERTED_ARCH: {'url': '', 'num_classes': 1000}})


def create_converted(
        base_model: str = 'resnet50',
        conversion: Optional[Dict[str, Any]] = None,
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
        **kwargs: Any,
) -> nn.Module:
    """Build ``base_model`` (random init), convert it, and load converted weights if ``pretrained``.

    ``pretrained=True`` loads normalizer-free weights saved from a converted model (from ``local-dir:``,
    ``hf-hub:``, a file or a state_dict in the pretrained config), never the base model's BN weights: to
    warm-start from those, create the BN model with ``pretrained=True`` and call ``convert_to_normfree``.
    """
    if base_model == CONVERTED_ARCH or not isinstance(base_model, str):
        raise ValueError(f'base_model must name a timm model, got {base_model!r}.')
    if base_model not in timm.list_models():
        raise ValueError(f'Unknown base_model {base_model!r}: not a registered timm model.')
    conversion = dict(conversion or {})
    model = timm.create_model(base_model, **kwargs)
    convert_to_normfree(model, **conversion)

    base_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in WEIGHT_SOURCE_KEYS}
    # no registry weights exist for a converted model: by default its cfg describes the model as built
    base_cfg['num_classes'] = getattr(model, 'num_classes', base_cfg.get('num_classes'))
    if 'input_size' in base_cfg:
        base_cfg['input_size'] = (kwargs.get('in_chans', 3), *base_cfg['input_size'][1:])
    if isinstance(pretrained_cfg, dict) or hasattr(pretrained_cfg, 'to_dict'):
        base_cfg.update(pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict())
    base_cfg['architecture'] = CONVERTED_ARCH
    cfg = resolve_pretrained_cfg(CONVERTED_ARCH, base_cfg, pretrained_cfg_overlay)
    model.pretrained_cfg = model.default_cfg = cfg.to_dict()
    if pretrained:
        source = describe_pretrained_source(cfg, CONVERTED_ARCH)
        file = cfg.file if cfg.source != 'local-dir' and cfg.state_dict is None else None
        with explain_load_errors(source, file):
            load_pretrained(
                model, pretrained_cfg=model.pretrained_cfg, num_classes=getattr(model, 'num_classes', 1000),
                in_chans=kwargs.get('in_chans', 3), filter_fn=checkpoint_filter_fn, cache_dir=cache_dir)
    return model


@register_model
def normfree_converted(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A timm model converted to normalizer-free (``base_model='resnet50'``, ``conversion={...}``)."""
    return create_converted(pretrained=pretrained, **kwargs)
