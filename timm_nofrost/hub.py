"""Export checkpoints to Hub-ready folders, push them, and list the NoFrost family.

``export_checkpoint`` turns the authors' ``.pth`` files (or any compatible checkpoint) into the folder
layout timm reads with ``hf-hub:`` and ``local-dir:``: ``model.safetensors``, ``config.json`` in timm's
format, and a model card. Writing goes through timm's own ``save_for_hf``. ``convert_and_export`` writes a
model converted by ``convert_to_normfree`` the same way (``timm-nofrost convert``), and so does
``export_checkpoint(..., convert=True)`` for the weights of a model trained with ``train --convert``. An evaluation
report (``timm-nofrost eval --out``) given to ``export_checkpoint`` or ``push_folder`` becomes the card's
``model-index`` metadata.
"""
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
from huggingface_hub.utils.sha import sha_fileobj
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, save_for_hf, split_model_name_tag

from .files import atomic_write, check_writable_dir
from .checkpoint import CHECKSUM_KEY, CheckpointError, content_checksum, load_checkpoint, read_state_dict
from .model_card import ModelCardInfo, check_eval_report, model_index, render_model_card, with_metadata

__all__ = ['ExportResult', 'ModelInfo', 'export_checkpoint', 'write_model_folder', 'push_folder', 'list_nofrost_models',
           'convert_and_export', 'read_eval_report']

EvalReport = Union[str, Path, Mapping[str, Any]]  # a report file (timm-nofrost eval --out), its dict or a RobustReport

_REPO_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$')
_REQUIRED_FILES = ('model.safetensors', 'config.json')


@dataclass
class ExportResult:
    """What ``export_checkpoint`` wrote."""
    out_dir: str
    model_name: str
    tag: Optional[str]
    repo_id: str
    num_classes: int
    in_chans: int
    num_params: int
    files: List[str]
    sha256: str  # of model.safetensors
    max_abs_diff: float  # reloaded-from-folder vs in-memory logits, 0.0 for a faithful export

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class ModelInfo:
    """One registered ``*_nofrost`` model or pretrained tag."""
    name: str
    num_params: int
    input_size: List[int]
    num_classes: int
    pretrained: bool
    hf_hub_id: Optional[str] = None
    description: Optional[str] = None
    tags: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _sha256(path: Path) -> str:
    with path.open('rb') as f:
        return sha_fileobj(f).hex()


def _infer_shape(state_dict: Dict[str, torch.Tensor], name: Optional[str], dim: int) -> Optional[int]:
    weight = state_dict.get(f'{name}.weight') if name else None
    return int(weight.shape[dim]) if weight is not None and weight.ndim > dim else None


