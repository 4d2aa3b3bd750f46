"""One evaluation spread over torchrun's processes (gloo on CPU): the batches are split across the ranks, and the
first rank writes one report whose per-image outcomes equal a one-process run's; a rank that dies leaves the
others' progress for the same command to continue."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from timm_nofrost.cli import main
from timm_nofrost.evaluate.journal import progress_folder

from conftest import image_folders

pytestmark = pytest.mark.slow
REPO = Path(__file__).parents[1]
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
       'OMP_NUM_THREADS': '1'}
# a rank that records its first batch and dies before the next write: SIGKILL-like, no cleanup
DIE_ON_RANK_1 = textwrap.dedent('''
    import os, sys
    from timm_nofrost import files
    from timm_nofrost.cli import main
    if os.environ['RANK'] == '1':
        seen = []
        def hook(path, stage):
            if stage == 'begin':
                seen.append(path.name)
                if seen.count('batch-000001.json') == 2:  # batch 1 recorded after its first attack only
                    os._exit(9)
        files.WRITE_HOOK = hook
    sys.exit(main(sys.argv[1:]))
''')


def timeless(value):
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if k != 'seconds'}
    return [timeless(v) for v in value] if isinstance(value, list) else value


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    import timm
    root = tmp_path_factory.mktemp('shard')
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=5)  # clean accuracy above chance on these shapes: attacks work
    torch.save(model.state_dict(), root / 'weights.pth')
    return root, image_folders(root / 'data', train=1, val=11)


def args(setup, out, batch_size):
    root, data = setup
    return ['eval', '--model', 'resnet10t', '--num-classes', '5', '--checkpoint', str(root / 'weights.pth'),
            '--data', str(data), '--img-size', '16', '--attacks', 'clean,pgd-3,apgd-ce-5', '--eps', '1/255,4/255',
            '--batch-size', str(batch_size), '--sanity-examples', '4', '--no-progress', '--json', '--out', str(out)]


def torchrun(n, command, script=None):
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}']
    target = ['-m', 'timm_nofrost'] if script is None else [script]
    return subprocess.run(launcher + target + command, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('n, batch_size', [(2, 4), (3, 3)])  # 11 images: 3 batches on 2 ranks, 4 on 3
def test_sharded_report_equals_one_process(setup, tmp_path, n, batch_size):
    assert main(args(setup, tmp_path / 'one.json', batch_size)) == 0
    one = json.loads((tmp_path / 'one.json').read_text())
    assert 0 < one['clean_accuracy'] and one['n_examples'] == 11
    done = torchrun(n, args(setup, tmp_path / 'many.json', batch_size)[:-2] + ['--out', str(tmp_path / 'many.json')])
    assert done.returncode == 0, done.stderr[-3000:]
    many = json.loads((tmp_path / 'many.json').read_text())
    assert many['per_example'] == one['per_example'] and timeless(many) == timeless(one)
    assert done.stdout.count('"per_example"') == 1  # one rank printed the report
    assert not progress_folder(tmp_path / 'many.json').exists()


def test_a_rank_that_dies_leaves_the_others_progress(setup, tmp_path):
    assert main(args(setup, tmp_path / 'one.json', 3)) == 0
    out = tmp_path / 'many.json'
    script = tmp_path / 'die.py'
    script.write_text(DIE_ON_RANK_1)
    died = torchrun(2, args(setup, out, 3), script=str(script))
    assert died.returncode != 0
    folder = progress_folder(out)
    recorded = sorted(p.name for p in folder.glob('batch-*.json'))
    assert 'batch-000000.json' in recorded and 'batch-000001.json' in recorded and not out.exists()
    partial = json.loads((folder / 'batch-000001.json').read_text())
    assert list(partial['attacks']['1/255']) == ['pgd-3']  # rank 1 died inside its first batch
    assert main(args(setup, out, 3)) == 0  # one process continues what the two left
    assert timeless(json.loads(out.read_text())) == timeless(json.loads((tmp_path / 'one.json').read_text()))
