"""``run_study``: every arm x seed as an ordinary ``train`` run, then one evaluation protocol for all.

Layout of a study folder::

    OUT/study.json                      what the study is (data, model, schedule, protocol, arms, seeds)
    OUT/runs/ARM/seed-S/                a ``timm-nofrost train`` run (checkpoints, summary.jsonl, results.json)
    OUT/runs/ARM/seed-S/eval.json       the study's evaluation of the run's final weights
    OUT/report.md, report.json, *.png   the aggregate (``timm_nofrost.study.aggregate``)

A run with ``eval.json`` is finished and skipped; one with ``results.json`` is trained and only evaluated; one
with ``checkpoint-last.pth`` resumes (``--deterministic`` makes the resumed run end with the weights of an
uninterrupted one). Every model is evaluated on the same images, at the same eps, with the same attacks and
attack seed; the final weights are evaluated (not the best checkpoint, which train selects on these images).
"""
import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Subset

from ..attacks import parse_attack
from ..attacks.autoattack import autoattack_available
from ..checkpoint import CheckpointError, load_checkpoint
from ..data.sources import (DEMO_IMG_SIZE, build_datasets, pixel_eval_transform, resolve_source,
                            source_data_config, spread_indices)
from ..training import run as training_run  # looked up at call time: tests replace train
from ..training.baseline import bn_twin_name, create_bn_twin
from ..training.batch_stats import batch_statistics_layers
from ..training.checkpointing import load_training_checkpoint
from ..training.results import jsonable_kwargs
from ..files import atomic_json, hold_folder
from ..settings import float_list, int_list, iter_settings, setting, setting_of
from ..training.adversarial import AdversarialConfig
from ..training.presets import chain, resolve
from ..training.train_config import CHECKPOINT_LAST, TrainConfig, resolve_config
from ..evaluate import EvalSet, Protocol, evaluate
from ..evaluate.journal import differences
from .arms import ARMS, PER_ARM, Arm
from .layout import EVAL_FILE, EVAL_PROGRESS, STUDY_FILE, read_record, reading, run_dir, run_state

__all__ = ['StudyConfig', 'StudyError', 'run_study', 'run_dir', 'run_state', 'STUDY_FILE', 'EVAL_FILE', 'PER_RUN']

_STUDY_VERSION = 1


class StudyError(ValueError):
    """A study that cannot start: bad arms, a model an arm cannot build, a folder holding another study."""


# TrainConfig settings the study decides per run or per arm: not study-wide flags
PER_RUN = ('convert', 'compare_bn', 'final_attacks', 'out_dir', 'resume', 'overwrite', 'seed',
           'initial_checkpoint') + PER_ARM
# settings the study records under its protocol rather than its schedule (study.json layout)
_PROTOCOL_TRAIN_KEYS = ('split_seed', 'baseline_model')


