"""Convert a timm model and write it as a loadable folder (``timm-nofrost convert``)."""
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import timm

from ..checkpoint import checkpoint_filter_fn, read_state_dict, translate_load_errors
from ..hub import ExportResult, check_out_dir, write_model_folder
from ..model_card import ModelCardInfo
from .normfree import convert_to_normfree
from .report import ConversionReport

__all__ = ['convert_and_export']


def convert_and_export(
        model_name: str,
        out_dir: Union[str, Path],
        pretrained: bool = False,
        checkpoint: Optional[Union[str, Path]] = None,
        init: Optional[str] = None,
        alpha: float = 0.2,
        norms: Sequence[str] = ('batch',),
        act_layer: Optional[str] = None,
        zero_init_last: bool = True,
        strict: bool = False,
        num_classes: Optional[int] = None,
        repo_id: Optional[str] = None,
        overwrite: bool = False,
) -> Tuple[ExportResult, ConversionReport]:
    """Convert timm model ``model_name`` (optionally with its BN weights) and save it as a timm folder.

    The folder's ``config.json`` names the ``normfree_converted`` architecture with ``base_model`` and the
    conversion options, so ``timm.create_model('local-dir:OUT')`` rebuilds and loads it after
    ``import timm_nofrost``. ``init`` defaults to ``'keep'`` when weights are given, else ``'fresh'``.
    """
    from ..models.converted import CONVERTED_ARCH
    if pretrained and checkpoint:
        raise ValueError('Pass either pretrained=True or a checkpoint, not both.')
    if model_name not in timm.list_models():
        raise ValueError(f'Unknown model {model_name!r}: not a registered timm model.')
    check_out_dir(out_dir, overwrite)
    init = init or ('keep' if pretrained or checkpoint else 'fresh')
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    base = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        state_dict = read_state_dict(checkpoint)
        with translate_load_errors(f"checkpoint '{checkpoint}'"):
            base.load_state_dict(checkpoint_filter_fn(state_dict, base))

    conversion = dict(alpha=alpha, init=init, norms=list(norms), act_layer=act_layer, zero_init_last=zero_init_last)
    model = convert_to_normfree(base, strict=strict, **conversion)
    report: ConversionReport = model.normfree_report
    conversion['act_layer'] = report.activation  # record what was used, not what was detected
    model._model_args = dict(base_model=model_name, conversion=conversion, num_classes=model.num_classes)
    cfg = {k: v for k, v in model.pretrained_cfg.items()
           if k not in ('url', 'file', 'hf_hub_id', 'hf_hub_filename', 'state_dict', 'source', 'tag')}
    model.pretrained_cfg = model.default_cfg = dict(cfg, architecture=CONVERTED_ARCH)

    weights = 'pretrained weights' if pretrained else (f'weights from {Path(checkpoint).name}' if checkpoint
                                                       else 'fresh weights')
    card = ModelCardInfo(
        model_name=CONVERTED_ARCH,
        repo_id=repo_id or f'<your-org>/{model_name}_normfree',
        num_params=sum(p.numel() for p in model.parameters()),
        num_classes=model.num_classes,
        input_size=tuple(model.pretrained_cfg.get('input_size', (3, 224, 224))),
        description=(f'timm `{model_name}` converted to a normalizer-free network by '
                     f'`timm_nofrost.convert_to_normfree` (alpha={alpha}, init={init}, {weights}); '
                     f'{len(report.norms_removed)} normalization layers removed, {len(report.blocks)} residual '
                     f'blocks rescaled. Train it with NoFrost adversarial training before use.'),
        source_checkpoint=Path(checkpoint).name if checkpoint else None,
        dataset=None,
        architecture=f'`{model_name}` with every normalizer removed and scaled weight-standardised convs',
    )
    return write_model_folder(model, out_dir, card, overwrite=overwrite), report
