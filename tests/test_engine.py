"""The evaluation engine: cascade == full worst case, one counting loop for every command, progress, DDP sums."""
import copy
import io
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import timm_nofrost.evaluate.engine as engine
from timm_nofrost.attacks import PixelModel, parse_attack
from timm_nofrost.cli import main
from timm_nofrost.evaluate import WORST_CASE, EvalProgress, RobustCounter, evaluate

from tiny_models import CountingModel, eval_data, trained_tiny_cnn


def _loader(n=40, seed=5, batch_size=16):
    x, y = eval_data(n, seed=seed)
    return DataLoader(TensorDataset(x.double(), y), batch_size=batch_size)


ATTACKS = 'clean,fgsm-rs,pgd-6,apgd-ce-10,apgd-t-6'


# seed 1 repeats seed 0's comparison on another tiny model (trained for it alone): the slow suite runs it
@pytest.mark.parametrize('seed', [0, pytest.param(1, marks=pytest.mark.slow)])
def test_cascade_worst_case_identical_to_full_run(seed):
    """Float64 so that rows attacked in differently composed batches round alike (see test_active_set.py)."""
    model_full = CountingModel(copy.deepcopy(trained_tiny_cnn(seed)).double())
    model_cascade = CountingModel(copy.deepcopy(trained_tiny_cnn(seed)).double())
    kwargs = dict(attacks=ATTACKS, eps='3/255,5/255', sanity=False, progress=False, seed=seed)
    full = evaluate(model_full, _loader(), **kwargs)
    cascade = evaluate(model_cascade, _loader(), cascade=True, **kwargs)
    for label in ('3/255', '5/255'):
        assert cascade.per_example[label][WORST_CASE] == full.per_example[label][WORST_CASE]
        assert cascade.accuracy[label][WORST_CASE] == full.accuracy[label][WORST_CASE]
        assert all(cascade.accuracy[label][a] is None for a in cascade.attacks)  # not measured, not a number
        assert set(cascade.per_example[label]) == {WORST_CASE}
    assert 0 < full.accuracy['3/255'][WORST_CASE] < 1  # some examples survive, some do not: a real comparison
    assert cascade.clean_accuracy == full.clean_accuracy
    assert model_cascade.examples < model_full.examples
    markdown = cascade.to_markdown()
    assert markdown.count('not measured (cascade)') == 2 * len(cascade.attacks)
    assert json.loads(json.dumps(cascade.to_dict()))['accuracy']['3/255']['pgd-6'] is None


def test_counter_counts_what_each_attack_leaves():
    """The engine's per-attack counts equal clean-correct AND the attack's own per-example outcome."""
    model = trained_tiny_cnn(0)
    x, y = eval_data(24, seed=7)
    pixel = PixelModel.from_model(model)
    counter = RobustCounter(pixel, [parse_attack('clean'), parse_attack('pgd-4')], [2 / 255], seed=3)
    out = counter.update(x, y)
    from timm_nofrost.attacks import PGD
    with torch.no_grad():
        clean = pixel(x).argmax(1) == y
    direct = PGD(pixel, eps=2 / 255, steps=4, seed=3)(x, y, mask=clean).correct
    assert torch.equal(out['2/255']['pgd-4'], direct & clean)
    assert counter.correct['2/255']['pgd-4'] == int((direct & clean).sum())
    assert counter.correct['2/255'][WORST_CASE] == int((direct & clean).sum())
    assert counter.clean_correct == int(clean.sum()) and counter.total == 24


def test_progress_lines_per_attack():
    stream = io.StringIO()
    progress = EvalProgress('lines', 2, 'evaluating m', interval=0, stream=stream)
    counter = RobustCounter(PixelModel.from_model(trained_tiny_cnn()), [parse_attack('fgsm'), parse_attack('pgd-2')],
                            [4 / 255])
    x, y = eval_data(8)
    counter.update(x[:4], y[:4], progress)
    counter.update(x[4:], y[4:], progress)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(': ')[1].split(' done')[0] for line in lines[:-1]] == \
        ['fgsm @ 4/255', 'pgd-2 @ 4/255', 'fgsm @ 4/255', 'pgd-2 @ 4/255']
    assert lines[0].startswith('[evaluating m] batch 1/2') and lines[2].startswith('[evaluating m] batch 2/2')
    assert lines[-1].startswith('[evaluating m] done: 2 batches')
    with pytest.raises(ValueError, match="Unknown progress mode 'loud'"):
        EvalProgress('loud', 1, 'x')


def test_eval_cli_no_progress_shows_life_for_autoattack(tmp_path, monkeypatch, capsys):
    """--no-progress: no bars, but a line per attack (AutoAttack included) on stderr; stdout stays JSON."""
    pytest.importorskip('pyautoattack')
    monkeypatch.setattr(engine, 'PROGRESS_INTERVAL_S', 0.0)
    from test_evaluate import _write_folder
    folder = _write_folder(tmp_path / 'images', n=16)
    checkpoint = tmp_path / 'tiny.pth'
    torch.save(trained_tiny_cnn().state_dict(), checkpoint)
    monkeypatch.setattr('timm_nofrost.cli.evaluate.create_model_from_args', lambda args, **kw: trained_tiny_cnn())
    code = main(['eval', '--model', 'tiny', '--data', str(folder), '--attacks', 'clean,pgd-3,autoattack',
                 '--eps', '8/255', '--no-progress', '--no-sanity', '--json', '--worst-case-only'])
    out, err = capsys.readouterr()
    assert code == 0
    report = json.loads(out)
    assert report['accuracy']['8/255']['autoattack'] is None and report['cascade'] is True
    assert 'pgd-3 @ 8/255 done' in err and 'autoattack @ 8/255 done' in err


def _ddp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    x, y = eval_data(16, seed=9)
    counter = RobustCounter(PixelModel.from_model(trained_tiny_cnn()), [parse_attack('pgd-3')], [6 / 255])
    counter.update(x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8])
    counter.reduce()
    if rank == 0:
        with open(out_file, 'w') as f:
            json.dump({'total': counter.total, 'clean': counter.clean_correct, 'correct': counter.correct}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_counts_summed_across_ranks(tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / 'counts.json'
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'init'), str(out)), nprocs=2, join=True)
    summed = json.loads(out.read_text())
    single = RobustCounter(PixelModel.from_model(trained_tiny_cnn()), [parse_attack('pgd-3')], [6 / 255])
    x, y = eval_data(16, seed=9)
    single.update(x[:8], y[:8])
    single.update(x[8:], y[8:])
    assert summed == {'total': 16, 'clean': single.clean_correct, 'correct': single.correct}
    assert 0 < single.correct['6/255']['pgd-3'] < 16