def check_out_dir(out_dir: Union[str, Path], overwrite: bool) -> Path:
    """A new or empty folder we can write (or any folder with ``overwrite``), checked before any work."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f'Output folder {out_dir} exists and is not a folder.')
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f'Output folder {out_dir} is not empty; pass overwrite=True (CLI: --overwrite).')
    if check_writable_dir(out_dir):
        out_dir.rmdir()  # created only to check; the export creates it again when it writes
    return out_dir


_SOURCES = ('hf-hub:', 'local-dir:')  # timm's model sources whose config.json names the architecture


def _resolve_model_name(model_name: str) -> tuple:
    """(architecture, pretrained tag or None) of a registered name; for an ``hf-hub:`` / ``local-dir:`` name, the
    architecture its config.json names (read through timm) and no tag."""
    if model_name.startswith(_SOURCES):
        return _source_config(model_name)[0], None
    arch, tag = split_model_name_tag(model_name)
    if arch not in timm.list_models():
        raise ValueError(f'Unknown model {arch!r}; NoFrost models: {", ".join(timm.list_models("*nofrost*"))} '
                         f'(any timm model name is accepted).')
    known = [name.split('.', 1)[1] for name in get_arch_pretrained_cfgs(arch) if '.' in name]
    if tag and tag not in known:
        raise ValueError(f'Unknown pretrained tag {tag!r} for {arch}; accepted tags: {", ".join(known) or "none"}.')
    return arch, tag or None


def export_checkpoint(
        checkpoint: Union[str, Path],
        out_dir: Union[str, Path],
        model_name: str = 'nf_resnet50_nofrost',
        repo_id: Optional[str] = None,
        num_classes: Optional[int] = None,
        overwrite: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        convert: bool = False,
        eval_report: Optional[EvalReport] = None,
) -> ExportResult:
    """Write a Hub-ready folder (safetensors, timm ``config.json``, model card) from a checkpoint.

    Args:
        checkpoint: The authors' ``best_RA.pth`` / ``latest.pth``, a timm checkpoint or a safetensors file.
        out_dir: Folder to create; refused if it exists and is not empty, unless ``overwrite``.
        model_name: timm architecture, optionally with a pretrained tag (``nf_resnet50_nofrost.at_in1k``)
            whose pretrained config (preprocessing, description) the export carries; or, as ``train --model`` takes
            it, ``hf-hub:ORG/NAME`` / ``local-dir:DIR``, whose config.json gives the architecture, its arguments
            and preprocessing.
        repo_id: Hub repo the folder is meant for, used in the model card; defaults to the tag's
            ``hf_hub_id``, else ``<your-org>/<model_name>``.
        num_classes: Classes of the checkpoint; inferred from its classifier when omitted.
        overwrite: Replace the contents of a non-empty ``out_dir``.
        model_kwargs: Extra architecture arguments for ``timm.create_model`` (recorded in ``config.json``).
        convert: The checkpoint holds a BatchNorm model made normalizer-free by ``convert_to_normfree`` (``train
            --convert``): ``model_name`` is built, converted, given the weights, and written as the registered
            ``normfree_converted`` architecture, which ``local-dir:`` / ``hf-hub:`` rebuild the same way.
        eval_report: An evaluation of these weights (``timm-nofrost eval --out`` file, its dict or a
            ``RobustReport``): its results go into the card's ``model-index`` metadata (``model_card.model_index``).

    Returns:
        An ``ExportResult``; the folder is verified by reloading it through ``local-dir:``.
    """
    arch, tag = _resolve_model_name(model_name)
    model_kwargs, num_classes, kwargs_chans = _split_model_kwargs(model_kwargs, num_classes)
    check_out_dir(out_dir, overwrite)
    if repo_id is not None and not _REPO_ID.match(repo_id):
        raise ValueError(f"Invalid repo_id {repo_id!r}: expected 'organisation/name'.")
    report = read_eval_report(eval_report) if eval_report is not None else None

    state_dict = read_state_dict(checkpoint)  # safe read: safetensors or torch.load(weights_only=True)
    base_cfg = _export_cfg(model_name if model_name.startswith(_SOURCES) else arch, tag)
    num_classes, in_chans = _checkpoint_shape(state_dict, base_cfg, num_classes, checkpoint, kwargs_chans)
    input_size = tuple(base_cfg.get('input_size', (3, 224, 224)))
    model = _model_from_checkpoint(arch, tag, input_size, num_classes, in_chans, model_kwargs, state_dict, checkpoint,
                                   convert=convert, source=model_name if model_name.startswith(_SOURCES) else None)
    del state_dict

    if report is not None and not convert:
        _check_report_weights(report, model, checkpoint)
    card = _export_card(model, input_size, arch, tag, base_cfg, repo_id, Path(checkpoint).name, convert)
    metadata = None if report is None else {'model-index': model_index(report, _index_name(card.repo_id))}
    return write_model_folder(model, out_dir, card, overwrite=overwrite, tag=tag, in_chans=in_chans,
                              extra_metadata=metadata)


def _check_report_weights(report: Dict[str, Any], model: torch.nn.Module, checkpoint: Union[str, Path]) -> None:
    """Refuse a report that says it evaluated other weights (its ``identity``: ``timm-nofrost eval --out`` records
    the weights' checksum), so that a card never shows another model's results."""
    recorded = (report.get('identity') or {}).get('model weights')
    if recorded is None:
        return
    exported = content_checksum(model.state_dict())
    if recorded != exported:
        raise ValueError(f'The evaluation report is of other weights ({recorded[:19]}...) than {checkpoint} '
                         f'({exported[:19]}...): evaluate this checkpoint (timm-nofrost eval --checkpoint '
                         f'{checkpoint} ... --out REPORT.json) and pass that report.')


def _export_card(model: torch.nn.Module, input_size: tuple, arch: str, tag: Optional[str], base_cfg: Dict[str, Any],
                 repo_id: Optional[str], source: str, convert: bool) -> ModelCardInfo:
    """The card of an exported checkpoint: the tag's description, or for a converted model what it was made from."""
    dataset = 'imagenet-1k' if model.num_classes == 1000 else None
    if not convert:
        return _card_for(model, input_size, model_name=arch, tag=tag, dataset=dataset, source_checkpoint=source,
                         repo_id=repo_id or base_cfg.get('hf_hub_id') or f'<your-org>/{arch}',
                         description=base_cfg.get('description', ''))
    from .models.converted import CONVERTED_ARCH
    return _card_for(
        model, input_size, model_name=CONVERTED_ARCH, repo_id=repo_id or f'<your-org>/{arch}_normfree',
        description=(f'timm `{arch}` made normalizer-free by `timm_nofrost.convert_to_normfree` and trained '
                     f'(weights from `{source}`).'), source_checkpoint=source, dataset=dataset,
        architecture=f'`{arch}` with every normalizer removed and scaled weight-standardised convs')


def _split_model_kwargs(model_kwargs: Optional[Mapping[str, Any]], num_classes: Optional[int]
                        ) -> Tuple[Dict[str, Any], Optional[int], Optional[int]]:
    """(architecture arguments, classes, input channels): ``num_classes`` and ``in_chans`` given among the model
    arguments are checked against the checkpoint like ``num_classes`` (two different class counts are refused)."""
    model_kwargs = dict(model_kwargs or {})
    given = model_kwargs.pop('num_classes', None)
    if given is not None and num_classes is not None and given != num_classes:
        raise ValueError(f'num_classes={num_classes} and model_kwargs num_classes={given} disagree: give one.')
    return model_kwargs, num_classes if num_classes is not None else given, model_kwargs.pop('in_chans', None)


def _index_name(repo_id: str) -> str:
    """The model's name in its card's model-index: the Hub repo's name."""
    return repo_id.rsplit('/', 1)[-1]


def read_eval_report(report: EvalReport) -> Dict[str, Any]:
    """An evaluation report as a dict: read from a ``timm-nofrost eval --out`` JSON file, or given as its dict or
    as a ``RobustReport``; anything that is not one is a ValueError saying what it lacks."""
    if hasattr(report, 'to_dict'):
        report = report.to_dict()
    if isinstance(report, (str, Path)):
        path = Path(report)
        if not path.is_file():
            raise FileNotFoundError(f'Evaluation report not found: {path} (write one with timm-nofrost eval --out).')
        try:
            report = json.loads(path.read_text(encoding='utf-8'))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f'evaluation report {path} is not JSON ({e}); pass the file written by '
                             f'timm-nofrost eval --out.') from None
        try:
            return dict(check_eval_report(report))
        except ValueError as e:
            raise ValueError(f'{path}: {e}') from None
    return dict(check_eval_report(report))