@dataclass
class StudyConfig:
    """A study: arms x seeds trained with one schedule (``train``) and evaluated with one protocol.

    ``None`` values are the presets' (``timm_nofrost.training.presets``: ``study``, or ``demo-study`` on the demo
    data), resolved by the same function for the CLI and for Python.

    Args:
        train: The schedule every run shares (data, model, epochs, optimizer, ...). Its ``adv`` gives the study's
            eps, norm, PGD steps and step size; each arm sets method, attack, weights and batch mode on top.
            ``seed``, ``out_dir``, ``resume`` and ``compare_bn`` are the study's to set per run; its
            ``split_seed`` (default 0) and ``baseline_model`` (the BatchNorm model of the ``bn`` arms, default:
            the twin of ``train.model``) are the same for every run.
        arms: The arms (``timm_nofrost.study.ARMS`` or your own ``Arm``); None: the paper's four.
        seeds, out_dir, eval_*, curve_*, analysis: as their settings' help says. Every arm runs with each seed;
            the protocol (images, attacks, attack seed, and batch size: results depend on it, as random starts
            are drawn per batch) is the same for every model.
    """
    train: TrainConfig = field(default_factory=TrainConfig, metadata={'nested': TrainConfig, 'exclude': PER_RUN})
    arms: Optional[List[Arm]] = None
    seeds: Optional[List[int]] = setting(None, group='study', type=int_list, metavar='LIST',
                                         help='training seeds, comma-separated')
    out_dir: str = setting('output/study', group='study', flag='--out', metavar='DIR', help='study folder')
    eval_examples: Optional[int] = setting(None, group='protocol', type=int, metavar='N',
                                           help='validation images, spread evenly over the set')
    eval_attacks: Optional[str] = setting(
        None, group='protocol', metavar='LIST',
        help="attacks at the study eps; fast-worst-case is the fast protocol (APGD-CE, then APGD-T on linearly "
             "ranked targets; AutoAttack's FAB-T and Square only where a sanity check flags a model); add autoattack "
             '(the official one, needs the pyautoattack package; its Square attack alone takes minutes per model on a '
             'CPU) to compare the two on the same images')
    curve_attack: Optional[str] = setting(None, group='protocol', metavar='NAME',
                                          help='attack of the accuracy-vs-eps curve')
    curve_eps: Sequence[float] = setting((0.25, 0.5, 1.0, 1.5, 2.0), group='protocol', type=float_list,
                                         metavar='LIST', help='eps of the curve, as multiples of --adv-eps')
    eval_seed: int = setting(0, group='protocol', type=int, metavar='SEED',
                             help="seed of the attacks' random starts")
    eval_batch_size: int = setting(
        128, group='protocol', type=int, metavar='N',
        help="images per evaluation batch; on a CPU one batch for all --eval-examples is fastest, as AutoAttack's "
             'Square attack and APGD-T pay a fixed cost per batch')
    analysis: bool = setting(True, group='protocol', negate=True,
                             help='skip the decision-margin and smoothness analysis')

    def identity(self) -> Dict[str, Any]:
        """What makes two invocations the same study (arms and seeds may grow; see ``study.json``): every setting
        that can change a run's outcome, less what each run or arm sets."""
        t = self.train
        skip = PER_RUN + _PROTOCOL_TRAIN_KEYS + ('adv',)  # the adversarial settings have their own entry
        schedule = {f.name: getattr(t, f.name) for f in iter_settings(TrainConfig, skip) if setting_of(f).outcome}
        schedule['model_kwargs'] = jsonable_kwargs(t.model_kwargs)
        adv = {f.name: getattr(t.adv, f.name) for f in iter_settings(AdversarialConfig, PER_ARM)}
        protocol = {f.name: getattr(self, f.name) for f in iter_settings(StudyConfig, ('train', 'seeds', 'out_dir'))}
        protocol.update({k: getattr(t, k) for k in _PROTOCOL_TRAIN_KEYS}, curve_eps=[float(m) for m in self.curve_eps])
        return {'version': _STUDY_VERSION, 'schedule': schedule, 'adversarial': adv, 'protocol': protocol}


