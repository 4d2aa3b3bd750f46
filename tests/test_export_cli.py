"""``timm-nofrost export`` / ``models`` and the export folder format."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from timm_nofrost import export_checkpoint
from timm_nofrost.cli import main

from conftest import authors_state_dict, randomize_gains


@pytest.fixture(scope='module')
def resnet50_authors_checkpoint(tmp_path_factory):
    """The authors' best_RA.pth layout for the paper's architecture (random weights)."""
    torch.manual_seed(0)
    model = randomize_gains(timm.create_model('nf_resnet50_nofrost')).eval()
    path = tmp_path_factory.mktemp('authors') / 'best_RA.pth'
    torch.save(authors_state_dict(model), path)
    return model, path


@pytest.fixture(scope='module')
def cifar_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_gains(timm.create_model('nf_resnet18_cifar_nofrost')).eval()
    path = tmp_path_factory.mktemp('cifar') / 'latest.pth'
    torch.save({'model': authors_state_dict(model), 'epoch': 10}, path)
    return model, path


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_authors_resnet50_checkpoint_via_file_and_export(resnet50_authors_checkpoint, tmp_path, capsys):
    source, path = resnet50_authors_checkpoint
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = _logits(source, x)

    from_file = timm.create_model('nf_resnet50_nofrost', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(_logits(from_file, x), expected)

    out = tmp_path / 'nf_resnet50_nofrost.at_in1k'
    assert main(['export', str(path), '--model', 'nf_resnet50_nofrost.at_in1k', '--out', str(out), '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['num_params'] == 25_557_032 and report['max_abs_diff'] == 0.0
    assert report['files'] == ['README.md', 'config.json', 'model.safetensors']
    assert report['repo_id'] == 'timm-nofrost/nf_resnet50_nofrost.at_in1k'

    from_dir = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert torch.equal(_logits(from_dir, x), expected)
    assert from_dir.pretrained_cfg['crop_pct'] == 0.875 and from_dir.pretrained_cfg['interpolation'] == 'bilinear'

    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'nf_resnet50_nofrost' and config['num_classes'] == 1000
    assert config['pretrained_cfg']['tag'] == 'at_in1k'
    assert config['pretrained_cfg']['paper_ids'] == 'arXiv:2207.01156'

    card = (out / 'README.md').read_text()
    assert card.startswith('---\n') and 'library_name: timm' in card and 'license: apache-2.0' in card
    assert 'import timm_nofrost' in card
    assert "timm.create_model('hf-hub:timm-nofrost/nf_resnet50_nofrost.at_in1k', pretrained=True)" in card
    assert f"pretrained_cfg_overlay=dict(file='{path.name}')" in card  # the authors' file, loadable now
    assert 'github.com/amazon-research/normalizer-free-robust-training' in card
    for fact in ('74.06', '59.28', '13.57', '23.56', '22.45', 'PGD-20', 'eps 8/255', 'step size 0.5/255',
                 'APGD-CE, 100 iterations | 5.3', 'AutoAttack (standard) | 1.3', 'Reported in the paper',
                 'weight decay 5e-5', '@inproceedings{wang2022removing'):
        assert fact in card, fact


def test_export_of_a_custom_checkpoint_infers_classes(cifar_checkpoint, tmp_path, capsys):
    source, path = cifar_checkpoint
    out = tmp_path / 'export'
    assert main(['export', str(path), '--model', 'nf_resnet18_cifar_nofrost', '--out', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'identical logits' in text and f'timm-nofrost push {out} --repo-id <your-org>/nf_resnet18_cifar_nofrost' in text
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.num_classes == 10 and model.pretrained_cfg['input_size'] == (3, 32, 32)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(_logits(model, x), _logits(source, x))
    card = (out / 'README.md').read_text()
    assert 'these are **not** measurements of this checkpoint' in card
    assert 'datasets:' not in card  # not ImageNet weights
    # the exported weights carry their checksum: a flipped bit is refused by every read of this package
    from timm_nofrost.checkpoint import CheckpointError, read_state_dict
    weights = out / 'model.safetensors'
    assert torch.equal(read_state_dict(weights)['stem.conv.weight'], source.state_dict()['stem.conv.weight'])
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match='is corrupted: its content does not match'):
        read_state_dict(weights)


def test_export_with_other_num_classes_on_a_1000_class_architecture(tmp_path):
    torch.manual_seed(0)
    model = randomize_gains(timm.create_model('nf_resnet18_nofrost', num_classes=5)).eval()
    path = tmp_path / 'five.pth'
    torch.save(model.state_dict(), path)
    result = export_checkpoint(path, tmp_path / 'out', model_name='nf_resnet18_nofrost')
    assert result.num_classes == 5 and result.max_abs_diff == 0.0
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['num_classes'] == 5 and 'tag' not in config['pretrained_cfg']


def test_export_errors_exit_non_zero(cifar_checkpoint, tmp_path, capsys):
    _, path = cifar_checkpoint
    busy = tmp_path / 'busy'
    busy.mkdir()
    (busy / 'keep.txt').write_text('x')
    assert main(['export', str(path), '--model', 'nf_resnet18_cifar_nofrost', '--out', str(busy)]) == 2
    assert 'is not empty' in capsys.readouterr().err and (busy / 'keep.txt').exists()

    assert main(['export', str(path), '--model', 'nf_resnet50_nofrost', '--out', str(tmp_path / 'a')]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and 'missing keys' in err
    assert not (tmp_path / 'a').exists()  # nothing half-written

    assert main(['export', str(path), '--model', 'not_a_model', '--out', str(tmp_path / 'b')]) == 2
    assert "Unknown model 'not_a_model'" in capsys.readouterr().err
    assert main(['export', str(path), '--model', 'nf_resnet50_nofrost.nope', '--out', str(tmp_path / 'c')]) == 2
    assert "Unknown pretrained tag 'nope'" in capsys.readouterr().err
    assert main(['export', str(tmp_path / 'missing.pth'), '--out', str(tmp_path / 'd')]) == 2
    assert 'missing.pth' in capsys.readouterr().err


def test_models_command_json_and_table(capsys):
    assert main(['models', '--json']) == 0
    listed = {m['name']: m for m in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(timm.list_models('*nofrost*'))
    assert listed['nf_resnet50_nofrost']['num_params'] == 25_557_032
    assert listed['nf_resnet50_nofrost']['tags'] == ['at_deepaug_in1k', 'at_in1k']
    assert main(['models', '--pretrained']) == 0
    table = capsys.readouterr().out
    assert 'timm-nofrost/nf_resnet50_nofrost.at_in1k' in table and 'nf_resnet18_nofrost' not in table


def _command() -> list:
    """The installed console script, next to the interpreter running the tests."""
    script = Path(sys.executable).parent / 'timm-nofrost'
    return [str(script)] if script.exists() else [sys.executable, '-m', 'timm_nofrost']


def test_console_script_help():
    """The installed ``timm-nofrost`` command explains its subcommands and flags."""
    out = subprocess.run(_command() + ['--help'], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ('models', 'export', 'push'):
        assert command in out.stdout
    out = subprocess.run(_command() + ['export', '--help'],
                         capture_output=True, text=True)
    for flag in ('--model', '--out', '--repo-id', '--num-classes', '--overwrite', '--json'):
        assert flag in out.stdout
    out = subprocess.run(_command() + ['export'], capture_output=True, text=True)
    assert out.returncode == 2 and 'required' in out.stderr


def test_example_script_runs_offline(tmp_path):
    script = Path(__file__).parents[1] / 'examples' / 'authors_checkpoint_to_hub.py'
    out = subprocess.run([sys.executable, str(script), '--model', 'nf_resnet18_cifar_nofrost',
                          '--out', str(tmp_path / 'out')], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert 'identical logits from the .pth and the exported folder: True' in out.stdout
    assert (tmp_path / 'out' / 'model.safetensors').is_file()
