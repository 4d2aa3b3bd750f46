"""timm-train: timm's train.py run with AdversarialTrainer swapped in and robust top-1 added to validation.

The unit tests drive a stand-in train.py written here (same globals as timm's: ``parser``, ``_parse_args``,
``ClassificationTask``, ``validate``, ``main``). ``test_real_train_py`` runs the real script of a timm clone
when ``TIMM_TRAIN_SCRIPT`` points to it.
"""
import csv
import functools
import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import timm
import torch
from timm.data.distributed_sampler import OrderedDistributedSampler
from timm.task import ClassificationTask

from timm_nofrost.attacks import FGSM, PGD
from timm_nofrost.cli import main as cli_main
from timm_nofrost.cli.timm_train import split_arguments
from timm_nofrost.cli._common import CliError
from timm_nofrost.training import AdversarialConfig, AdversarialTrainer
from timm_nofrost.training.timm_launcher import (
    LaunchedAdversarialTrainer, RobustValidationConfig, SubsetCollector, _autocast_dtype, load_train_script,
    run_timm_train)
from timm_nofrost.data.sources import spread_indices

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
# one OpenMP thread per subprocess: on a busy 2-core machine spinning threads slow tiny models tenfold
SUBPROCESS_ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}

# A stand-in for timm's train.py, written for these tests: the globals the launcher swaps, and a main() that
# trains a few steps on random tensors, then validates (and validates the EMA model with --model-ema).
FAKE_TRAIN_PY = '''
import argparse
import json
import sys
from collections import OrderedDict
from contextlib import suppress

import timm
import torch
from timm.data import resolve_data_config
from timm.task import ClassificationTask

parser = argparse.ArgumentParser()
parser.add_argument('data', nargs='?', default='')
parser.add_argument('--model', default='nf_resnet18_cifar_nofrost')
parser.add_argument('--num-classes', type=int, default=3)
parser.add_argument('--steps', type=int, default=2)
parser.add_argument('--mean', type=float, nargs=3, default=None)
parser.add_argument('--std', type=float, nargs=3, default=None)
parser.add_argument('--kd-model-name', default=None)
parser.add_argument('--model-ema', action='store_true')
parser.add_argument('--record', default=None)
RESULTS = {}


def _parse_args():
    args = parser.parse_args()
    return args, 'model: %s\\n' % args.model


def validate(model, loader, loss_fn, args, device=torch.device('cpu'), amp_autocast=suppress, model_dtype=None,
             log_suffix=''):
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return OrderedDict([('loss', 0.0), ('top1', 100.0 * correct / total), ('top5', 100.0)])


def main():
    args, args_text = _parse_args()
    args.distributed, args.rank, args.world_size, args.device = False, 0, 1, 'cpu'
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.num_classes, channels=(8, 16, 32, 64), stem_chs=8)
    with torch.no_grad():  # non-zero residual gains: the logits depend on the input, attacks can flip them
        for name, param in model.named_parameters():
            if name.endswith('gain'):
                param.fill_(1.0)
        torch.nn.init.normal_(model.get_classifier().weight, std=1.0)
    data_config = resolve_data_config(vars(args), model=model)
    task = ClassificationTask(model=model, criterion=torch.nn.CrossEntropyLoss(), device=torch.device('cpu'),
                              dtype=None, verbose=False)
    if args.model_ema:
        task.setup_ema(decay=0.5)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05)
    mean = torch.tensor(data_config['mean']).view(1, 3, 1, 1)
    std = torch.tensor(data_config['std']).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(10, 3, 32, 32, generator=g)
    labels = torch.arange(10) % args.num_classes
    dataset = torch.utils.data.TensorDataset((pixels - mean) / std, labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False)
    losses = []
    for step in range(args.steps):
        result = task(*next(iter(loader)))
        optimizer.zero_grad()
        result['loss'].backward()
        optimizer.step()
        losses.append(result['loss'].item())
        if args.model_ema:
            task.update_ema(step=step)
    metrics = validate(task.get_eval_model(), loader, None, args)
    ema_metrics = None
    if args.model_ema:
        ema_metrics = validate(task.get_eval_model(ema=True), loader, None, args, log_suffix=' (EMA)')
    RESULTS.update(task=task, args=args, args_text=args_text, metrics=metrics, ema_metrics=ema_metrics,
                   pixels=pixels, labels=labels, losses=losses, sys_path=list(sys.path), argv=list(sys.argv),
                   timm_file=timm.__file__)
    if args.record:
        with open(args.record, 'w') as f:
            json.dump({'task': type(task).__name__, 'metrics': metrics, 'losses': losses, 'sys_path': sys.path,
                       'models': timm.list_models('*nofrost*')}, f)
        torch.save({'state_dict': task.get_eval_model().state_dict(), 'pixels': pixels, 'labels': labels},
                   args.record + '.pt')
'''