# -- configuration and checks ----------------------------------------------------------------------------
def _resolved(cfg: StudyConfig) -> StudyConfig:
    """Fill the study's unset settings from the presets (the demo study's on the demo data), resolve the schedule
    and check the protocol."""
    presets = chain(cfg.train.data, study=True)
    t = resolve_config(replace(cfg.train, compare_bn=False, resume=None, convert=False), presets=presets)
    own = resolve({f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ('train', 'arms')}, presets)
    cfg = replace(cfg, **own)
    arms = cfg.arms if cfg.arms is not None else [ARMS[name] for name in resolve({'arms': None}, presets)['arms']]
    # the same folder, whatever the working directory it is named from: one study, and runs that resume anywhere
    spec = resolve_source(t.data, t.data_dir)
    if spec.kind in ('folder', 'image-folder'):
        t.data = str(Path(spec.root).resolve())
    elif t.data_dir is not None:
        t.data_dir = str(Path(t.data_dir).expanduser().resolve())
    if not cfg.seeds:
        raise StudyError('The study has no seeds.')
    for seed in cfg.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise StudyError(f'Seeds must be integers >= 0, got {seed!r}.')
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise StudyError(f'Seeds repeat: {cfg.seeds}.')
    for name, value in (('eval_examples', cfg.eval_examples), ('eval_batch_size', cfg.eval_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StudyError(f'{name} must be a positive integer, got {value!r}.')
    for name in cfg.eval_attacks.split(','):
        parse_attack(name)
    if parse_attack(cfg.curve_attack).kind in ('clean', 'autoattack'):
        raise StudyError(f'curve_attack must be a gradient attack such as apgd-ce or pgd-20, got {cfg.curve_attack!r}.')
    curve = sorted({float(m) for m in cfg.curve_eps})
    if not curve or curve[0] <= 0:
        raise StudyError(f'curve_eps must be positive multiples of eps, got {list(cfg.curve_eps)}.')
    return replace(cfg, train=t, curve_eps=tuple(curve), arms=list(arms), seeds=list(cfg.seeds))


class _Models:
    """Builds each arm's model: the study's normalizer-free model or its BatchNorm twin (or the reverse)."""

    def __init__(self, cfg: StudyConfig, num_classes: int):
        self.cfg, self.num_classes = cfg, num_classes
        t = cfg.train
        try:
            probe = timm.create_model(t.model, num_classes=num_classes, **t.model_kwargs)
        except Exception as e:  # any error of timm's factory: name, kwargs
            raise StudyError(f'Model {t.model!r} with {t.model_kwargs} could not be built: '
                             f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
        self.study_has_bn = bool(batch_statistics_layers(probe))

    def describe(self, arm: Arm) -> str:
        t = self.cfg.train
        if arm.family == 'nf':
            return f'{t.model} converted with convert_to_normfree' if self.study_has_bn else t.model
        if self.study_has_bn:
            return t.model
        return t.baseline_model or f'{bn_twin_name(t.model)} (BatchNorm twin of {t.model})'

    def build(self, arm: Arm, seed: int) -> Tuple[Optional[nn.Module], TrainConfig]:
        """(ready model or None, the run's TrainConfig); None: ``train`` builds ``cfg.model`` itself."""
        t = self.cfg.train
        study_adv = {f.name: getattr(t.adv, f.name) for f in iter_settings(AdversarialConfig, PER_ARM)}
        cfg = replace(t, adv=arm.adversarial(**study_adv), seed=seed, final_attacks='clean',
                      out_dir=str(run_dir(Path(self.cfg.out_dir), arm.name, seed)))
        torch.manual_seed(seed)  # a ready model is initialised from the seed, as train() initialises its own
        if arm.family == 'nf' or self.study_has_bn:
            cfg.convert = arm.family == 'nf' and self.study_has_bn  # train builds the BatchNorm model, converts it
            return None, cfg
        try:
            model, cfg.model = create_bn_twin(t.model, self.num_classes, t.model_kwargs, t.baseline_model)
        except (ValueError, RuntimeError, TypeError) as e:
            raise StudyError(f'Arm {arm.name!r} cannot build its {arm.family} model from {t.model!r}: '
                             f'{str(e).splitlines()[0]}') from None
        cfg.model_kwargs = {}
        return model, cfg

    def instantiate(self, arm: Arm, seed: int) -> Tuple[nn.Module, TrainConfig]:
        """The arm's model as ``train`` builds it (converted where the arm converts), and its TrainConfig."""
        model, cfg = self.build(arm, seed)
        if model is None:
            model = training_run.build_model(replace(cfg, pretrained=False), self.num_classes)
        return model, cfg

    def for_evaluation(self, arm: Arm, seed: int) -> nn.Module:
        """The arm's architecture as trained (converted, split BN), ready for its checkpoint's weights."""
        model, _ = self.instantiate(arm, seed)
        if arm.batch_mode == 'split':
            from timm.layers import convert_splitbn_model
            model = convert_splitbn_model(model, num_splits=2)
        return model

    def check(self, arm: Arm) -> None:
        """Build the arm's model and resolve its batch mode once, so that a bad arm fails before any training."""
        from ..training.trainer import resolve_batch_mode
        try:
            model, cfg = self.instantiate(arm, 0)
            resolve_batch_mode(model, cfg.adv.batch_mode)
        except StudyError:
            raise
        except (ValueError, RuntimeError, TypeError) as e:
            raise StudyError(f'Arm {arm.name!r} cannot train {self.describe(arm)}: {str(e).splitlines()[0]}') from None


def _check_folder(cfg: StudyConfig) -> Dict[str, Any]:
    """The study.json to write: a new study, or this one grown by new arms / seeds. Refuses a folder that holds
    another study, or anything else."""
    out, old = Path(cfg.out_dir), {}  # old: the study.json found, if any
    manifest_path = out / STUDY_FILE
    identity = json.loads(json.dumps(cfg.identity()))  # as study.json stores it (tuples become lists)
    arms = json.loads(json.dumps({arm.name: arm.to_dict() for arm in cfg.arms}))
    if out.exists() and not out.is_dir():
        raise StudyError(f'Study folder {out} exists and is not a directory.')
    if manifest_path.is_file():
        old = read_record(manifest_path, f'restore it, or start the study in a new folder (is {out} a study?)')
        old_identity = {k: old.get(k) for k in identity}
        if old_identity != identity:
            raise StudyError(f'{out} holds another study ({"; ".join(differences(old_identity, identity)[:3])}); '
                             f'use another --out, or repeat that study\'s settings to continue it.')
        for name, arm in arms.items():
            if name in old.get('arms', {}) and old['arms'][name] != arm:
                raise StudyError(f'{out} holds another definition of arm {name!r} ({old["arms"][name]}); give the '
                                 f'new arm another name.')
    elif out.is_dir() and any(out.iterdir()):
        raise StudyError(f'{out} is not empty and holds no {STUDY_FILE}: choose a new or empty folder for the study.')
    order = old.get('arm_order') or list(old.get('arms', {}))
    order += [name for name in arms if name not in order]
    return {**identity, 'arms': {**old.get('arms', {}), **arms}, 'arm_order': order,
            'seeds': sorted(set(old.get('seeds', [])) | set(cfg.seeds)), 'arm_models': old.get('arm_models', {})}


def _parse_only(only: Optional[str], cfg: StudyConfig) -> List[Tuple[Arm, int]]:
    pairs = [(arm, seed) for arm in cfg.arms for seed in cfg.seeds]
    if only is None:
        return pairs
    name, _, seed_text = only.partition(':')
    if name not in {arm.name for arm in cfg.arms}:
        raise StudyError(f'--only {only!r}: arm {name!r} is not in this study; its arms: '
                         f'{", ".join(arm.name for arm in cfg.arms)}.')
    if seed_text:
        try:
            seed = int(seed_text)
        except ValueError:
            raise StudyError(f'--only {only!r}: seed {seed_text!r} is not an integer.') from None
        if seed not in cfg.seeds:
            raise StudyError(f'--only {only!r}: seed {seed} is not among the seeds {cfg.seeds}.')
    return [(arm, s) for arm, s in pairs if arm.name == name and (not seed_text or s == seed)]


# -- running ---------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    if int(os.environ.get('RANK', '0')) == 0:
        print(message, flush=True)


def run_study(cfg: StudyConfig, only: Optional[str] = None, report: bool = True) -> Dict[str, Any]:
    """Train and evaluate every arm x seed (or the ``only`` one: ``ARM`` or ``ARM:SEED``) not finished yet, then
    write the report; returns the report's JSON. Every check (arms, models, data, the folder) runs before any
    training, and raises ``StudyError`` / ``ValueError`` naming the bad value."""
    cfg = _resolved(cfg)
    names = [arm.name for arm in cfg.arms]
    if len(set(names)) != len(names):
        raise StudyError(f'Arm names repeat: {names}.')
    pairs = _parse_only(only, cfg)
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and len(pairs) != 1:
        raise StudyError(f'Under torchrun a study runs one arm x seed per launch (--only ARM:SEED), got '
                         f'{len(pairs)} runs: the other processes would wait in collectives while the first '
                         f'evaluates. Launch one per run, then `timm-nofrost study report`.')
    t = cfg.train
    source = build_datasets(t.data, t.data_dir, img_size=t.img_size or DEMO_IMG_SIZE, val_fraction=t.val_fraction,
                            seed=t.split_seed)
    num_classes = t.num_classes or source.num_classes
    if not num_classes:
        raise StudyError(f'Could not tell the number of classes of {t.data!r}; pass --num-classes.')
    models = _Models(cfg, num_classes)
    for arm in cfg.arms:
        models.check(arm)
    primary = int(os.environ.get('RANK', '0')) == 0
    _claim_folder(cfg, models, primary)
    eval_set = _study_eval_set(cfg, models, source)
    for i, (arm, seed) in enumerate(pairs):
        _run_one(cfg, models, eval_set, arm, seed, f'[study {i + 1}/{len(pairs)}] {arm.name} seed {seed}', primary)
    if not (report and primary):
        return {}
    from .aggregate import write_report
    return write_report(Path(cfg.out_dir))


def _claim_folder(cfg: StudyConfig, models: _Models, primary: bool) -> None:
    """The first process writes study.json, or finds the folder holds something else; every process raises that
    ``StudyError`` (under torchrun the others receive the first one's verdict)."""
    out = Path(cfg.out_dir)
    refused = None
    if primary:
        try:
            manifest = _check_folder(cfg)
            manifest['arm_models'].update({arm.name: models.describe(arm) for arm in cfg.arms})
            out.mkdir(parents=True, exist_ok=True)
            atomic_json(out / STUDY_FILE, manifest)
        except ValueError as e:  # StudyError, or an unreadable study.json
            refused = str(e)
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        # under torchrun the other ranks wait for the first one's verdict on the folder: were they to start
        # training first, the run folders they create would make the folder look like no study at all
        training_run.init_distributed(cfg.train.device)
        verdict = [refused]
        dist.broadcast_object_list(verdict, src=0)
        refused = verdict[0]
    if refused is not None:
        raise StudyError(refused)


def _run_one(cfg: StudyConfig, models: _Models, eval_set: EvalSet, arm: Arm, seed: int, tag: str,
             primary: bool) -> None:
    """One arm x seed: trained (or resumed) unless its training finished, then evaluated by the first process,
    unless it was already."""
    path = run_dir(Path(cfg.out_dir), arm.name, seed)
    # one process per run folder: two studies on one folder never train or evaluate a run twice
    with hold_folder(path, f'timm-nofrost study --out {cfg.out_dir}, {arm.name} seed {seed}') if primary \
            else nullcontext():
        state, _ = run_state(path)
        if state == 'evaluated':
            _log(f'{tag}: finished, skipped')
            return
        if state in ('missing', 'training'):
            _log(f'{tag}: {"resuming" if state == "training" else "training"} {models.describe(arm)} into {path}')
            model, run_cfg = models.build(arm, seed)
            if state == 'training':
                run_cfg.resume = 'auto'
            training_run.train(run_cfg, model=model)
        if primary:
            _log(f'{tag}: evaluating ({cfg.eval_attacks} at {cfg.train.adv.threat}; curve: {cfg.curve_attack})')
            _evaluate_run(cfg, models, eval_set, arm, seed, path)


def _study_eval_set(cfg: StudyConfig, models: _Models, source) -> EvalSet:
    """The protocol's images: the same validation subset, in the same pixels, for every model."""
    # pixels from the study model's data config: one eval transform for all arms (a twin may crop otherwise)
    model = models.for_evaluation(next((a for a in cfg.arms if a.family == 'nf'), cfg.arms[0]), 0)
    source.val.transform = pixel_eval_transform(source_data_config(cfg.train.data, model, cfg.train.img_size))
    indices = spread_indices(cfg.eval_examples, len(source.val))
    return EvalSet(Subset(source.val, indices), cfg.train.data, 'validation',
                   {'kind': 'spread', 'n': len(indices), 'indices': indices})


def _evaluate_run(cfg: StudyConfig, models: _Models, eval_set: EvalSet, arm: Arm, seed: int, path: Path) -> None:
    """The protocol and the eps curve on the run's final weights, written to its ``eval.json``."""
    t, checkpoint = cfg.train, path / CHECKPOINT_LAST
    start = time.time()
    state = load_training_checkpoint(checkpoint)
    epochs = int(state['epoch']) + 1
    if epochs < t.epochs:
        raise StudyError(f'{checkpoint} holds epoch {epochs} of {t.epochs}: the run did not finish; run the study '
                         f'again to resume it.')
    model = models.for_evaluation(arm, seed)
    try:
        load_checkpoint(model, state['state_dict'])
    except CheckpointError as e:
        raise e.with_source(f'{checkpoint} does not fit arm {arm.name!r}', checkpoint) from None
    # each model is attacked through the normalisation it was trained with (its own data config)
    data_config = source_data_config(t.data, model, t.img_size)
    eval_set = replace(eval_set, mean=tuple(data_config['mean']), std=tuple(data_config['std']))
    attacks = [a.strip() for a in cfg.eval_attacks.split(',') if a.strip()]
    autoattack = 'run' if 'autoattack' in {parse_attack(a).name for a in attacks} else 'not requested'
    if autoattack == 'run' and not autoattack_available():
        attacks = [a for a in attacks if parse_attack(a).name != 'autoattack']
        autoattack = "not run: the optional 'pyautoattack' package is not installed (pip install pyautoattack)"
    threat, name, progress = t.adv.threat, models.describe(arm), path / EVAL_PROGRESS
    # resumable: each evaluation keeps its progress in eval.progress/ until eval.json is written (the study
    # holds the run folder; a changed evaluation of the same weights starts its journal over)
    common = dict(device=t.torch_device(), amp_dtype=t.amp, progress='auto' if t.progress else 'lines',
                  model_name=name, run=f'{arm.name} seed {seed}', overwrite=True)
    protocol = Protocol(attacks=attacks, eps=[threat.eps], norm=threat.norm, seed=cfg.eval_seed,
                        batch_size=cfg.eval_batch_size, sanity=True, analysis=cfg.analysis)
    report = evaluate(model, eval_set, protocol, journal=progress / 'protocol', **common)
    curve = evaluate(model, eval_set, replace(protocol, attacks=[cfg.curve_attack], sanity=False, analysis=False,
                                              eps=[threat.scaled(m).eps for m in cfg.curve_eps]),
                     journal=progress / 'curve', **common)
    with reading(path / 'results.json'):
        run = next(iter(read_record(path / 'results.json')['runs'].values()))
    atomic_json(path / EVAL_FILE, {
        'arm': arm.name, 'seed': seed, 'arm_definition': arm.to_dict(), 'model': models.describe(arm),
        'epochs_trained': epochs, 'train_time_s': sum(e.get('train_time_s', 0.0) for e in run['epochs']),
        'eval_time_s': time.time() - start, 'catastrophic_overfitting': run.get('catastrophic_overfitting'),
        'protocol': report.to_dict(), 'curve': {**curve.to_dict(), 'per_example': {}},
        'curve_eps_multiples': list(cfg.curve_eps), 'autoattack': autoattack, 'data': eval_set.fingerprint(),
    })
    shutil.rmtree(progress, ignore_errors=True)
