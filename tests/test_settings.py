"""Each setting is defined once: every dataclass field of a command's configuration has a flag, every flag of the
generated parsers is a field, and the parser, the help text and the dataclass agree on each default."""
import argparse
from dataclasses import MISSING, dataclass, fields
from typing import Dict, List, Optional, Tuple

import pytest

from timm_nofrost.cli import build_parser
from timm_nofrost.cli._common import OutputSettings, WeightsSettings
from timm_nofrost.cli.evaluate import ReportFiles
from timm_nofrost.cli.shift import ShiftSettings
from timm_nofrost.evaluate.protocol import EvalSubset, Protocol
from timm_nofrost.settings import (DataSettings, ModelSettings, RunSettings, add_settings, build_settings, flag_of,
                                   help_text, iter_settings, setting, setting_of, settings_dict)
from timm_nofrost.study import ArmSelection, StudyConfig
from timm_nofrost.training.adversarial import AdversarialConfig
from timm_nofrost.training.presets import PRESETS, chain, resolve
from timm_nofrost.training.timm_launcher import RobustValidationConfig
from timm_nofrost.training.train_config import TrainConfig

SETTINGS_CLASSES = (DataSettings, ModelSettings, RunSettings, TrainConfig, AdversarialConfig, StudyConfig,
                    ArmSelection, Protocol, EvalSubset, RobustValidationConfig, OutputSettings, WeightsSettings,
                    ReportFiles, ShiftSettings)
# fields that are not flags, and why
NOT_FLAGS = {
    (TrainConfig, 'adv'): 'nested: its fields are the --adv-* flags',
    (StudyConfig, 'train'): 'nested: its fields are the schedule flags',
    (StudyConfig, 'arms'): 'built from --arms / --arm / --arms-file (ArmSelection)',
    (RobustValidationConfig, 'specs'): 'derived from attacks (init=False)',
}
GENERATED = ('train', 'study', 'eval', 'shift', 'timm-train')
OWN_POSITIONALS = {'timm-train': {'script', 'rest'}}


