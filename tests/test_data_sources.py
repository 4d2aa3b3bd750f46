"""One data-source resolver for ``train`` and ``eval``: the printed eval command evaluates exactly the run's
validation images, at the run's resolution, for every kind of source."""
import hashlib
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from timm_nofrost.cli import main
from timm_nofrost.data import demo
from timm_nofrost.data.sources import (
    SourceSpec, build_datasets, build_eval_dataset, holdout_split, image_fingerprint, image_names, resolve_source)

from conftest import TINY_ARGS, TINY_MODEL

TINY_KWARGS = json.dumps({**TINY_ARGS, 'drop_rate': 0.0, 'drop_path_rate': 0.0})
CLASSES = ('ant', 'bee', 'cat')


def write_pngs(root: Path, n: int, seed: int, size: int = 20) -> Path:
    """``n`` random RGB images spread over three class folders (tiny, generated in the test)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f'{seed}_{i:03d}.png')
    return root


@pytest.fixture(scope='module')
def split_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('split')
    write_pngs(root / 'train', 48, seed=1)
    write_pngs(root / 'test', 15, seed=2)
    return root


@pytest.fixture(scope='module')
def single_folder(tmp_path_factory) -> Path:
    return write_pngs(tmp_path_factory.mktemp('single'), 40, seed=3)


@pytest.fixture(scope='module')
def timm_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('timm_root')
    write_pngs(root / 'train', 30, seed=4)
    write_pngs(root / 'val', 12, seed=5)
    return root


TINY = ('--model', TINY_MODEL, '--model-kwargs', TINY_KWARGS)


def train_then_eval(capsys, tmp_path, data: str, *extra: str, model=TINY):
    """A one-epoch run, then its printed eval command (clean only): (results.json, eval report, command)."""
    out = tmp_path / 'run'
    assert main(['train', '--data', data, *model, '--img-size', '16', '-b', '50', '--epochs', '1', '--adv-steps', '1',
                 '--robust-examples', '4', '--final-attacks', 'clean', '--eval-attack', 'pgd-1', '--out', str(out),
                 '--no-progress', '--json', *extra]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results == json.loads((out / 'results.json').read_text())
    command = results['eval_command']
    assert command.startswith('timm-nofrost eval ') and '--img-size 16' in command
    assert main(shlex.split(command)[1:] + ['--json', '--attacks', 'clean', '--no-sanity', '--no-progress']) == 0
    report = json.loads(capsys.readouterr().out)
    # exactly the run's validation images, and the same clean accuracy as the run measured on them
    assert report['data'] == results['data'] and report['data']['n_images'] > 0
    assert report['n_examples'] == results['data']['n_images']
    run = results['runs']['nofrost']
    assert run['final']['val_clean_top1_full'] == run['epochs'][-1]['val_clean_top1']
    assert 100 * report['clean_accuracy'] == pytest.approx(run['final']['val_clean_top1_full'], abs=1e-9)
    return results, report, command


def test_eval_command_on_the_demo_data(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, '_DEFAULT_SIZES', {'train': 100, 'val': 60})  # fast; rendered as usual, at 16 px
    results, report, command = train_then_eval(capsys, tmp_path, 'demo', '--val-fraction', '0.3')
    assert '--data demo' in command and '--val-fraction' not in command and '--data-dir' not in command
    assert results['data']['n_images'] == 60 and results['data']['hashed'] == 'paths'
    # rendered and transformed at the training size: at the model's default size the accuracy is another one
    assert build_eval_dataset('demo', img_size=16)[0][0].size == (16, 16)


def test_eval_command_on_a_train_test_image_folder(capsys, tmp_path, split_root):
    results, report, command = train_then_eval(capsys, tmp_path, str(split_root))
    assert results['data']['n_images'] == 15 and '--val-fraction' not in command


def test_eval_command_on_a_single_folder_with_a_held_out_fraction(capsys, tmp_path, single_folder):
    results, report, command = train_then_eval(capsys, tmp_path, str(single_folder), '--val-fraction', '0.25',
                                               '--seed', '7')
    assert '--val-fraction 0.25 --split-seed 7' in command
    assert results['data']['n_images'] == 10  # 25 % of 40, not the whole folder
    assert results['data'] == image_fingerprint(build_datasets(str(single_folder), val_fraction=0.25, seed=7).val)


def test_eval_command_on_a_timm_dataset_name(capsys, tmp_path, timm_root):
    results, report, command = train_then_eval(capsys, tmp_path, 'torch/image_folder', '--data-dir', str(timm_root))
    assert f'--data torch/image_folder --data-dir {timm_root}' in command
    assert results['data']['n_images'] == 12
    # the older eval spelling NAME:ROOT names the same images
    assert main(['eval', '--model', TINY_MODEL, '--model-kwargs', TINY_KWARGS, '--num-classes', '3',
                 '--data', f'torch/image_folder:{timm_root}', '--img-size', '16', '--attacks', 'clean', '--no-sanity',
                 '--json']) == 0
    assert json.loads(capsys.readouterr().out)['data'] == results['data']


def test_eval_command_of_a_convert_run(capsys, tmp_path, split_root):
    model = ('--model', 'resnet10t', '--model-kwargs', json.dumps({'channels': [8, 16, 32, 64], 'stem_width': 8}))
    results, report, command = train_then_eval(capsys, tmp_path, str(split_root), '--convert', model=model)
    assert ' --convert ' in command
    # without --convert the converted weights do not fit the BatchNorm model: a one-line error
    args = shlex.split(command.replace(' --convert', ''))[1:] + ['--attacks', 'clean', '--no-sanity']
    assert main(args) == 2
    err = capsys.readouterr().err
    assert 'does not fit resnet10t' in err and 'Traceback' not in err
    args = shlex.split(command.replace("--num-classes 3", "--num-classes 4"))[1:] + ['--attacks', 'clean']
    assert main(args) == 2
    err = capsys.readouterr().err
    assert 'does not fit resnet10t (converted with --convert)' in err and 'Traceback' not in err


def test_eval_of_a_train_test_folder_is_the_test_images(capsys, split_root):
    assert main(['eval', '--model', TINY_MODEL, '--model-kwargs', TINY_KWARGS, '--num-classes', '3', '--data',
                 str(split_root), '--attacks', 'clean', '--no-sanity', '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    test_images = sorted(str(p.relative_to(split_root / 'test')) for p in (split_root / 'test').rglob('*.png'))
    assert report['n_examples'] == 15 and report['data']['n_images'] == 15
    assert report['data']['images_sha256'] == hashlib.sha256('\n'.join(test_images).encode()).hexdigest()
    assert image_names(build_eval_dataset(str(split_root))) == test_images
    assert len(build_eval_dataset(str(split_root), split='train')) == 48


def test_one_resolver_for_both_commands(single_folder, split_root, timm_root):
    # a single folder: whole for eval without a fraction, exactly train's held-out part with one
    whole = build_eval_dataset(str(single_folder))
    assert len(whole) == 40
    held_out = build_eval_dataset(str(single_folder), val_fraction=0.1, seed=3)
    assert image_fingerprint(held_out) == image_fingerprint(build_datasets(str(single_folder), seed=3).val)
    assert held_out.indices == holdout_split(40, 0.1, 3)[1] and len(held_out) == 4
    assert image_fingerprint(held_out) != image_fingerprint(build_eval_dataset(str(single_folder), val_fraction=0.1))
    # labels follow the training folder's classes
    assert [build_eval_dataset(str(split_root))[i][1] for i in (0, 5, 10)] == [0, 1, 2]
    assert resolve_source('demo') == SourceSpec('demo')
    assert resolve_source(str(split_root)).kind == 'image-folder'
    assert resolve_source(str(single_folder)).kind == 'folder'
    assert resolve_source('torch/cifar10', '/data') == SourceSpec('timm', 'torch/cifar10', '/data')
    assert resolve_source('torch/cifar10:/data') == SourceSpec('timm', 'torch/cifar10', '/data')
    fp = image_fingerprint(TensorDataset(torch.zeros(3, 1), torch.zeros(3)))
    assert fp == {'n_images': 3, 'images_sha256': hashlib.sha256(b'0\n1\n2').hexdigest(), 'hashed': 'indices'}


@pytest.mark.parametrize('data,kwargs,error,match', [
    ('{missing}', {}, FileNotFoundError, 'Dataset folder not found: .*missing .*does not exist'),
    ('imagenet', {}, ValueError, "Unknown data 'imagenet': expected 'demo', an ImageFolder directory"),
    ('{single}', dict(val_fraction=1.5), ValueError, r'val_fraction must be a number in \(0, 1\), got 1.5'),
    ('{single}', dict(val_fraction=0), ValueError, r'val_fraction must be a number in \(0, 1\), got 0'),
    ('{split}', dict(val_fraction=0.2), ValueError, 'val_fraction applies to a single folder of class folders'),
    ('{split}', dict(split='holdout'), ValueError, "Unknown split 'holdout'"),
    ('torch/cifar10:/a', dict(data_dir='/b'), ValueError, "names the root '/a' and --data-dir names '/b'"),
    ('torch/image_folder', {}, ValueError, r'Could not open .*torch/image_folder.*pass --data-dir'),
])
def test_bad_sources(tmp_path, single_folder, split_root, data, kwargs, error, match):
    data = data.format(missing=tmp_path / 'missing', single=single_folder, split=split_root)
    with pytest.raises(error, match=match):
        build_eval_dataset(data, **kwargs)


def test_bad_sources_on_the_command_line(capsys, tmp_path, single_folder):
    base = ['eval', '--model', TINY_MODEL, '--model-kwargs', TINY_KWARGS, '--num-classes', '3', '--attacks', 'clean']
    for extra, message in [
        (['--data', str(tmp_path / 'nope')], 'does not exist'),
        (['--data', str(single_folder), '--val-fraction', '2'], 'val_fraction must be a number in (0, 1), got 2.0'),
        (['--data', 'cifar10'], "Unknown data 'cifar10'"),
        (['--data', str(single_folder), '--convert', '--checkpoint', str(tmp_path / 'none.pth')], 'none.pth'),
    ]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1, (extra, err)
