"""Nothing a user relies on changes: every subcommand's flags, their parsed defaults and the resolved train /
study configurations on demo and on folder data equal the snapshot in ``tests/data/cli_snapshot.json``.

The snapshot was recorded before the parsers were generated from the dataclasses; regenerate it only for a
deliberate, documented change of a flag (``TIMM_NOFROST_WRITE_SNAPSHOT=1 pytest tests/test_cli_snapshot.py``).
"""
import argparse
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from timm_nofrost.cli import build_parser

SNAPSHOT = Path(__file__).parent / 'data' / 'cli_snapshot.json'
# the arguments a subcommand needs to parse at all (its required ones), on demo and on folder data
_REQUIRED = {
    'train': [], 'study': [], 'timm-train': ['train.py'], 'eval': ['--model', 'resnet18', '--data', 'demo'],
    'shift': ['--model', 'resnet18', '--benchmark', 'imagenet-r', '--root', 'R'],
    'convert': ['--model', 'resnet18', '--out', 'O'], 'export': [], 'push': [], 'models': [],
}
_FOLDER = '@FOLDER@'


def _subparsers(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _jsonable(value: Any) -> Any:
    if callable(value) and not isinstance(value, type):
        return '<function>'
    if is_dataclass(value):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _flags(parser: argparse.ArgumentParser, argv: List[str]) -> Dict[str, Any]:
    """Each option string of ``parser`` with its parsed value for ``argv`` (``--help`` flag list and defaults)."""
    args = parser.parse_args(argv)
    out = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or not action.option_strings:
            continue
        key = '/'.join(sorted(action.option_strings))
        value = _jsonable(getattr(args, action.dest, None))
        if isinstance(action, argparse._StoreFalseAction):  # a --no-X flag: recorded as "given", as store_true
            value = not value
        if key == '--device' and value == ('cuda' if torch.cuda.is_available() else 'cpu'):
            value = '<cuda if available, else cpu>'
        out[key] = value
    return out


def _resolved_train(argv: List[str], folder: Path) -> Dict[str, Any]:
    from timm_nofrost.cli.train import build_config
    from timm_nofrost.training.train_config import resolve_config
    args = build_parser().parse_args(['train'] + argv)
    return _jsonable(resolve_config(build_config(args)))


def _resolved_study(argv: List[str], folder: Path) -> Dict[str, Any]:
    from timm_nofrost.cli.study import build_study_config
    from timm_nofrost.study.runner import _resolved
    args = build_parser().parse_args(['study'] + argv)
    cfg = _resolved(build_study_config(args))
    out = _jsonable(cfg)
    out['arms'] = [arm.name for arm in cfg.arms]
    return out


def snapshot(folder: Path) -> Dict[str, Any]:
    parser = build_parser()
    subs = _subparsers(parser)
    result: Dict[str, Any] = {'commands': sorted(subs)}
    for name, sub in sorted(subs.items()):
        base = _REQUIRED.get(name, [])
        if name in ('export', 'push', 'models'):
            result[f'{name}/flags'] = sorted(
                '/'.join(sorted(a.option_strings)) for a in sub._actions if a.option_strings)
            continue
        result[f'{name}/demo'] = _flags(sub, base)
        if any('--data' in a.option_strings for a in sub._actions):
            result[f'{name}/folder'] = _flags(sub, base + ['--data', str(folder)])
    for kind, argv in (('demo', []), ('folder', ['--data', str(folder)])):
        result[f'train/resolved/{kind}'] = _resolved_train(argv, folder)
        result[f'study/resolved/{kind}'] = _resolved_study(argv, folder)
    text = json.dumps(result, indent=1, sort_keys=True, default=str)
    return json.loads(text.replace(str(folder), _FOLDER))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    from timm_nofrost.data import write_image_folder
    root = tmp_path / 'imgs'
    write_image_folder(root, 'train', num_samples=10, img_size=16)
    return root


# Deliberate changes since the recording, each with its reason: (snapshot key, flag or field, value now).
# '<new>' marks a flag added where the field existed without one; every resolved config stays as recorded.
_ONE_DEFINITION = 'one definition shared by every subcommand: unset (None) is resolved by the command, same result'
CHANGED = {
    ('eval/*', '--amp'): (None, _ONE_DEFINITION + ": 'none' and None are both off"),
    ('eval/*', '--device'): (None, _ONE_DEFINITION + ': cuda if available, else cpu'),
    ('shift/*', '--device'): (None, _ONE_DEFINITION + ': cuda if available, else cpu'),
    ('eval/*', '--split-seed'): (None, _ONE_DEFINITION + ': eval resolves it to 0'),
    ('study/*', '--split-seed'): (None, _ONE_DEFINITION + ': the study preset sets 0'),
    ('*', '--model-kwargs'): ({}, 'parsed as JSON by argparse (a bad value is a one-line usage error)'),
    ('train/*', '--val-fraction'): (None, _ONE_DEFINITION + ': the recipe and demo presets set 0.1'),
    ('study/*', '--val-fraction'): (None, _ONE_DEFINITION + ': the recipe and demo presets set 0.1'),
    ('train/*', '--robust-examples'): (None, 'the recipe preset sets 256 (the demo study 64)'),
    ('study/*', '--curve-eps'): ([0.25, 0.5, 1.0, 1.5, 2.0], 'parsed as a list of numbers by argparse'),
    ('train/*', '--momentum'): (0.9, '<new>: TrainConfig.momentum had no flag'),
    ('study/*', '--momentum'): (0.9, '<new>: TrainConfig.momentum had no flag'),
    ('train/*', '--split-seed'): (None, '<new>: TrainConfig.split_seed had no flag in train'),
    ('shift/*', '--convert'): (False, '<new>: the shared model settings (build and convert a BatchNorm model)'),
    ('eval/*', '--workers'): (0, '<new>: the shared data settings (data-loading processes)'),
    ('eval/*', '--sanity-examples'): (32, '<new>: Protocol.sanity_examples had no flag'),
    ('eval/*', '--no-active-set'): (False, '<new>: Protocol.active_set had no flag'),
    ('train/*', '--initial-checkpoint'): (None, '<new>: a new run from other weights; --resume refuses other settings'),
    ('eval/*', '--no-early-stop'): (False, '<new>: Protocol.early_stop (exact early stopping in PGD)'),
    ('eval/*', '--escalate'): (False, "<new>: Protocol.escalate (fast-worst-case: FAB-T and Square even unflagged)"),
    ('eval/*', '--overwrite'): (False, '<new>: eval --out continues or reuses the same evaluation, refuses another'),
    ('eval/*', '--robustbench-json'): (None, "<new>: the result in RobustBench's model_info layout"),
}
# Flags added to the commands recorded as a flag list (export, push, models), each with its reason.
ADDED_FLAGS = {
    ('export/flags', '--model-kwargs'): 'the shared model settings: export a model trained at another width',
    ('export/flags', '--convert'): 'the shared model settings: export a model trained with train --convert',
    ('export/flags', '--eval-report'): "an evaluation report's results in the model card's model-index metadata",
    ('push/flags', '--eval-report'): "an evaluation report's results in the model card's model-index metadata",
}
# the study's default evaluation is the fast protocol (issue: AutoAttack's verdict at a fifth of its cost)
STUDY_EVAL_ATTACKS = 'clean,pgd-20,apgd-ce,fast-worst-case'
# the study's split seed and BatchNorm model are the schedule's (train's) fields now: one definition each
MOVED_TO_TRAIN = ('split_seed', 'baseline_model')
# TrainConfig fields added since the recording, with their default
NEW_TRAIN_FIELDS = {'initial_checkpoint': None}


def _matches(pattern: str, key: str) -> bool:
    return pattern == '*' or key == pattern or (pattern.endswith('/*') and key.startswith(pattern[:-1]))


def _expected(recorded: Dict[str, Any]) -> Dict[str, Any]:
    """The recording with the deliberate changes applied."""
    out = json.loads(json.dumps(recorded))
    for key, value in out.items():
        if key.startswith('study/resolved/'):
            for name in MOVED_TO_TRAIN:
                value['train'][name] = value.pop(name)
            value['train'].update(NEW_TRAIN_FIELDS)
            value['eval_attacks'] = STUDY_EVAL_ATTACKS
        elif key.startswith('train/resolved/'):
            value.update(NEW_TRAIN_FIELDS)
        elif isinstance(value, list) and key.endswith('/flags'):
            out[key] = sorted(value + [flag for (where, flag) in ADDED_FLAGS if where == key])
        elif isinstance(value, dict) and '/resolved/' not in key:
            for (pattern, name), (now, reason) in CHANGED.items():
                if _matches(pattern, key) and (name in value or reason.startswith('<new>')):
                    value[name] = now
    return out


def test_flags_defaults_and_resolved_configs_unchanged(folder: Path):
    current = snapshot(folder)
    if os.environ.get('TIMM_NOFROST_WRITE_SNAPSHOT'):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + '\n')
    expected = _expected(json.loads(SNAPSHOT.read_text()))
    assert sorted(current) == sorted(expected)
    for key in expected:
        assert current[key] == expected[key], key