def _export_cfg(arch: str, tag: Optional[str]) -> Dict[str, Any]:
    """The pretrained config an export carries: the tag's, or without a tag the architecture's default (an
    ``hf-hub:`` / ``local-dir:`` name: its config.json's) less the identity (description, notes, Hub id) of
    published weights an arbitrary checkpoint is not."""
    if arch.startswith(_SOURCES):
        cfg = _source_config(arch)[1]
    else:
        cfg = get_pretrained_cfg(f'{arch}.{tag}' if tag else arch)
        cfg = cfg.to_dict() if cfg is not None else {}
    return cfg if tag else {k: v for k, v in cfg.items() if k not in ('description', 'notes', 'hf_hub_id')}


def _source_config(model_name: str) -> Tuple[str, Dict[str, Any]]:
    """(architecture, pretrained config) from the config.json of an ``hf-hub:`` / ``local-dir:`` model, read by
    timm's own loaders (``hf-hub:`` downloads it, or reads the cache offline)."""
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path
    source, _, location = model_name.partition(':')
    if source == 'local-dir':
        cfg, arch, _ = load_model_config_from_path(location)
    else:
        cfg, arch, _ = load_model_config_from_hf(location)
    if arch not in timm.list_models():
        raise ValueError(f'{model_name} names an unknown architecture {arch!r}.')
    return arch, cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)


