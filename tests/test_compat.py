"""Records written before the settings were made data still load, aggregate and continue.

``tests/data/study_v1`` is a 2-arm x 1-seed study written by the release before (commit a961a71, the command in
``_COMMAND``), with its paths replaced by ``@DATA@`` / ``@STUDY@``: the same command today must see the same
study (nothing to train or evaluate), ``study report`` must give the same numbers, and its checkpoint must load.
"""
import json
import shutil
from pathlib import Path

import pytest
import timm

from timm_nofrost.cli import main
from timm_nofrost.data import write_image_folder

FIXTURE = Path(__file__).parent / 'data' / 'study_v1'
_COMMAND = ['study', '--data', '@DATA@', '--img-size', '16', '--model', 'nf_resnet18_cifar_nofrost',
            '--model-kwargs', '{"channels": [8, 8, 16, 16], "stem_chs": 8}', '--arms', 'nofrost,bn-at', '--seeds', '0',
            '--epochs', '1', '-b', '16', '--opt', 'adamw', '--adv-steps', '1', '--robust-examples', '12',
            '--eval-attack', 'pgd-2', '--eval-examples', '12', '--eval-attacks', 'clean,pgd-3,apgd-ce-4',
            '--curve-attack', 'pgd-2', '--curve-eps', '0.5,2', '--no-analysis', '--deterministic', '--no-progress',
            '--out', '@STUDY@']


@pytest.fixture
def old_study(tmp_path: Path):
    data, study = tmp_path / 'data', tmp_path / 'study'
    write_image_folder(data / 'train', 'train', num_samples=48, img_size=16)  # the images the study was run on
    write_image_folder(data / 'val', 'val', num_samples=20, img_size=16)
    shutil.copytree(FIXTURE, study)
    for path in study.rglob('*.json*'):
        path.write_text(path.read_text().replace('@DATA@', str(data)).replace('@STUDY@', str(study)))
    return data, study


def _substituted(argv, data: Path, study: Path):
    return [str(data) if a == '@DATA@' else str(study) if a == '@STUDY@' else a for a in argv]


def test_an_old_study_continues_as_the_same_study(old_study, monkeypatch, capsys):
    from timm_nofrost.study import runner
    from timm_nofrost.training import run as run_module
    data, study = old_study
    monkeypatch.setattr(run_module, 'train', lambda *a, **k: pytest.fail('a finished run was trained again'))
    monkeypatch.setattr(runner, '_evaluate_run', lambda *a, **k: pytest.fail('a finished run was evaluated again'))
    before = json.loads((study / 'study.json').read_text())
    assert main(_substituted(_COMMAND, data, study)) == 0
    assert json.loads((study / 'study.json').read_text()) == before  # the same identity, arms and seeds
    assert 'Not finished' not in capsys.readouterr().out


def test_an_old_study_aggregates_to_the_same_numbers(old_study, capsys):
    data, study = old_study
    recorded = json.loads((study / 'report.json').read_text())
    assert main(['study', 'report', str(study), '--json']) == 0
    now = json.loads(capsys.readouterr().out)
    assert now['arms'] == recorded['arms'] and now['runs'] == recorded['runs']
    assert now['verdict'] == recorded['verdict']


def test_an_old_checkpoint_loads(old_study):
    from timm_nofrost.checkpoint import load_checkpoint
    from timm_nofrost.training.checkpointing import load_training_checkpoint
    _, study = old_study
    state = load_training_checkpoint(study / 'runs' / 'nofrost' / 'seed-0' / 'checkpoint-last.pth')
    model = timm.create_model('nf_resnet18_cifar_nofrost', num_classes=5, channels=(8, 8, 16, 16), stem_chs=8)
    load_checkpoint(model, state['state_dict'])
    assert int(state['epoch']) == 0