def _subparsers(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flag_fields() -> Dict[str, List[Tuple[type, object]]]:
    """Each flag with the fields that declare it (an inherited shared field counts once, at its first class)."""
    out: Dict[str, List[Tuple[type, object]]] = {}
    seen = set()
    for cls in SETTINGS_CLASSES:
        for f in fields(cls):
            if setting_of(f) is not None and id(f) not in seen:
                seen.add(id(f))
                out.setdefault(flag_of(f), []).append((cls, f))
    return out


def test_every_field_is_a_setting_with_a_flag_in_some_command():
    parsers = _subparsers(build_parser())
    used = {opt for p in parsers.values() for a in p._actions for opt in a.option_strings}
    missing = []
    for cls in SETTINGS_CLASSES:
        for f in fields(cls):
            if (cls, f.name) in NOT_FLAGS:
                continue
            if setting_of(f) is None:
                missing.append(f'{cls.__name__}.{f.name}: no setting()')
            elif flag_of(f) not in used:
                missing.append(f'{cls.__name__}.{f.name}: {flag_of(f)} is in no parser')
    assert missing == []


def test_one_definition_per_flag():
    """A flag names one setting: no two fields share a flag (and so a help text and a default)."""
    shared = {flag: [f'{c.__name__}.{f.name}' for c, f in owners] for flag, owners in _flag_fields().items()
              if len(owners) > 1}
    # the same word for different things in different commands, never in one: the output of each command (and
    # replacing what another run left there), the
    # training batch vs the evaluation batch, the training seed vs the attacks' seed
    assert shared == {'--out': ['TrainConfig.out_dir', 'StudyConfig.out_dir', 'ReportFiles.out', 'ShiftSettings.out'],
                      '--batch-size': ['TrainConfig.batch_size', 'Protocol.batch_size'],
                      '--seed': ['TrainConfig.seed', 'Protocol.seed'],
                      '--overwrite': ['TrainConfig.overwrite', 'ReportFiles.overwrite']}


def _disagreements(long: str, action: argparse.Action, cls: type, f) -> List[str]:
    """How the parser's argument differs from the field's definition (default, help, default in the help)."""
    out = []
    default = f.default if f.default is not MISSING else f.default_factory()
    if action.default != default and not action.required:
        out.append(f'{long}: parser default {action.default!r} != {cls.__name__}.{f.name} {default!r}')
    if action.help != help_text(f, {}) and not (action.help or '').startswith(help_text(f, {}).split(' (default')[0]):
        out.append(f"{long}: help text is not {cls.__name__}.{f.name}'s")
    if setting_of(f).default_help is None and not isinstance(default, bool) and default is not None:
        if f'(default: ' not in (action.help or ''):
            out.append(f'{long}: help does not say the default {default!r}')
    return out


@pytest.mark.parametrize('command', GENERATED)
def test_every_flag_is_a_field_and_defaults_agree(command):
    parser = _subparsers(build_parser())[command]
    by_flag = _flag_fields()
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if not action.option_strings:
            if action.dest not in OWN_POSITIONALS.get(command, set()):
                problems.append(f'positional {action.dest} is no setting')
            continue
        long = [o for o in action.option_strings if o.startswith('--')][0]
        owners = [(c, f) for c, f in by_flag.get(long, []) if f.name == action.dest]
        if not owners:
            problems.append(f'{long}: no field')
            continue
        found = [_disagreements(long, action, cls, f) for cls, f in owners]
        if all(found):  # no field of this flag agrees with the parser
            problems += found[0]
    assert problems == []


def test_help_states_the_dataclass_default_and_the_presets():
    parser = _subparsers(build_parser())['train']
    helps = {a.option_strings[-1]: a.help for a in parser._actions if a.option_strings}
    assert helps['--weight-decay'].endswith('(default: 5e-05)')
    assert helps['--epochs'].endswith(f"(default: recipe {PRESETS['recipe']['epochs']}; demo {PRESETS['demo']['epochs']})")
    assert helps['--adv-steps'].endswith('(default: recipe 10; demo 3)')
    study = {a.option_strings[-1]: a.help for a in _subparsers(build_parser())['study']._actions if a.option_strings}
    assert study['--adv-steps'].endswith('(default: recipe 10; demo 3; demo study 2)')
    assert study['--seeds'].endswith('(default: study 0,1,2; demo study 0,1)')


def test_the_walk_fails_on_a_field_without_flag_and_a_hand_written_flag():
    """The checks above can fail: a dataclass field without setting(), and a flag added by hand."""
    @dataclass
    class Broken:
        given: int = setting(1, group='g', type=int, help='a setting')
        forgot: int = 2

    assert [f.name for f in fields(Broken) if setting_of(f) is None] == ['forgot']
    parser = argparse.ArgumentParser()
    add_settings(parser, Broken)
    parser.add_argument('--by-hand', default=3)
    flags = {flag_of(f) for f in iter_settings(Broken)}
    assert [a.option_strings[0] for a in parser._actions if a.option_strings and a.option_strings[0] not in flags
            and a.dest != 'help'] == ['--by-hand']
    given = next(a for a in parser._actions if a.dest == 'given')
    field = next(f for f in fields(Broken) if f.name == 'given')
    assert _disagreements('--given', given, Broken, field) == []
    given.default, given.help = 5, 'another text (default: 5)'  # as a hand-kept copy drifts
    assert _disagreements('--given', given, Broken, field) == [
        '--given: parser default 5 != Broken.given 1', "--given: help text is not Broken.given's"]


def test_the_cli_and_python_resolve_the_same_config():
    """One resolver: the train command's config on demo data equals TrainConfig() resolved from Python."""
    from timm_nofrost.cli.train import build_config
    from timm_nofrost.training.train_config import resolve_config
    from_cli = resolve_config(build_config(build_parser().parse_args(['train'])))
    from_api = resolve_config(TrainConfig())
    assert from_cli == from_api
    assert from_api.adv.steps == PRESETS['demo']['steps'] and from_api.epochs == PRESETS['demo']['epochs']
    folder = resolve({'epochs': None, 'steps': None, 'attack': 'fgsm-rs'}, chain('/data'))
    assert folder == {'epochs': PRESETS['recipe']['epochs'], 'steps': None, 'attack': 'fgsm-rs'}  # one-step attack


def test_a_study_arm_is_overrides_of_the_adversarial_config():
    from timm_nofrost.study import ARMS, Arm
    assert set(f.name for f in fields(Arm)) == {'name', 'family', 'overrides', 'description'}
    assert ARMS['bn-at'].overrides == {'batch_mode': 'separate', 'adv_weight': 0.5}
    assert Arm('x', 'nf', {'method': 'nofrost', 'beta': None}) == Arm('x', 'nf')  # defaults are no overrides
    with pytest.raises(ValueError, match="eps cannot differ between arms"):
        Arm('x', 'nf', {'eps': 0.1})


def test_build_settings_reads_nested_settings_from_one_namespace():
    args = build_parser().parse_args(['study', '--adv-eps', '4/255', '--epochs', '3', '--seeds', '1,2', '--out', 'S'])
    cfg = build_settings(StudyConfig, settings_dict(args, StudyConfig))
    assert (cfg.train.epochs, cfg.train.adv.eps, cfg.seeds, cfg.out_dir) == (3, 4 / 255, [1, 2], 'S')
    assert cfg.train.out_dir == TrainConfig().out_dir  # the study's --out is not the schedule's