def _checkpoint_shape(state_dict: Dict[str, torch.Tensor], base_cfg: Dict[str, Any], num_classes: Optional[int],
                      checkpoint: Union[str, Path], in_chans: Optional[int] = None) -> Tuple[int, int]:
    """(classes, input channels) of a checkpoint, read from its classifier and first conv where it has them; a
    ``num_classes`` or ``in_chans`` that disagrees with them is refused."""
    ckpt_classes = _infer_shape(state_dict, base_cfg.get('classifier'), 0)
    if num_classes is not None and ckpt_classes is not None and num_classes != ckpt_classes:
        raise ValueError(f'num_classes={num_classes} disagrees with checkpoint {checkpoint}, whose classifier '
                         f'has {ckpt_classes} outputs; omit num_classes to export the checkpoint as it is.')
    ckpt_chans = _infer_shape(state_dict, base_cfg.get('first_conv'), 1)
    if in_chans is not None and ckpt_chans is not None and in_chans != ckpt_chans:
        raise ValueError(f'in_chans={in_chans} disagrees with checkpoint {checkpoint}, whose first conv takes '
                         f'{ckpt_chans} channels; omit in_chans to export the checkpoint as it is.')
    return ckpt_classes or num_classes or base_cfg.get('num_classes', 1000), ckpt_chans or in_chans or 3


def _model_from_checkpoint(arch: str, tag: Optional[str], input_size: tuple, num_classes: int, in_chans: int,
                           model_kwargs: Optional[Dict[str, Any]], state_dict: Dict[str, torch.Tensor],
                           checkpoint: Union[str, Path], convert: bool = False,
                           source: Optional[str] = None) -> torch.nn.Module:
    """``arch`` with the tag's pretrained config (or built from ``source``, an ``hf-hub:`` / ``local-dir:`` name, as
    ``train --model`` builds it), sized to the checkpoint (converted to normalizer-free as ``train --convert`` does
    with ``convert``) and holding its weights, in eval mode."""
    overlay = dict(num_classes=num_classes, input_size=(in_chans, *input_size[1:]))
    if not tag:
        # an arbitrary checkpoint is not the default tag's published weights: do not inherit its identity
        overlay.update(tag=None, description=None, notes=None, hf_hub_id=None)
    model = timm.create_model(
        source or arch, pretrained_cfg=None if source else tag, pretrained_cfg_overlay=overlay,
        num_classes=num_classes, in_chans=in_chans, **(model_kwargs or {}))
    if convert:  # train --convert's conversion (its defaults, weights re-initialised: the checkpoint replaces them)
        model = _as_converted(model, arch, dict(alpha=0.2, init='fresh', norms=['batch'], act_layer=None,
                                                zero_init_last=True),
                              instead='; export it without converting (CLI: without --convert)')
    try:
        load_checkpoint(model, state_dict)  # the package's one loader: every key and shape checked
    except CheckpointError as e:
        e = e.with_source(f"checkpoint '{checkpoint}'", checkpoint)
        if not (e.missing or e.unexpected or e.mismatched):
            raise e from None
        built = f' (the model: {arch} converted with convert_to_normfree)' if convert else ''
        raise CheckpointError(
            f'{e}{built} Pass the model flags it was trained with (--model, --num-classes, --model-kwargs, and '
            f'--convert exactly for a model trained with train --convert; train prints the export command). A model '
            f'whose layers were replaced after timm built it, such as the CIFAR BatchNorm twin of --compare-bn and the '
            f'study\'s bn arms, has no timm architecture to export.', path=checkpoint,
            missing=e.missing, unexpected=e.unexpected, mismatched=e.mismatched) from None
    return model.eval()


