"""Faults at every file write of a run, two processes on one folder, corrupt records: the same command always
continues or restarts cleanly, nothing is done twice, and the records say what happened."""
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from timm_nofrost import files
from timm_nofrost.cli import main
from timm_nofrost.training.checkpointing import load_training_checkpoint

from conftest import image_folders

REPO = Path(__file__).parents[1]
KWARGS = json.dumps({'channels': [8, 8, 16, 16], 'stem_chs': 8, 'drop_rate': 0.0, 'drop_path_rate': 0.0})
# the writes of a 2-epoch run, in order (model_best is written whenever robust accuracy does not fall)
WRITES = [*[(name, stage) for _ in range(2) for name in ('checkpoint-last.pth', 'model_best.pth', 'summary.jsonl')
            for stage in ('begin', 'commit')],
          # the final evaluation's progress (robustness.json.progress/, one batch, one attack), then its report
          *[(name, stage) for name in ('identity.json', 'batch-000000.json', 'sanity.json', 'report.json',
                                       'robustness.json', 'robustness.md', 'results.json')
            for stage in ('begin', 'commit')]]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory) -> Path:
    return image_folders(tmp_path_factory.mktemp('shapes'), train=20, val=10)


def train_args(data_root: Path, out: Path, *extra: str) -> list:
    return ['train', '--data', str(data_root), '--model', 'nf_resnet18_cifar_nofrost', '--model-kwargs', KWARGS,
            '--img-size', '16', '-b', '10', '--epochs', '2', '--adv-steps', '1', '--robust-examples', '4',
            '--final-attacks', 'clean,pgd-2', '--eval-attack', 'pgd-2', '--no-progress', '--deterministic',
            '--out', str(out), *extra]


def record(out: Path) -> dict:
    """What a finished run folder says, less wall times: results, summary lines, the last weights."""
    def timeless(value):
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if not (k.endswith('time_s') or k == 'seconds')}
        return [timeless(v) for v in value] if isinstance(value, list) else value
    results = json.loads((out / 'results.json').read_text())
    for key in ('out_dir', 'resume', 'workers', 'device'):  # where and how the command ran, not what it computed
        results['config'].pop(key)
    results.pop('eval_command')
    results.pop('export_command')
    for run in results['runs'].values():
        run.pop('out_dir')
    weights = load_training_checkpoint(out / 'checkpoint-last.pth')['state_dict']
    return {'results': timeless(results), 'robustness': timeless(json.loads((out / 'robustness.json').read_text())),
            'summary': [timeless(json.loads(x)) for x in (out / 'summary.jsonl').read_text().splitlines()],
            'weights': {k: v.tolist() for k, v in weights.items()},
            'files': sorted(p.name for p in out.iterdir() if p.name != files.LOCK_FILE)}