@pytest.fixture
def fake_script(tmp_path: Path) -> Path:
    """The stand-in train.py in a fake clone whose root holds a ``timm`` package that must never load."""
    clone = tmp_path / 'clone'
    (clone / 'timm').mkdir(parents=True)
    (clone / 'timm' / '__init__.py').write_text("raise ImportError('the clone shadowed the installed timm')\n")
    script = clone / 'train.py'
    script.write_text(FAKE_TRAIN_PY)
    return script


def run_fake(script: Path, *train_args: str, adv=None, val=None):
    adv = adv or AdversarialConfig(eps='8/255', steps=2)
    val = val or RobustValidationConfig('pgd-3', examples=6)
    return run_timm_train(script, ['--mean', *map(str, MEAN), '--std', *map(str, STD), *train_args], adv, val)


SUBSET = [0, 1, 3, 5, 6, 8]  # 6 of the 10 images, spread evenly: floor(i * 10 / 6)


@contextmanager
def one_thread():
    """torch on one thread, as in the OMP_NUM_THREADS=1 subprocesses: their numbers recomputed here bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def top1_by_hand(model, pixels: torch.Tensor, labels: torch.Tensor, steps: int, eps: float = 8 / 255,
                 batches=None) -> tuple:
    """Clean and robust top-1 (%) of ``model`` (normalising with its pretrained_cfg) on ``pixels``, under PGD-``steps``
    at ``eps`` with the launcher's seed (0), counted by hand: robust = clean-correct and still correct.
    ``batches``: the rows attacked together (each row's random start depends on its place in the batch)."""
    batches = batches or [list(range(len(labels)))]
    clean_count = robust_count = 0
    with one_thread():
        for rows in batches:
            x, y = pixels[rows], labels[rows]
            with torch.no_grad():
                mean, std = (torch.tensor(model.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
                clean = model((x - mean) / std).argmax(1) == y
            clean_count += int(clean.sum())
            robust_count += int((PGD(model, eps=eps, steps=steps, seed=0)(x, y).correct & clean).sum())
    n = sum(len(rows) for rows in batches)
    return 100.0 * clean_count / n, 100.0 * robust_count / n


def independent_robust(model, results: dict, attack_cls=PGD, **kwargs) -> torch.Tensor:
    """Per-example robustness of the subset, attacked in batches of the loader's size (4) as the launcher does."""
    pixels, labels = results['pixels'][SUBSET], results['labels'][SUBSET]
    correct = []
    for i in range(0, len(SUBSET), 4):
        attack = attack_cls(model, eps=8 / 255, mean=MEAN, std=STD, seed=0, **kwargs)
        correct.append(attack(pixels[i:i + 4], labels[i:i + 4]).correct)
    return torch.cat(correct)


# -- the swap --------------------------------------------------------------------------------------------------
def test_swaps_in_adversarial_trainer_and_forwards_args(fake_script):
    launcher = run_fake(fake_script, 'DATA', '--steps', '3', adv=AdversarialConfig(eps='4/255', steps=2,
                                                                                      adv_weight=0.75))
    results = launcher.module.RESULTS
    task = results['task']
    assert type(task) is LaunchedAdversarialTrainer
    assert isinstance(task, AdversarialTrainer) and isinstance(task, ClassificationTask)
    assert launcher.tasks == [task]
    assert (task.adv_cfg.eps, task.adv_cfg.steps, task.adv_cfg.adv_weight) == (4 / 255, 2, 0.75)
    assert task.adv_batches == 3  # every training step was adversarial
    assert task.input_normalized is True
    assert task.mean == pytest.approx(MEAN) and task.std == pytest.approx(STD)  # the data config's, from args
    assert task.batch_mode == 'concat'
    # train.py's own arguments reached its parser; argv[0] is the script
    args = results['args']
    assert (args.data, args.steps, args.model) == ('DATA', 3, 'nf_resnet18_cifar_nofrost')
    assert results['argv'][0] == str(fake_script)
    assert len(results['losses']) == 3 and all(math.isfinite(v) for v in results['losses'])
    # args.yaml gets our settings
    assert results['args_text'].startswith('model: nf_resnet18_cifar_nofrost\n')
    assert 'nofrost:' in results['args_text'] and 'eps: 0.01568' in results['args_text']
    # the clone root never went on sys.path: the installed timm stayed in use
    clone = str(fake_script.parent)
    assert clone not in results['sys_path'] and clone not in sys.path
    assert not results['timm_file'].startswith(clone)
    # the script's own functions are back after the run
    assert launcher.module.ClassificationTask is ClassificationTask
    assert launcher.module.validate.__module__ == launcher.module.__name__


def test_validate_adds_robust_top1_matching_an_independent_attack(fake_script):
    val = RobustValidationConfig('pgd-3, fgsm, clean, pgd-3', examples=6)  # duplicates dropped
    assert val.attacks == ('pgd-3', 'fgsm', 'clean')
    launcher = run_fake(fake_script, val=val)
    results = launcher.module.RESULTS
    metrics = results['metrics']
    assert list(metrics) == ['loss', 'top1', 'top5', 'robust_top1_pgd-3', 'robust_top1_fgsm', 'robust_top1_clean',
                             'robust_top1_worst-case']
    model = results['task'].get_eval_model()
    assert spread_indices(6, 10) == SUBSET
    pgd = independent_robust(model, results, PGD, steps=3)
    fgsm = independent_robust(model, results, FGSM)
    with torch.no_grad():
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        normalized = (results['pixels'][SUBSET] - mean) / std
        clean = model(normalized).argmax(1) == results['labels'][SUBSET]
    assert metrics['robust_top1_pgd-3'] == pytest.approx(100 * pgd.float().mean().item())
    assert metrics['robust_top1_fgsm'] == pytest.approx(100 * fgsm.float().mean().item())
    assert metrics['robust_top1_clean'] == pytest.approx(100 * clean.float().mean().item())
    assert metrics['robust_top1_worst-case'] == pytest.approx(100 * (pgd & fgsm).float().mean().item())
    assert metrics['robust_top1_pgd-3'] < metrics['robust_top1_clean']  # the attack does flip predictions
    assert metrics['robust_top1_worst-case'] <= min(metrics['robust_top1_pgd-3'], metrics['robust_top1_fgsm'])
    assert launcher.robust_history == [{'metrics': {k: metrics[k] for k in val.metric_names()}, 'examples': 6,
                                        'log_suffix': ''}]


def test_ema_validation_gets_its_own_robust_top1(fake_script):
    launcher = run_fake(fake_script, '--model-ema', '--steps', '2')
    results = launcher.module.RESULTS
    ema = results['task'].get_eval_model(ema=True)
    assert ema is not results['task'].get_eval_model()
    expected = 100 * independent_robust(ema, results, PGD, steps=3).float().mean().item()
    assert results['ema_metrics']['robust_top1_pgd-3'] == pytest.approx(expected)
    assert [h['log_suffix'] for h in launcher.robust_history] == ['', ' (EMA)']


def test_examples_zero_turns_robust_validation_off(fake_script):
    launcher = run_fake(fake_script, val=RobustValidationConfig('pgd-3', examples=0))
    assert list(launcher.module.RESULTS['metrics']) == ['loss', 'top1', 'top5']
    assert launcher.robust_history == []


def test_more_examples_than_images_counts_what_there_is(fake_script):
    launcher = run_fake(fake_script, val=RobustValidationConfig('clean', examples=50))
    assert launcher.robust_history[0]['examples'] == 10


def test_distillation_is_refused(fake_script):
    with pytest.raises(ValueError, match='kd-model-name'):
        run_fake(fake_script, '--kd-model-name', 'resnet18')


@pytest.mark.parametrize('n,size', [(6, 10), (4, 4), (9, 4), (500, 50000), (3, 1000)])
def test_spread_indices_are_distinct_and_even(n, size):
    indices = spread_indices(n, size)
    assert len(indices) == len(set(indices)) == min(n, size)
    assert indices[0] == 0 and indices == sorted(indices) and indices[-1] < size
    assert all(b - a in (size // min(n, size), -(-size // min(n, size))) for a, b in zip(indices, indices[1:]))


@pytest.mark.parametrize('size,world,n', [(10, 1, 6), (10, 3, 6), (11, 4, 11), (7, 2, 3), (5, 4, 2)])
def test_ranks_collect_the_subset_exactly_once(size, world, n):
    """Each rank sees its shard of timm's eval sampler (padded to equal length); the ranks keep the subset once."""
    images = torch.arange(size, dtype=torch.float32).view(size, 1, 1, 1).expand(size, 3, 2, 2) / 255
    labels = torch.arange(size)
    kept = []
    for rank in range(world):
        dataset = torch.utils.data.TensorDataset(images, labels)
        sampler = OrderedDistributedSampler(dataset, num_replicas=world, rank=rank)  # timm's eval sampler
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler)
        collector = SubsetCollector(loader, n, mean=(0., 0., 0.), std=(1., 1., 1.), rank=rank, world_size=world)
        batches = list(collector)  # what timm's validate would see, unchanged
        assert len(batches) == len(loader)
        pixels, targets = collector.examples()
        assert torch.allclose(pixels[:, 0, 0, 0] * 255, targets.float(), atol=1e-4)  # images with their labels
        assert pixels.requires_grad is False and not pixels.is_inference()
        assert all(p.dtype == torch.uint8 for p in collector.pixels)  # 8-bit images are kept as such
        kept += targets.tolist()
    assert sorted(kept) == spread_indices(n, size)


def test_collector_keeps_images_loaded_under_inference_mode_usable_for_attacks():
    x = torch.rand(4, 3, 2, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset((x - 0.5) / 0.25, torch.arange(4)),
                                         batch_size=4)
    collector = SubsetCollector(loader, 2, mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.inference_mode():
        list(collector)
    pixels, targets = collector.examples()
    assert not pixels.is_inference() and targets.tolist() == [0, 2]
    assert torch.allclose(pixels, x[[0, 2]], atol=1e-6)  # not 8-bit: kept as floats
    (pixels.requires_grad_() * 2).sum().backward()


def test_ddp_on_cpu_drops_the_device_ids_train_py_passes(tmp_path):
    """train.py calls prepare_distributed(device_ids=[device]); DDP refuses device ids for CPU modules."""
    import torch.distributed as dist
    store = dist.FileStore(str(tmp_path / 'store'), 1)
    dist.init_process_group('gloo', store=store, rank=0, world_size=1)
    try:
        task = LaunchedAdversarialTrainer(torch.nn.Linear(4, 3), steps=1, mean=(0.0,), std=(1.0,), verbose=False)
        task.prepare_distributed(device_ids=[torch.device('cpu')])
        ddp = task.get_trainable_module()
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.device_ids is None
    finally:
        dist.destroy_process_group()


def test_autocast_dtype_of_train_py_amp():
    assert _autocast_dtype(functools.partial(torch.autocast, device_type='cpu', dtype=torch.bfloat16)) \
        == torch.bfloat16
    assert _autocast_dtype(suppress) is None


# -- loading and the command line ------------------------------------------------------------------------------
def test_script_without_the_needed_globals_is_refused(tmp_path):
    script = tmp_path / 'train.py'
    script.write_text('def main():\n    pass\n')
    with pytest.raises(ValueError, match="does not look like timm's train.py: it has no ClassificationTask, "
                                         'validate, _parse_args'):
        load_train_script(script)
    with pytest.raises(FileNotFoundError, match='No timm train.py'):
        load_train_script(tmp_path / 'missing.py')


@pytest.mark.parametrize('tokens,own,train', [
    (['--', 'data', '-b', '8'], [], ['data', '-b', '8']),
    (['data', '-b', '8'], [], ['data', '-b', '8']),  # argparse drops a "--" right after SCRIPT
    (['--adv-eps', '4/255', '--', 'data'], ['--adv-eps', '4/255'], ['data']),
    (['--adv-steps', '3'], ['--adv-steps', '3'], []),
    ([], [], []),
])
def test_split_arguments(tokens, own, train):
    assert split_arguments(tokens) == (own, train)


@pytest.mark.parametrize('tokens', [
    ['data', '--adv-eps', '4/255'],
    ['--adv-steps', '2', '--', 'data', '--adv-eps=0.1'],
])
def test_adv_flag_among_train_arguments_is_refused(tokens):
    with pytest.raises(CliError, match='--adv-eps.* is a timm-train option'):
        split_arguments(tokens)


def test_train_py_errors_name_train_py(fake_script, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(['timm-train', str(fake_script), '--', '--no-such-flag'])
    assert e.value.code == 2
    assert 'train.py: error: unrecognized arguments: --no-such-flag' in capsys.readouterr().err


@pytest.mark.parametrize('flags,message', [
    (['--adv-eps', 'abc'], "Invalid eps 'abc'"),
    (['--adv-eps', '2'], 'above 1'),
    (['--adv-steps', '-1'], 'steps must be an integer >= 0'),
    (['--adv-weight', '1.5'], 'must be in [0, 1]'),
    (['--adv-step-size', '0.5'], 'is above eps'),
    (['--adv-eps-warmup-steps', '-3'], 'eps_warmup_steps'),
    (['--adv-val-attacks', 'foo'], "Unknown attack 'foo'"),
    (['--adv-val-attacks', 'pgd-0'], 'steps must be >= 1'),
    (['--adv-val-attacks', ','], 'No validation attack'),
    (['--adv-val-examples', '-1'], 'integer >= 0'),
    (['--adv-foo', '1'], 'unrecognized arguments before "--": --adv-foo 1'),
    (['--adv-method', 'pgd-at'], "Unknown method 'pgd-at'"),
    (['--adv-attack', 'fgsm'], "Unknown training attack 'fgsm'"),
    (['--adv-beta', '3'], "does not apply to method='nofrost'"),
    (['--adv-method', 'trades', '--adv-weight', '0.5'], "does not apply to method='trades'"),
])
def test_bad_values_exit_2_before_train_py_runs(fake_script, tmp_path, capsys, flags, message):
    record = tmp_path / 'record.json'
    code = cli_main(['timm-train', str(fake_script), *flags, '--', '--record', str(record)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-nofrost timm-train: error:') and message in err
    assert not record.exists()


@pytest.mark.parametrize('flags', [['--adv-steps', 'x'], ['--adv-norm', 'L3']])
def test_malformed_flags_exit_2(fake_script, capsys, flags):
    with pytest.raises(SystemExit) as e:
        cli_main(['timm-train', str(fake_script), *flags, '--'])
    assert e.value.code == 2


def test_recipe_flags_reach_the_task_and_args_yaml(fake_script, tmp_path, monkeypatch):
    """--adv-method / --adv-beta / --adv-attack go through the shared flag group into the launched task, and
    args.yaml (train.py's args_text) records them."""
    from timm_nofrost.training.timm_launcher import TimmTrainLauncher
    launchers = []
    run = TimmTrainLauncher.run
    monkeypatch.setattr(TimmTrainLauncher, 'run', lambda self, a: (launchers.append(self), run(self, a))[1])
    assert cli_main(['timm-train', str(fake_script), '--adv-method', 'trades', '--adv-beta', '3', '--adv-attack',
                     'n-fgsm', '--adv-val-attacks', 'pgd-2', '--adv-val-examples', '4', '--',
                     '--steps', '1']) == 0
    results = launchers[0].module.RESULTS
    cfg = results['task'].adv_cfg
    assert (cfg.method, cfg.beta, cfg.attack, cfg.steps, cfg.adv_weight) == ('trades', 3.0, 'n-fgsm', 1, None)
    assert math.isfinite(results['losses'][0])
    text = results['args_text']
    assert 'method: trades' in text and 'beta: 3.0' in text and 'attack: n-fgsm' in text


def test_missing_or_wrong_script_exits_2(tmp_path, capsys):
    assert cli_main(['timm-train', str(tmp_path / 'nope' / 'train.py'), '--', 'data']) == 2
    assert 'No timm train.py at' in capsys.readouterr().err
    other = tmp_path / 'other.py'
    other.write_text('x = 1\n')
    assert cli_main(['timm-train', str(other)]) == 2
    assert "does not look like timm's train.py" in capsys.readouterr().err


def test_cli_in_a_fresh_process(fake_script, tmp_path):
    """The command end to end: flags before and after SCRIPT, train.py's arguments after --, models registered."""
    record = tmp_path / 'record.json'
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_nofrost', 'timm-train', '--adv-steps', '1', '--adv-eps', '0.005', str(fake_script),
         '--adv-val-attacks', 'clean,pgd-2', '--adv-val-examples', '6', '--', '--steps', '1', '--record', str(record)],
        env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(record.read_text())
    assert out['task'] == 'LaunchedAdversarialTrainer'
    assert 'nf_resnet18_cifar_nofrost' in out['models']
    # the flags reached robust validation: clean and PGD-2 at eps 0.005 (a radius where PGD-2 flips some but not all
    # of the clean-correct images) on the 6 images spread over the 10, attacked in the loader's batches of 4
    saved = torch.load(f'{record}.pt')
    model = timm.create_model('nf_resnet18_cifar_nofrost', num_classes=3, channels=(8, 16, 32, 64), stem_chs=8)
    model.load_state_dict(saved['state_dict'])
    clean, pgd = top1_by_hand(model.eval(), saved['pixels'][SUBSET], saved['labels'][SUBSET], steps=2, eps=0.005,
                              batches=[[0, 1, 2, 3], [4, 5]])
    assert (out['metrics']['robust_top1_clean'], out['metrics']['robust_top1_pgd-2']) == pytest.approx((clean, pgd))
    assert math.isfinite(out['losses'][0])
    assert str(fake_script.parent) not in out['sys_path']


# -- the real train.py --------------------------------------------------------------------------------------------
TIMM_TRAIN_SCRIPT = os.environ.get('TIMM_TRAIN_SCRIPT')
needs_script = pytest.mark.skipif(
    not TIMM_TRAIN_SCRIPT, reason='set TIMM_TRAIN_SCRIPT to the train.py of a timm clone to run it')


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 32) -> Path:
    """ROOT/{train,validation}/<class>/<n>.png: noise with a colour cast per class."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ('train', 'validation'):
        for c in range(classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = torch.rand(size, size, 3, generator=g) * 0.6
                img[..., c % 3] += 0.4
                Image.fromarray((img * 255).to(torch.uint8).numpy()).save(folder / f'{i}.png')
    return root


def timm_train_command(script: str, data: Path, output: Path, *extra: str, adv: tuple = ()):
    return [
        '--adv-steps', '2', '--adv-val-examples', '8', *adv, '--',
        str(data), '--model', 'nf_resnet18_cifar_nofrost', '--model-kwargs', 'channels=(8,16,32,64)', 'stem_chs=8',
        '--num-classes', '3', '--epochs', '1', '-b', '8', '--img-size', '32', '--output', str(output),
        '--experiment', 'run', '--workers', '0', '--device', 'cpu', *extra]


def read_summary(output: Path) -> list:
    with open(output / 'run' / 'summary.csv') as f:
        return list(csv.DictReader(f))


def recomputed_robust_top1(data: Path, output: Path, ema: bool = False, world_size: int = 1) -> float:
    """robust_top1_pgd-10 of the last checkpoint, recomputed without the launcher: timm's own dataset and eval
    transform give the validation images, the 8 of them spread over the 24 are attacked with PGD-10
    at 8/255, each rank's share (timm's ordered sampler: positions rank, rank + W, ...) as one batch."""
    from timm.data import ImageDataset, create_transform, resolve_data_config
    state = torch.load(output / 'run' / 'last.pth.tar', map_location='cpu', weights_only=False)
    model = timm.create_model('nf_resnet18_cifar_nofrost', num_classes=3, channels=(8, 16, 32, 64), stem_chs=8)
    model.load_state_dict(state['state_dict_ema' if ema else 'state_dict'])
    config = resolve_data_config({'input_size': (3, 32, 32)}, model=model)
    dataset = ImageDataset(str(data / 'validation'), transform=create_transform(**config, normalize=False))
    assert len(dataset) == 24
    subset = [i * 24 // 8 for i in range(8)]
    pixels = torch.stack([dataset[i][0] for i in range(24)]).float() / 255  # timm's un-normalised transform: uint8
    labels = torch.tensor([dataset[i][1] for i in range(24)])
    batches = [[i for i in subset if i % world_size == rank] for rank in range(world_size)]
    return top1_by_hand(model.eval(), pixels, labels, steps=10, batches=batches)[1]


@needs_script
def test_real_train_py(tmp_path):
    data = make_image_folder(tmp_path / 'data')
    output = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_nofrost', 'timm-train', TIMM_TRAIN_SCRIPT,
         *timm_train_command(TIMM_TRAIN_SCRIPT, data, output, '--model-ema', adv=('--adv-method', 'trades'))],
        env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_summary(output)
    assert len(rows) == 1
    # with --model-ema train.py's summary holds the EMA model's validation
    assert float(rows[0]['eval_robust_top1_pgd-10']) == pytest.approx(recomputed_robust_top1(data, output, ema=True))
    assert math.isfinite(float(rows[0]['train_loss']))
    assert 'AdversarialTrainer: trades, Linf eps 8/255, PGD-2' in proc.stdout + proc.stderr
    assert 'Robust (EMA): pgd-10:' in proc.stdout + proc.stderr
    args_yaml = (output / 'run' / 'args.yaml').read_text()
    assert 'nofrost:' in args_yaml and 'method: trades' in args_yaml and 'beta: 6.0' in args_yaml


@needs_script
@pytest.mark.slow
def test_real_train_py_two_processes(tmp_path):
    """torchrun with 2 CPU processes (gloo): DDP training and robust top-1 reduced across ranks."""
    data = make_image_folder(tmp_path / 'data')
    output = tmp_path / 'out'
    torchrun = Path(sys.executable).with_name('torchrun')
    proc = subprocess.run(
        [str(torchrun), '--standalone', '--nproc_per_node', '2', '-m', 'timm_nofrost', 'timm-train',
         TIMM_TRAIN_SCRIPT, *timm_train_command(TIMM_TRAIN_SCRIPT, data, output)],
        env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_summary(output)
    expected = recomputed_robust_top1(data, output, world_size=2)
    assert float(rows[0]['eval_robust_top1_pgd-10']) == pytest.approx(expected)
    assert 'Robust: pgd-10:' in proc.stdout + proc.stderr and '8 images' in proc.stdout + proc.stderr


def test_resume_refuses_a_run_recorded_with_other_settings(tmp_path):
    """train.py --resume of a run whose args.yaml records other arguments or adversarial settings: one line naming
    each, before anything runs; arguments that only say where and how the run is written may differ."""
    import yaml
    from timm_nofrost.training.timm_launcher import TimmTrainLauncher
    recorded = {'model': 'resnet18', 'lr': 0.1, 'epochs': 10, 'output': 'out', 'workers': 4,
                'nofrost': {'adversarial': AdversarialConfig(eps='8/255').to_dict()}}
    (tmp_path / 'args.yaml').write_text(yaml.safe_dump(recorded))
    same = {**recorded, 'output': 'elsewhere', 'workers': 1, 'resume': str(tmp_path / 'last.pth.tar')}
    TimmTrainLauncher._check_resume(tmp_path / 'args.yaml', same)
    other = {**same, 'lr': 0.5, 'epochs': 20, 'nofrost': {'adversarial': AdversarialConfig(eps='2/255').to_dict()}}
    with pytest.raises(ValueError) as error:
        TimmTrainLauncher._check_resume(tmp_path / 'args.yaml', other)
    message = str(error.value)
    assert message.startswith(f'{tmp_path} was trained with other settings: --epochs 10 (this command: 20); --lr 0.1 '
                              f'(this command: 0.5); --adv-eps 0.0313725 (this command: 0.00784314)')
    assert '\n' not in message and '--output' not in message and '--workers' not in message
    TimmTrainLauncher._check_resume(tmp_path / 'missing' / 'args.yaml', other)  # nothing recorded: timm's resume