def _as_converted(base: torch.nn.Module, base_name: str, conversion: Dict[str, Any], strict: bool = False,
                  instead: str = '') -> torch.nn.Module:
    """``base`` (made by ``timm.create_model(base_name, ...)``) through ``convert_to_normfree(**conversion)``,
    described as the registered ``normfree_converted`` architecture: ``config.json`` records the base model, its
    arguments and the conversion, so ``local-dir:`` / ``hf-hub:`` rebuild the same network. A model with no
    normalizer to remove is refused (``instead``: what to do then)."""
    from .convert import convert_to_normfree
    from .models.converted import CONVERTED_ARCH, WEIGHT_SOURCE_KEYS
    base_args = dict(getattr(base, '_model_args', None) or {})
    model = convert_to_normfree(base, strict=strict, **conversion)
    report = model.normfree_report
    if not report.norms_removed:  # a normalizer-free model: nothing to export as a converted one
        raise ValueError(f'{base_name}: nothing to convert, no {"/".join(conversion["norms"])} normalization layer to '
                         f'remove{instead}.')
    conversion = dict(conversion, act_layer=report.activation)  # record what was used, not what was detected
    model._model_args = dict(base_args, base_model=base_name, conversion=conversion, num_classes=model.num_classes)
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in WEIGHT_SOURCE_KEYS}
    model.pretrained_cfg = model.default_cfg = dict(cfg, architecture=CONVERTED_ARCH)
    return model


def _card_for(model: torch.nn.Module, default_input_size: tuple, **fields: Any) -> ModelCardInfo:
    """The model card of ``model``: its parameter count, classes and input size, and ``fields``."""
    return ModelCardInfo(num_params=sum(p.numel() for p in model.parameters()), num_classes=model.num_classes,
                         input_size=tuple(model.pretrained_cfg.get('input_size', default_input_size)), **fields)


