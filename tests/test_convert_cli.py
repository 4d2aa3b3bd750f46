"""``timm-nofrost convert`` and the ``normfree_converted`` timm model."""
import json

import pytest
import timm
import torch

from timm_nofrost.cli import main

from conftest import authors_state_dict, randomize_gains


def test_convert_cli_writes_a_loadable_folder(tmp_path, capsys):
    out = tmp_path / 'resnet18_nf'
    assert main(['convert', '--model', 'resnet18', '--out', str(out), '--num-classes', '10', '--json']) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload['export']['max_abs_diff'] == 0.0
    assert payload['export']['files'] == ['README.md', 'config.json', 'model.safetensors']
    report = payload['report']
    assert report['init'] == 'fresh' and len(report['blocks']) == 8 and len(report['norms_removed']) == 20
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'normfree_converted'
    assert config['model_args']['base_model'] == 'resnet18' and config['model_args']['conversion']['alpha'] == 0.2
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.num_classes == 10 and not any('bn' in k and 'weight' in k for k in model.state_dict())
    assert 'import timm_nofrost' in (out / 'README.md').read_text()


def test_convert_cli_keeps_checkpoint_weights(tmp_path, capsys):
    torch.manual_seed(0)
    source = timm.create_model('resnet18', num_classes=4)
    ckpt = tmp_path / 'bn.pth'
    torch.save(authors_state_dict(source), ckpt)  # DDP-prefixed, as training scripts save them
    out = tmp_path / 'out'
    assert main(['convert', '--model', 'resnet18', '--checkpoint', str(ckpt), '--num-classes', '4',
                 '--out', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'residual blocks rescaled: 8 (3 transition)' in text and 'init=keep' in text
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_convert_cli_errors(tmp_path, capsys):
    assert main(['convert', '--model', 'not_a_model', '--out', str(tmp_path / 'a')]) == 2
    assert "Unknown model 'not_a_model'" in capsys.readouterr().err
    ckpt = tmp_path / 'wrong.pth'
    torch.save(timm.create_model('resnet18').state_dict(), ckpt)
    assert main(['convert', '--model', 'resnet50', '--checkpoint', str(ckpt), '--out', str(tmp_path / 'b')]) == 2
    err = capsys.readouterr().err
    assert 'wrong.pth' in err and 'missing keys' in err
    assert main(['convert', '--model', 'resnet18', '--alpha', '3', '--out', str(tmp_path / 'c')]) == 2
    assert 'alpha must be a number in (0, 1]' in capsys.readouterr().err
    assert main(['convert', '--model', 'resnet18', '--norms', 'instance', '--out', str(tmp_path / 'd')]) == 2
    assert "Unknown normalizer kind(s) ['instance']" in capsys.readouterr().err
    for name in 'abcd':
        assert not (tmp_path / name).exists()


def test_normfree_converted_model(tmp_path):
    model = timm.create_model('normfree_converted', base_model='resnet26d', num_classes=3,
                              conversion=dict(alpha=0.3, init='fresh'))
    assert model.pretrained_cfg['architecture'] == 'normfree_converted'
    assert model.pretrained_cfg['first_conv'] == 'conv1.0'  # the base model's preprocessing cfg
    assert len(model.normfree_report.blocks) == 8 and model.normfree_report.alpha == 0.3
    features = timm.create_model('normfree_converted', base_model='resnet18', features_only=True)
    assert [f.shape[1] for f in features(torch.rand(1, 3, 64, 64))] == [64, 64, 128, 256, 512]
    with pytest.raises(ValueError, match="Unknown base_model 'nope'"):
        timm.create_model('normfree_converted', base_model='nope')


def test_normfree_converted_loads_weights_from_a_file(tmp_path):
    model = randomize_gains(timm.create_model('normfree_converted', base_model='resnet18', num_classes=5)).eval()
    path = tmp_path / 'nf.pth'
    torch.save({'model': authors_state_dict(model)}, path)
    loaded = timm.create_model('normfree_converted', base_model='resnet18', num_classes=5, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # BN weights are not normalizer-free weights: a clear error, not a silent partial load
    bn = tmp_path / 'bn.pth'
    torch.save(timm.create_model('resnet18', num_classes=5).state_dict(), bn)
    with pytest.raises(ValueError, match=r"bn\.pth.*unexpected keys \(bn1\.weight"):
        timm.create_model('normfree_converted', base_model='resnet18', num_classes=5, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(bn)))


def test_convert_example_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).parents[1] / 'examples' / 'convert_torchvision_resnet.py'
    out = subprocess.run([sys.executable, str(script), '--steps', '12'], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert 'residual blocks rescaled: 8 (3 transition)' in out.stdout
    assert 'fused for deployment: max |diff|' in out.stdout
