"""``timm-nofrost train``: outputs, resume, atomic checkpoints, faults and bad input."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from timm_nofrost import AdversarialConfig
from timm_nofrost.cli import main
from timm_nofrost.training import checkpointing
from timm_nofrost.training.checkpointing import atomic_save, load_training_checkpoint
from timm_nofrost.training.run import TrainConfig, TrainingDiverged, train

from conftest import TINY_ARGS, TINY_MODEL, image_folders, interrupt_after_epochs

TESTS = Path(__file__).parent
TINY_KWARGS = json.dumps({**TINY_ARGS, 'drop_rate': 0.0, 'drop_path_rate': 0.0})


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    return image_folders(tmp_path_factory.mktemp('shapes'), train=40, val=15)


def tiny_args(data_dir: Path, out: Path, *extra: str) -> list:
    return ['train', '--data', str(data_dir), '--model', TINY_MODEL, '--model-kwargs', TINY_KWARGS,
            '--img-size', '16', '-b', '10', '--epochs', '2', '--adv-steps', '1', '--robust-examples', '6',
            '--final-attacks', 'clean,pgd-5,apgd-ce-5', '--eval-attack', 'pgd-3', '--out', str(out),
            '--no-progress', *extra]


def final_accuracy_by_hand(data_dir: Path, checkpoint: Path, n=None, pgd=None, apgd=None, eps=8 / 255) -> dict:
    """The run's final numbers (%) recomputed without its evaluation: the checkpoint in a fresh model, timm's own
    dataset and (un-normalised) eval transform, the ``n`` validation images spread evenly (all without ``n``), a
    direct forward for clean, PGD-``pgd`` / APGD-CE-``apgd`` at ``eps`` (seed 0) on the batch, robust = clean-correct
    and still correct, worst case = robust under both."""
    from timm.data import ImageDataset, create_transform, resolve_data_config
    from timm_nofrost.attacks import APGD, PGD, PixelModel
    model = timm.create_model(TINY_MODEL, num_classes=5, **json.loads(TINY_KWARGS))
    model.load_state_dict(load_training_checkpoint(checkpoint)['state_dict'])
    model.eval()
    config = resolve_data_config({'input_size': (3, 16, 16)}, model=model)
    val = ImageDataset(str(data_dir / 'val'), transform=create_transform(**config, normalize=False))
    rows = [i * len(val) // n for i in range(n)] if n else range(len(val))
    x = torch.stack([val[i][0] for i in rows]).float() / 255  # uint8 out of the transform
    y = torch.tensor([val[i][1] for i in rows])
    with torch.no_grad():
        clean = PixelModel(model, config['mean'], config['std'])(x).argmax(1) == y
    correct = {'clean': clean}
    if pgd:
        correct[f'pgd-{pgd}'] = PGD(model, eps=eps, steps=pgd, seed=0)(x, y).correct & clean
    if apgd:
        correct[f'apgd-ce-{apgd}'] = APGD(model, eps=eps, steps=apgd, loss='ce', seed=0)(x, y).correct & clean
    if pgd and apgd:
        correct['worst-case'] = correct[f'pgd-{pgd}'] & correct[f'apgd-ce-{apgd}']
    return {name: 100 * c.float().mean().item() for name, c in correct.items()}


def test_train_writes_timm_checkpoints_summary_and_table(data_dir, tmp_path, capsys):
    out = tmp_path / 'run'
    # eps 4/255: the attacks flip some of the clean-correct validation images, not all
    assert main(tiny_args(data_dir, out, '--json', '--adv-eps', '4/255')) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)  # with --json, stdout is only JSON; the log went to stderr
    assert '| model | clean | pgd-5 | apgd-ce-5 | worst-case |' in captured.err
    assert 'epoch 2/2' in captured.err and 'val pgd-3' in captured.err
    run = results['runs']['nofrost']
    assert [e['epoch'] for e in run['epochs']] == [1, 2]
    final = run['final']['accuracy']
    # the final numbers are the last checkpoint's on the 6 images spread over the 15, clean also on all 15
    last = out / 'checkpoint-last.pth'
    assert final == pytest.approx(final_accuracy_by_hand(data_dir, last, n=6, pgd=5, apgd=5, eps=4 / 255))
    assert run['final']['val_clean_top1_full'] == pytest.approx(final_accuracy_by_hand(data_dir, last)['clean'])
    lines = [json.loads(line) for line in (out / 'summary.jsonl').read_text().splitlines()]
    assert [row['epoch'] for row in lines] == [1, 2]
    for row in lines:
        assert {'train_loss', 'train_loss_clean', 'train_loss_adv', 'val_clean_top1', 'val_robust_top1', 'lr'} <= set(row)
        assert torch.isfinite(torch.tensor(row['train_loss']))
    # a timm-format checkpoint: timm's own loader reads it (weights_only) into the same architecture
    state = load_training_checkpoint(out / 'checkpoint-last.pth')
    assert state['epoch'] == 1 and state['arch'] == TINY_MODEL
    model = timm.create_model(TINY_MODEL, num_classes=5, checkpoint_path=str(out / 'checkpoint-last.pth'),
                              **json.loads(TINY_KWARGS))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state['state_dict'][k])
    assert (out / 'model_best.pth').is_file() and (out / 'robustness.md').is_file()
    assert json.loads((out / 'results.json').read_text())['runs']['nofrost']['final']['accuracy'] == final
    # the printed follow-up command evaluates the best checkpoint (model kwargs and class count included)
    command = shlex.split(results['eval_command'])
    assert command[:2] == ['timm-nofrost', 'eval'] and '--model-kwargs' in command and '--num-classes' in command
    assert main(command[1:] + ['--n-examples', '6', '--no-sanity', '--no-progress', '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['n_examples'] == 6 and set(report['attacks']) == {'pgd-20', 'apgd-ce', 'apgd-t'}
    # without the model kwargs the checkpoint does not fit: a one-line error, no traceback
    assert main(['eval', '--model', TINY_MODEL, '--checkpoint', str(out / 'model_best.pth'), '--data', str(data_dir),
                 '--n-examples', '2']) == 2
    err = capsys.readouterr().err
    assert "does not fit nf_resnet18_cifar_nofrost: " in err and 'shape mismatches (stem.conv.weight: checkpoint' in err
    assert 'pass the --num-classes and --model-kwargs the model was trained with' in err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1


def test_resume_continues_where_the_run_stopped(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    interrupt_after_epochs(monkeypatch, 1)
    assert main(tiny_args(data_dir, out)) == 2
    assert 'No space left on device (injected)' in capsys.readouterr().err
    assert main(tiny_args(data_dir, out)) == 2  # a second run into the same folder must say so
    assert 'pass --resume to continue it or --overwrite' in capsys.readouterr().err
    assert main(tiny_args(data_dir, out, '--resume')) == 0
    text = capsys.readouterr().out
    assert 'resumed from' in text and 'epoch 1 of 2 done' in text and 'epoch 2/2' in text and 'epoch 1/2' not in text
    assert [json.loads(x)['epoch'] for x in (out / 'summary.jsonl').read_text().splitlines()] == [1, 2]
    assert load_training_checkpoint(out / 'checkpoint-last.pth')['epoch'] == 1


class NaNAfter(nn.Module):
    """A tiny classifier whose output turns NaN after ``n`` training forwards."""

    def __init__(self, n: int):
        super().__init__()
        self.net = timm.create_model(TINY_MODEL, num_classes=5, **json.loads(TINY_KWARGS))
        self.pretrained_cfg = self.net.pretrained_cfg
        self.n, self.calls = n, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        out = self.net(x)
        return out * float('nan') if self.training and self.calls > self.n else out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    out = tmp_path / 'run'
    cfg = TrainConfig(data=str(data_dir), model=TINY_MODEL, img_size=16, batch_size=10, epochs=3, robust_examples=4,
                      final_attacks='clean,pgd-3', eval_attack='pgd-3', out_dir=str(out), progress=False)
    model = NaNAfter(n=5)  # 4 training batches per epoch: NaN in the second epoch
    with pytest.raises(TrainingDiverged, match=r'loss is nan at epoch 2, step 2: training stopped; the last good '
                                               r'checkpoint .*checkpoint-last.pth \(epoch 1\) is kept'):
        train(cfg, model=model)
    state = load_training_checkpoint(out / 'checkpoint-last.pth')
    assert state['epoch'] == 0
    assert all(torch.isfinite(v).all() for v in state['state_dict'].values())
    assert not list(out.glob('.*.tmp'))


def test_nan_loss_exit_code(data_dir, tmp_path, monkeypatch, capsys):
    from timm_nofrost.training import run
    monkeypatch.setattr(run, 'build_model', lambda cfg, num_classes, model=None: NaNAfter(n=0))
    assert main(tiny_args(data_dir, tmp_path / 'run')) == 3
    assert 'loss is nan at epoch 1, step 1' in capsys.readouterr().err


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint-last.pth'
    atomic_save({'state_dict': {'w': torch.ones(3)}, 'epoch': 0}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(checkpointing.torch, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        atomic_save({'state_dict': {'w': torch.zeros(3)}, 'epoch': 1}, path)
    monkeypatch.undo()
    state = load_training_checkpoint(path)
    assert state['epoch'] == 0 and torch.equal(state['state_dict']['w'], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-last.pth']


def _run_cli(args: list, env: dict, **kwargs) -> subprocess.Popen:
    code = (f'import sys; sys.path.insert(0, {str(TESTS)!r}); import slow_training; '
            'from timm_nofrost.cli import main; sys.exit(main(sys.argv[1:]))')
    return subprocess.Popen([sys.executable, '-c', code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.timeout(300)
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(data_dir, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    args = lambda out, *extra: [a for a in tiny_args(data_dir, out, '--epochs', '3', '--deterministic', *extra)]  # noqa
    reference = _run_cli(args(tmp_path / 'ref'), env)
    assert reference.wait(timeout=240) == 0, reference.stdout.read()

    killed = _run_cli(args(tmp_path / 'run'), env)
    summary = tmp_path / 'run' / 'summary.jsonl'
    deadline = time.time() + 200
    while not (summary.exists() and summary.read_text().count('\n') >= 1) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.4)  # well inside epoch 2 (4 batches of >= 0.15 s each)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    assert summary.read_text().count('\n') == 1  # it died during epoch 2
    assert load_training_checkpoint(tmp_path / 'run' / 'checkpoint-last.pth')['epoch'] == 0

    resumed = _run_cli(args(tmp_path / 'run', '--resume'), env)
    output = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, output
    ref = load_training_checkpoint(tmp_path / 'ref' / 'checkpoint-last.pth')
    got = load_training_checkpoint(tmp_path / 'run' / 'checkpoint-last.pth')
    assert got['epoch'] == ref['epoch'] == 2
    for k, v in ref['state_dict'].items():
        assert torch.equal(v, got['state_dict'][k]), k


def test_bad_input_fails_before_training(data_dir, tmp_path, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'cat').mkdir()
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    cases = [
        (['--data', str(tmp_path / 'missing')], 'does not exist'),
        (['--data', str(empty)], 'has class folders (cat) but no images'),
        (['--model', 'resnet_does_not_exist'], "Unknown model 'resnet_does_not_exist'"),
        (['--out', str(blocker / 'sub')], 'is not writable'),
        (['--adv-eps', '-1'], 'must be a finite number >= 0'),
        (['--adv-steps', '0'], 'steps=0 makes no adversarial examples'),
        (['--epochs', '0'], 'epochs must be a positive integer'),
        (['--eval-attack', 'pgd-x'], "Unknown attack 'pgd-x'"),
        (['--model-kwargs', '{bad'], 'argument --model-kwargs: not valid JSON'),
        (['--resume', str(tmp_path / 'nope.pth')], 'Nothing to resume'),
    ]
    for extra, message in cases:
        out = tmp_path / 'out'
        start = time.time()
        try:
            code = main(tiny_args(data_dir, out, *extra))
        except SystemExit as e:  # argparse's one-line usage error
            code = e.code
        assert code == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
        assert 'Traceback' not in err and time.time() - start < 20
        assert not (out / 'checkpoint-last.pth').exists()


def test_compare_bn_trains_the_batchnorm_twin(data_dir, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(tiny_args(data_dir, out, '--epochs', '1', '--compare-bn', '--json')) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results['runs']) == {'nofrost', 'bn-at'}
    assert results['runs']['bn-at']['name'] == 'BN-AT (resnet18)'
    assert [e['epoch'] for e in results['runs']['bn-at']['epochs']] == [1]
    state = load_training_checkpoint(out / 'bn-at' / 'checkpoint-last.pth')
    # trained with shared BN and two forwards a step (BN-AT): every BN saw a clean and an adversarial batch in
    # each of the 4 steps (40 images, batch 10); the attack and the evaluation run in eval mode and add none
    tracked = {k: int(v) for k, v in state['state_dict'].items() if k.endswith('num_batches_tracked')}
    assert len(tracked) == 1 + 4 * 2 * 2 + 3  # stem, 4 stages x 2 blocks x 2 BNs, 3 downsample BNs
    assert set(tracked.values()) == {2 * 4}
    assert all(v.abs().sum() > 0 for k, v in state['state_dict'].items() if k.endswith('running_mean'))


def test_convert_trains_a_batchnorm_model_without_batchnorm(data_dir, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(tiny_args(data_dir, out, '--epochs', '1', '--model', 'resnet18', '--model-kwargs', '{}', '--convert',
                          '--json')) == 0
    results = json.loads(capsys.readouterr().out)
    assert results['config']['convert'] is True and results['runs']['nofrost']['epochs'][0]['epoch'] == 1
    state = load_training_checkpoint(out / 'checkpoint-last.pth')['state_dict']
    # the converted resnet18 (seeded as train seeds it) is what was trained: the same tensors, no BatchNorm
    # left, and the weights moved from their initial values
    from timm_nofrost.convert import convert_to_normfree
    torch.manual_seed(0)
    initial = convert_to_normfree(timm.create_model('resnet18', num_classes=5), init='fresh').state_dict()
    assert set(state) == set(initial) and not any('running' in k for k in state)
    assert all(state[k].shape == v.shape for k, v in initial.items())
    moved = [k for k, v in initial.items() if not torch.equal(v, state[k])]
    assert len(moved) >= 0.9 * len(initial), sorted(set(initial) - set(moved))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_torchrun_two_cpu_processes(data_dir, tmp_path):
    out = tmp_path / 'ddp'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               '-m', 'timm_nofrost', *tiny_args(data_dir, out, '-b', '5', '--json')]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)  # only rank 0 prints
    run = results['runs']['nofrost']
    assert [e['epoch'] for e in run['epochs']] == [1, 2]
    assert 'batch 5 x 2' in done.stderr  # 2 processes of 5 images: the same global batch of 10
    assert [json.loads(x)['epoch'] for x in (out / 'summary.jsonl').read_text().splitlines()] == [1, 2]
    state = load_training_checkpoint(out / 'checkpoint-last.pth')
    assert not any(k.startswith('module.') for k in state['state_dict'])  # saved unwrapped, timm-loadable


def test_robust_subset_spans_the_classes_of_a_sorted_image_folder(data_dir):
    from timm.data import create_transform
    from timm_nofrost.data.sources import build_datasets, spread_indices
    from timm_nofrost.training.epoch_eval import robust_report
    val = build_datasets(str(data_dir), img_size=16).val  # ImageFolder order: sorted by class, 3 images each
    assert [val[i][1] for i in range(5)] == [0, 0, 0, 1, 1]  # the first 5 would cover two classes
    assert sorted(val[i][1] for i in spread_indices(5, len(val))) == [0, 1, 2, 3, 4]
    val.transform = create_transform(16, is_training=False, crop_pct=1.0, normalize=False)
    model = timm.create_model(TINY_MODEL, num_classes=5, **json.loads(TINY_KWARGS))
    with torch.no_grad():  # a model that always answers class 0
        model.head.fc.weight.zero_()
        model.head.fc.bias.copy_(torch.tensor([10.0, 0, 0, 0, 0]))
    cfg = TrainConfig(data=str(data_dir), robust_examples=5, batch_size=5, adv=AdversarialConfig(steps=2))
    report = robust_report(model, val, cfg, torch.device('cpu'), 'clean,pgd-2', False, 'tiny')
    assert report.n_examples == 5 and report.clean_accuracy == pytest.approx(0.2)  # one image per class; first 5: 0.6
