"""What a finished run reports: the final table, results JSON, and the follow-up evaluation and export commands."""
import json
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

from timm.models import split_model_name_tag

from ..attacks.threat import ThreatModel
from ..files import atomic_json  # re-exported: the one atomic JSON writer
from .train_config import CHECKPOINT_BEST, TrainConfig

EXPORT_DIR = 'hub'  # the folder export_command suggests, inside the run's folder

__all__ = ['final_table', 'atomic_json', 'eval_command', 'export_command', 'config_to_json', 'jsonable_kwargs']


def final_table(results: Dict[str, Any]) -> str:
    """A Markdown table: one row per trained model, one column per final attack; a run whose history shows
    catastrophic overfitting is marked in its row and gets a warning line with what to do under the table."""
    runs = list(results['runs'].values())
    attacks = runs[0]['final']['attacks']
    lines = ['| model | ' + ' | '.join(attacks) + ' |', '|' + '---|' * (len(attacks) + 1)]
    warnings = []
    for run in runs:
        overfit = run.get('catastrophic_overfitting')
        name = f"{run['name']} (catastrophic overfitting)" if overfit else run['name']
        lines.append(f'| {name} | ' + ' | '.join(f"{run['final']['accuracy'][a]:.1f} %" for a in attacks) + ' |')
        if overfit:
            warnings.append(f"Warning: {run['name']}: {overfit['message']}")
    adv = results['config']['adv']
    method = adv.get('method', 'nofrost')
    trained = ('standard training' if method == 'nofrost' and adv.get('adv_weight') == 0
               else f"trained with {method} on {adv.get('attack', 'pgd')} examples")
    return (f"Accuracy on {runs[0]['final']['n_examples']} validation images (spread evenly over the set), "
            f"{ThreatModel(adv['eps'], adv['norm'])} (worst case = lowest over attacks per image; "
            f"{trained}):\n" + '\n'.join(lines + warnings))


def jsonable_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def config_to_json(cfg: TrainConfig) -> Dict[str, Any]:
    d = asdict(cfg)
    return {**d, 'model_kwargs': jsonable_kwargs(d['model_kwargs'])}


def _model_flags(cfg: TrainConfig, num_classes: int, model: Optional[str] = None) -> list:
    """The flags that rebuild the run's model: ``--model`` (``model``, default the run's), ``--num-classes``,
    ``--model-kwargs``, ``--convert``."""
    parts = [f'--model {shlex.quote(model or cfg.model)}', f'--num-classes {num_classes}']
    if cfg.model_kwargs:
        parts.append(f"--model-kwargs {shlex.quote(json.dumps(jsonable_kwargs(cfg.model_kwargs)))}")
    if cfg.convert:
        parts.append('--convert')  # build the BN model, convert it, then load the trained weights
    return parts


def eval_command(cfg: TrainConfig, out_dir: Path, num_classes: int) -> str:
    """The ``timm-nofrost eval`` command line that re-evaluates the best checkpoint with stronger attacks.

    It evaluates exactly the run's validation images at the run's resolution: the same ``--data`` (with
    ``--data-dir`` for a timm dataset name, ``--val-fraction`` / ``--split-seed`` for the held-out part of a
    single folder), the same ``--img-size``, and ``--convert`` for a model converted before training.
    """
    from ..data.sources import resolve_source
    parts = ['timm-nofrost eval', *_model_flags(cfg, num_classes)]
    parts += [f'--checkpoint {shlex.quote(str(out_dir / CHECKPOINT_BEST))}', f'--data {shlex.quote(cfg.data)}']
    kind = resolve_source(cfg.data, cfg.data_dir).kind
    if kind == 'timm' and cfg.data_dir is not None:
        parts.append(f'--data-dir {shlex.quote(str(cfg.data_dir))}')
    elif kind == 'folder':
        parts.append(f'--val-fraction {cfg.val_fraction!r} --split-seed {cfg.data_split_seed}')
    if cfg.img_size is not None:
        parts.append(f'--img-size {cfg.img_size}')
    parts += ['--attacks clean,pgd-20,apgd-ce,apgd-t',
              f'--eps {cfg.adv.threat.label}' + ('' if cfg.adv.norm == 'Linf' else ' --norm L2')]
    return ' '.join(parts)


def export_command(cfg: TrainConfig, out_dir: Path, num_classes: int) -> str:
    """The ``timm-nofrost export`` command line that writes the best checkpoint as a Hub-ready folder: the same
    model flags as ``eval_command`` (a converted model is written as ``normfree_converted``), and ``OUT_DIR/hub``
    as the folder (add ``--eval-report`` with the JSON of the stronger evaluation for the card's results).

    A pretrained tag is left out of ``--model`` (``nf_resnet50_nofrost``, not ``nf_resnet50_nofrost.at_in1k``): an
    export with a tag says the weights are the tag's published ones (its card text, usage and Hub repo), and a
    run's weights are not."""
    model = cfg.model if cfg.model.startswith(('hf-hub:', 'local-dir:')) else split_model_name_tag(cfg.model)[0]
    return ' '.join(['timm-nofrost export', shlex.quote(str(out_dir / CHECKPOINT_BEST)),
                     *_model_flags(cfg, num_classes, model), f'--out {shlex.quote(str(out_dir / EXPORT_DIR))}'])