def write_model_folder(
        model: torch.nn.Module,
        out_dir: Union[str, Path],
        card: ModelCardInfo,
        overwrite: bool = False,
        tag: Optional[str] = None,
        in_chans: int = 3,
        extra_metadata: Optional[Mapping[str, Any]] = None,
) -> ExportResult:
    """Save ``model`` with timm's ``save_for_hf`` plus a model card (``extra_metadata`` added to its front matter,
    e.g. ``model-index``), verified, moved into place atomically."""
    out_dir = check_out_dir(out_dir, overwrite)
    model.eval()
    # write next to the destination, then move into place: a failed export leaves no half-written folder
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix='.export-', dir=out_dir.parent))
    try:
        save_for_hf(model, str(staging), safe_serialization=True)
        _add_checksum(staging / 'model.safetensors')
        (staging / 'README.md').write_text(render_model_card(card, extra_metadata), encoding='utf-8')
        max_abs_diff = _verify_export(model, staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    return ExportResult(
        out_dir=str(out_dir), model_name=card.model_name, tag=tag, repo_id=card.repo_id, num_classes=model.num_classes,
        in_chans=in_chans, num_params=card.num_params, files=sorted(p.name for p in out_dir.iterdir()),
        sha256=_sha256(out_dir / 'model.safetensors'), max_abs_diff=max_abs_diff)


def _add_checksum(path: Path) -> None:
    """Record the weights' checksum in the safetensors metadata, verified by every ``read_checkpoint``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), 'pt') as f:
        metadata = f.metadata() or {}
    weights = load_file(str(path))
    save_file(weights, str(path), metadata={**metadata, CHECKSUM_KEY: content_checksum(weights)})


def _verify_export(model: torch.nn.Module, folder: Path) -> float:
    """Reload ``folder`` the way users will (``local-dir:``) and compare logits with ``model``."""
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    in_chans, height, width = model.pretrained_cfg['input_size']
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, in_chans, min(height, 64), min(width, 64), generator=generator)
    with torch.no_grad():
        diff = (model(x) - reloaded(x)).abs().max().item()
    if diff != 0.0:
        raise CheckpointError(f'exported folder {folder} does not reproduce the model (max |diff| {diff:.3g}).')
    return diff


def push_folder(
        folder: Union[str, Path],
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: str = 'Add NoFrost weights (timm-nofrost export)',
        create_pr: bool = False,
        eval_report: Optional[EvalReport] = None,
) -> str:
    """Upload an exported folder to the Hugging Face Hub with ``huggingface_hub``.

    The token comes from ``token``, else ``HF_TOKEN`` or the user's ``hf auth login``; it is never printed.
    ``eval_report`` (a ``timm-nofrost eval --out`` file, its dict or a ``RobustReport``): its results are written
    into the ``model-index`` metadata of the folder's ``README.md`` before the upload, the card's text and other
    metadata kept.

    Returns:
        The URL of the commit.
    """
    folder = Path(folder)
    if not _REPO_ID.match(repo_id or ''):
        raise ValueError(f"Invalid repo_id {repo_id!r}: expected 'organisation/name'.")
    if not folder.is_dir():
        raise FileNotFoundError(f'Folder to push not found: {folder}')
    missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f'{folder} is not an exported model folder: missing {", ".join(missing)} '
                         f'(create it with `timm-nofrost export`).')
    try:
        architecture = json.loads((folder / 'config.json').read_text(encoding='utf-8'))['architecture']
    except (ValueError, KeyError) as e:
        raise ValueError(f'{folder / "config.json"} is not a timm model config: {e}') from None
    if architecture not in timm.list_models():
        raise ValueError(f'{folder / "config.json"} names an unknown architecture {architecture!r}.')
    if eval_report is not None:
        index = model_index(read_eval_report(eval_report), _index_name(repo_id))
        readme = folder / 'README.md'
        card = readme.read_text(encoding='utf-8') if readme.is_file() else ''
        atomic_write(readme, with_metadata(card, {'model-index': index}))

    from huggingface_hub import HfApi
    api = HfApi(token=token, library_name='timm-nofrost')
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                               commit_message=commit_message, create_pr=create_pr)
    return str(getattr(commit, 'commit_url', commit))


def list_nofrost_models(pattern: str = '*nofrost*', pretrained: bool = False) -> List[ModelInfo]:
    """Describe the registered NoFrost models (and their pretrained tags), parameters counted on ``meta``."""
    infos = []
    for name in timm.list_models(pattern, pretrained=pretrained):
        arch, tag = split_model_name_tag(name)
        cfg = get_pretrained_cfg(name)
        with torch.device('meta'):
            model = timm.create_model(arch)
        infos.append(ModelInfo(
            name=name, num_params=sum(p.numel() for p in model.parameters()), input_size=list(cfg.input_size),
            num_classes=cfg.num_classes, pretrained=bool(cfg.has_weights), hf_hub_id=cfg.hf_hub_id,
            description=cfg.description,
            tags=[] if pretrained else [n.split('.', 1)[1] for n in timm.list_pretrained(arch) if '.' in n]))
    return infos


# -- converted models -------------------------------------------------------------------------------------
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
) -> Tuple[ExportResult, Any]:
    """Convert timm model ``model_name`` (optionally with its BN weights) and save it as a timm folder;
    returns the export result and the ``ConversionReport``.

    The folder's ``config.json`` names the ``normfree_converted`` architecture with ``base_model`` and the
    conversion options, so ``timm.create_model('local-dir:OUT')`` rebuilds and loads it after
    ``import timm_nofrost``. ``init`` defaults to ``'keep'`` when weights are given, else ``'fresh'``.
    """
    from .models.converted import CONVERTED_ARCH
    if pretrained and checkpoint:
        raise ValueError('Pass either pretrained=True or a checkpoint, not both.')
    if model_name not in timm.list_models():
        raise ValueError(f'Unknown model {model_name!r}: not a registered timm model.')
    check_out_dir(out_dir, overwrite)
    init = init or ('keep' if pretrained or checkpoint else 'fresh')
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    base = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        load_checkpoint(base, checkpoint)

    conversion = dict(alpha=alpha, init=init, norms=list(norms), act_layer=act_layer, zero_init_last=zero_init_last)
    model = _as_converted(base, model_name, conversion, strict=strict)
    report = model.normfree_report

    weights = 'pretrained weights' if pretrained else (f'weights from {Path(checkpoint).name}' if checkpoint
                                                       else 'fresh weights')
    card = _card_for(
        model, (3, 224, 224), model_name=CONVERTED_ARCH, repo_id=repo_id or f'<your-org>/{model_name}_normfree',
        description=(f'timm `{model_name}` converted to a normalizer-free network by '
                     f'`timm_nofrost.convert_to_normfree` (alpha={alpha}, init={init}, {weights}); '
                     f'{len(report.norms_removed)} normalization layers removed, {len(report.blocks)} residual '
                     f'blocks rescaled. Train it with NoFrost adversarial training before use.'),
        source_checkpoint=Path(checkpoint).name if checkpoint else None,
        dataset=None,
        architecture=f'`{model_name}` with every normalizer removed and scaled weight-standardised convs',
    )
    return write_model_folder(model, out_dir, card, overwrite=overwrite), report