@pytest.fixture(scope='module')
def reference(data_root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp('reference') / 'run'
    events = []
    files.WRITE_HOOK = lambda path, stage: events.append((path.name, stage))
    try:
        assert main(train_args(data_root, out)) == 0
    finally:
        files.WRITE_HOOK = None
    assert events == WRITES
    return record(out)


def fail_at(monkeypatch, n: int) -> None:
    """An ``ENOSPC`` at the ``n``-th write event (0-based) of this process; later writes succeed."""
    seen = []

    def hook(path: Path, stage: str) -> None:
        seen.append((path.name, stage))
        if len(seen) == n + 1:
            raise OSError(errno.ENOSPC, f'No space left on device (injected at {path.name}, {stage})')
    monkeypatch.setattr(files, 'WRITE_HOOK', hook)


def _fault_then_resume(data_root, out, n, monkeypatch, capsys, reference):
    fail_at(monkeypatch, n)
    assert main(train_args(data_root, out, '--resume')) == 2
    err = capsys.readouterr().err
    assert 'No space left on device (injected at' in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(files, 'WRITE_HOOK', None)
    assert not list(out.glob('.*.tmp'))  # a failed write leaves no temporary file
    assert main(train_args(data_root, out, '--resume')) == 0, capsys.readouterr().err
    capsys.readouterr()  # e.g. that a finished robustness.json is reused: not the next fault's error
    assert record(out) == reference


# the write after the first checkpoint (no summary line yet); every write in the slow suite
@pytest.mark.parametrize('n', [4])
def test_a_fault_at_a_write_then_the_same_command_finishes_the_same_run(data_root, tmp_path, monkeypatch, capsys,
                                                                        reference, n):
    _fault_then_resume(data_root, tmp_path / 'run', n, monkeypatch, capsys, reference)


@pytest.mark.slow
def test_a_fault_at_every_write(data_root, tmp_path, monkeypatch, capsys, reference):
    for n in range(len(WRITES)):
        _fault_then_resume(data_root, tmp_path / f'run{n}', n, monkeypatch, capsys, reference)


_KILL_AT = '''
import os, sys
from timm_nofrost import files
from timm_nofrost.cli import main
seen = []
def hook(path, stage):
    seen.append(path)
    if len(seen) == int(sys.argv[1]) + 1:
        os._exit(9)  # a SIGKILL at this write: no cleanup of any kind
files.WRITE_HOOK = hook
sys.exit(main(sys.argv[2:]))
'''


@pytest.mark.slow
@pytest.mark.parametrize('n', [1, 5, 11, 16])
def test_killed_at_a_write_then_the_same_command_finishes_the_same_run(data_root, tmp_path, reference, n):
    out = tmp_path / 'run'
    args = train_args(data_root, out, '--resume')
    killed = subprocess.run([sys.executable, '-c', _KILL_AT, str(n), *args], env=ENV, capture_output=True)
    assert killed.returncode == 9
    again = subprocess.run([sys.executable, '-m', 'timm_nofrost', *args], env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert not list(out.glob('.*.tmp'))  # the killed writer's temporary file was removed
    assert record(out) == reference


def test_resume_refuses_other_settings_and_initial_checkpoint_starts_a_new_run(data_root, tmp_path, capsys,
                                                                               reference):
    out = tmp_path / 'run'
    assert main(train_args(data_root, out)) == 0
    before = (out / 'results.json').read_bytes()
    capsys.readouterr()
    for extra, named in [
            (['--adv-eps', '2/255', '--seed', '5', '--lr', '0.5'], ['--adv-eps 0.0313725 (this command: 0.00784314)',
                                                                    '--seed 0 (this command: 5)',
                                                                    '--lr unset (this command: 0.5)']),
            (['--epochs', '4'], ['--epochs 2 (this command: 4)']),
            (['--model-kwargs', KWARGS.replace('"stem_chs": 8', '"stem_chs": 16')], ['--model-kwargs']),
            (['--data', str(data_root / 'train')], ['--data']),
            (['--adv-method', 'trades'], ['--adv-method nofrost (this command: trades)']),
            (['--amp', 'bf16', '--hflip', '0'], ['--amp unset (this command: bf16)', '--hflip 0.5 (this command: 0)']),
            (['-b', '5', '--opt', 'adamw'], ['--batch-size 10 (this command: 5)', '--opt sgd (this command: adamw)'])]:
        code = main(train_args(data_root, out, '--resume', *extra))
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert 'was trained with other settings: ' in err and all(n in err for n in named), err
    assert (out / 'results.json').read_bytes() == before  # the record is untouched
    # settings that cannot change the result may differ
    assert main(train_args(data_root, out, '--resume', '--workers', '1', '--device', 'cpu')) == 0
    assert record(out) == reference
    before = (out / 'results.json').read_bytes()
    # training longer is a new run from the weights, recorded as such
    new = tmp_path / 'longer'
    assert main(train_args(data_root, new, '--epochs', '3', '--initial-checkpoint',
                           str(out / 'checkpoint-last.pth'))) == 0
    results = json.loads((new / 'results.json').read_text())
    assert results['config']['initial_checkpoint'] == str(out / 'checkpoint-last.pth')
    assert len(results['initial_checkpoint_sha256']) == 64
    assert [e['epoch'] for e in results['runs']['nofrost']['epochs']] == [1, 2, 3]
    assert (out / 'results.json').read_bytes() == before


def test_two_processes_never_train_one_folder(data_root, tmp_path):
    """A second train into a folder a live process holds is refused in one line; the first finishes alone."""
    out = tmp_path / 'run'
    first = _start_holding(train_args(data_root, out), tmp_path / 'release')
    _second_is_refused(first, train_args(data_root, out, '--resume'), tmp_path, out,
                       f'timm-nofrost train: error: {out.resolve()} is in use by process {first.pid} (timm-nofrost '
                       f'train --out {out})')


def test_checkpoint_file_modes_are_the_same(data_root, tmp_path, reference):
    out = tmp_path / 'run'
    assert main(train_args(data_root, out)) == 0
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.name != files.LOCK_FILE}
    assert len(set(modes.values())) == 1, modes


def test_a_flipped_bit_in_a_checkpoint_is_refused_by_eval_and_resume(data_root, tmp_path, capsys, reference):
    out = tmp_path / 'run'
    assert main(train_args(data_root, out)) == 0
    weights = load_training_checkpoint(out / 'model_best.pth')['state_dict']
    tensor = next(v for v in weights.values() if v.numel() > 64)
    for name in ('model_best.pth', 'checkpoint-last.pth'):
        raw = bytearray((out / name).read_bytes())
        at = bytes(raw).find(tensor.numpy().tobytes()[:32])
        raw[at + 7] ^= 0x20
        (out / name).write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(['eval', '--model', 'nf_resnet18_cifar_nofrost', '--model-kwargs', KWARGS, '--num-classes', '5',
                 '--checkpoint', str(out / 'model_best.pth'), '--data', str(data_root), '--img-size', '16',
                 '--n-examples', '2', '--attacks', 'clean']) == 2
    err = capsys.readouterr().err
    assert f"checkpoint '{out / 'model_best.pth'}' is corrupted" in err and len(err.strip().splitlines()) == 1
    assert main(train_args(data_root, out, '--resume')) == 2
    assert "checkpoint-last.pth' is corrupted" in capsys.readouterr().err
    assert torch.equal(tensor, weights[next(k for k, v in weights.items() if v is tensor)])


# -- studies ------------------------------------------------------------------------------------------------
def study_args(data_root: Path, out: Path, *extra: str, arms: str = 'nofrost', seeds: str = '0') -> list:
    return ['study', '--data', str(data_root), '--img-size', '16', '--model', 'nf_resnet18_cifar_nofrost',
            '--model-kwargs', KWARGS, '--arms', arms, '--seeds', seeds, '--epochs', '2', '-b', '10',
            '--adv-steps', '1', '--robust-examples', '4', '--eval-attack', 'pgd-2', '--eval-examples', '4',
            '--eval-attacks', 'clean,pgd-2', '--curve-attack', 'pgd-2', '--curve-eps', '1', '--no-analysis',
            '--deterministic', '--no-progress', '--out', str(out), *extra]


def _study_numbers(out: Path) -> dict:
    report = json.loads((out / 'report.json').read_text())
    return {arm: {k: v['values'] for k, v in metrics.items() if not k.endswith('time_s')}
            for arm, metrics in report['arms'].items()}


def test_a_study_killed_between_checkpoint_and_summary_continues(data_root, tmp_path, monkeypatch, capsys):
    """The fault that used to leave a study stuck for good: the first checkpoint written, no summary line."""
    reference = tmp_path / 'reference'
    assert main(study_args(data_root, reference)) == 0
    out = tmp_path / 'study'

    def stop(path: Path, stage: str) -> None:
        if path.name == 'summary.jsonl':
            raise OSError(errno.ENOSPC, 'No space left on device (injected)')
    monkeypatch.setattr(files, 'WRITE_HOOK', stop)
    assert main(study_args(data_root, out)) == 2
    monkeypatch.setattr(files, 'WRITE_HOOK', None)
    run = out / 'runs' / 'nofrost' / 'seed-0'
    assert (run / 'checkpoint-last.pth').is_file() and not (run / 'summary.jsonl').exists()
    capsys.readouterr()
    assert main(['study', 'report', str(out), '--json']) == 0
    partial = json.loads(capsys.readouterr().out)
    assert [(m['state'], m['detail']) for m in partial['missing']] == [
        ('training', '? epoch(s) done: still running, or interrupted (run the study again to resume)')]
    assert main(study_args(data_root, out)) == 0, capsys.readouterr().err
    assert 'resuming' in capsys.readouterr().out
    assert [json.loads(x)['epoch'] for x in (run / 'summary.jsonl').read_text().splitlines()] == [1, 2]
    assert _study_numbers(out) == _study_numbers(reference)


def test_study_report_names_the_file_and_entry_it_cannot_use(data_root, tmp_path, capsys):
    out = tmp_path / 'study'
    assert main(study_args(data_root, out)) == 0
    eval_file = out / 'runs' / 'nofrost' / 'seed-0' / 'eval.json'
    good = json.loads(eval_file.read_text())
    for content, message in [('{nope', f'{eval_file} cannot be read (Expecting property name'),
                             ('[]', f'{eval_file} holds list, not a JSON object'),
                             (json.dumps({k: v for k, v in good.items() if k != 'curve'}),
                              f"{eval_file} is incomplete: it has no 'curve' entry"),
                             (json.dumps({**good, 'protocol': {**good['protocol'], 'accuracy': 3}}),
                              f'{eval_file} is malformed (TypeError')]:
        eval_file.write_text(content)
        capsys.readouterr()
        assert main(['study', 'report', str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    (out / 'study.json').write_text('{"arms": {}}')
    assert main(['study', 'report', str(out)]) == 2
    assert f"{out / 'study.json'} is incomplete: it has no 'seeds' entry" in capsys.readouterr().err


# a process that stops before its last write (results.json), holding its run folder, until RELEASE exists; it
# leaves HOLDING in the run folder when it gets there
HOLDING = 'holding.marker'
_HOLDING = f"""
import os, sys, time
HOLDING = {HOLDING!r}
from timm_nofrost import files
from timm_nofrost.cli import main
def hold(path, stage):
    deadline = time.time() + 300
    if path.name == 'results.json' and stage == 'begin':  # a sign for the test: holding from here on
        open(path.parent / HOLDING, 'w').close()
    while path.name == 'results.json' and stage == 'begin' and not os.path.exists(sys.argv[1]):
        assert time.time() < deadline
        time.sleep(0.1)
files.WRITE_HOOK = hold
sys.exit(main(sys.argv[2:]))
"""
ENV = {**os.environ, 'PYTHONPATH': str(REPO)}


def _start_holding(argv: list, release: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-c', _HOLDING, str(release), *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 180
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)


def _second_is_refused(first: subprocess.Popen, argv: list, out: Path, run: Path, holder: str) -> None:
    """While ``first`` holds ``run`` (in its last write), the same command is refused in one line naming it;
    ``first`` then finishes alone, every epoch once."""
    try:
        _wait_for(run / HOLDING, first)
        second = subprocess.run([sys.executable, '-m', 'timm_nofrost', *argv], env=ENV, capture_output=True,
                                text=True)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f'{holder}; wait for it to finish (or stop it), or choose another folder.']
    finally:
        (out / 'release').touch()
        _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    assert [json.loads(x)['epoch'] for x in (run / 'summary.jsonl').read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_two_studies_on_one_folder_never_do_a_run_twice(data_root, tmp_path):
    out = tmp_path / 'study'
    run = out / 'runs' / 'nofrost' / 'seed-0'
    first = _start_holding(study_args(data_root, out), out / 'release')
    _second_is_refused(first, study_args(data_root, out), out, run,
                       f'timm-nofrost study: error: {run.resolve()} is in use by process {first.pid} (timm-nofrost '
                       f'study --out {out}, nofrost seed 0)')


@pytest.mark.slow
def test_only_launches_for_different_runs_proceed_in_parallel(data_root, tmp_path):
    out = tmp_path / 'study'
    release = tmp_path / 'release'
    launches = [_start_holding(study_args(data_root, out, '--only', f'nofrost:{seed}', seeds='0,1'), release)
                for seed in (0, 1)]
    for seed, proc in enumerate(launches):
        _wait_for(out / 'runs' / 'nofrost' / f'seed-{seed}' / HOLDING, proc)
    assert all(proc.poll() is None for proc in launches)  # both hold their own run at once
    release.touch()
    for proc in launches:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    assert json.loads((out / 'report.json').read_text())['arms']['nofrost']['clean']['n'] == 2


def test_a_study_grown_by_an_arm_keeps_the_models_of_the_earlier_arms(data_root, tmp_path):
    out = tmp_path / 'study'
    assert main(study_args(data_root, out, arms='standard')) == 0
    assert main(study_args(data_root, out, arms='nofrost')) == 0
    manifest = json.loads((out / 'study.json').read_text())
    assert sorted(manifest['arm_models']) == ['nofrost', 'standard'] and all(manifest['arm_models'].values())
    assert 'standard' in (out / 'report.md').read_text() and manifest['arm_order'] == ['standard', 'nofrost']
