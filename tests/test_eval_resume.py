"""Evaluations that survive interruption: killed at any write (or by SIGKILL inside AutoAttack) and run again,
an evaluation ends with the report of an uninterrupted run; a changed command, a corrupt progress file, a full
disk, a second process and an unwritable output are one-line errors that lose nothing."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from timm_nofrost import files
from timm_nofrost.cli import main
from timm_nofrost.evaluate import evaluate
from timm_nofrost.evaluate.journal import JournalError, journal_status, progress_folder

from tiny_models import eval_data, trained_tiny_cnn

TESTS = Path(__file__).parent
SETTINGS = dict(attacks='clean,pgd-5,apgd-ce-10,apgd-t-10', eps='3/255,5/255', batch_size=7, sanity_examples=8,
                progress=False)
# fast-worst-case with its escalation (AutoAttack's FAB-T and Square): the stage ledgers and the second pass
FAST = dict(SETTINGS, attacks='clean,apgd-ce-10,fast-worst-case', eps='3/255', escalate=True)


class Killed(BaseException):
    """Stands for the process dying at a write (nothing after it runs, the write does not happen)."""


def timeless(value):
    """A report less wall times (the only numbers two runs of one evaluation may differ in)."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if k != 'seconds'}
    return [timeless(v) for v in value] if isinstance(value, list) else value


@pytest.fixture(scope='module')
def model():
    return trained_tiny_cnn()


@pytest.fixture(scope='module')
def images():
    x, y = eval_data(n=24, seed=5)
    return TensorDataset(x, y)


def recorded(model, images, out, settings):
    """An uninterrupted evaluation, and the files it wrote (``(folder, name, 'begin')``, in order)."""
    events = []
    files.WRITE_HOOK = lambda path, stage: events.append((path.parent.name, path.name, stage))
    try:
        report = evaluate(model, images, out=out, **settings)
    finally:
        files.WRITE_HOOK = None
    assert not progress_folder(out).exists()  # the progress goes once the report is written
    assert json.loads(out.read_text()) == report.to_dict()
    return report, [e for e in events if e[2] == 'begin']


@pytest.fixture(scope='module')
def reference(model, images, tmp_path_factory):
    report, writes = recorded(model, images, tmp_path_factory.mktemp('reference') / 'report.json', SETTINGS)
    assert 0 < sum(report.per_example['5/255']['worst-case']) < 24  # some images robust, some not
    return timeless(report.to_dict()), writes


def kill_at(n: int):
    seen = []

    def hook(path: Path, stage: str) -> None:
        if stage == 'begin':
            seen.append(path.name)
            if len(seen) == n + 1:
                raise Killed(path.name)
    return hook


@pytest.mark.parametrize('point', ['batch-000000.json', 'batch-000001.json', 'batch-000003.json', 'sanity.json',
                                   'report.json', 'final'])
def test_killed_anywhere_the_same_call_ends_with_the_uninterrupted_report(model, images, reference, tmp_path,
                                                                          point):
    killed_and_continued(model, images, reference, tmp_path, point, SETTINGS)


@pytest.fixture(scope='module')
def fast_reference(model, images, tmp_path_factory):
    report, writes = recorded(model, images, tmp_path_factory.mktemp('fast') / 'report.json', FAST)
    assert report.escalation['ran'] and report.stages['3/255']['fast-worst-case']
    return timeless(report.to_dict()), writes


@pytest.mark.slow
@pytest.mark.parametrize('point', ['batch-000001.json', 'escalate-000000.json', 'escalate-000002.json'])
def test_killed_in_fast_worst_case_or_its_escalation(model, images, fast_reference, tmp_path, point):
    killed_and_continued(model, images, fast_reference, tmp_path, point, FAST)


def killed_and_continued(model, images, reference, tmp_path, point, settings):
    expected, writes = reference
    names = [name for _, name, _ in writes]
    # the first write of the batch file (after its first attack), the last of the others; 'final': the report file
    n = names.index(point) if point.startswith('batch') else len(names) - 1 if point == 'final' else \
        len(names) - 1 - names[::-1].index(point)
    out = tmp_path / 'report.json'
    files.WRITE_HOOK = kill_at(n)
    try:
        with pytest.raises(Killed):
            evaluate(model, images, out=out, **settings)
    finally:
        files.WRITE_HOOK = None
    assert not out.exists() and progress_folder(out).is_dir()  # no partial report, the progress kept
    assert journal_status(progress_folder(out)).startswith('evaluation in progress')
    seen = []
    files.WRITE_HOOK = lambda path, stage: seen.append(path.name) if stage == 'begin' else None
    try:
        again = evaluate(model, images, out=out, **settings)
    finally:
        files.WRITE_HOOK = None
    assert timeless(again.to_dict()) == expected
    assert timeless(json.loads(out.read_text())) == expected
    assert not progress_folder(out).exists()
    # nothing recorded before the kill is measured again: every file is written exactly as often as it was left
    assert sorted(seen) == sorted(names[n:])


def test_a_finished_report_is_reused_and_another_one_is_refused(model, images, reference, tmp_path, capsys):
    expected, _ = reference
    out = tmp_path / 'report.json'
    evaluate(model, images, out=out, **SETTINGS)
    stamp = out.stat().st_mtime_ns
    seen = []
    files.WRITE_HOOK = lambda path, stage: seen.append(path.name)
    try:
        assert timeless(evaluate(model, images, out=out, **SETTINGS).to_dict()) == expected
    finally:
        files.WRITE_HOOK = None
    assert seen == [] and out.stat().st_mtime_ns == stamp and 'reusing it' in capsys.readouterr().err
    with pytest.raises(JournalError, match=r"--eps was '3/255,5/255', now '5/255'.*--overwrite"):
        evaluate(model, images, out=out, **{**SETTINGS, 'eps': '5/255'})
    assert timeless(json.loads(out.read_text())) == expected  # untouched
    other = evaluate(model, images, out=out, overwrite=True, **{**SETTINGS, 'eps': '5/255'})
    assert json.loads(out.read_text()) == other.to_dict() and other.eps == [5 / 255]


def test_a_changed_command_does_not_continue_another_evaluations_progress(model, images, tmp_path):
    out = tmp_path / 'report.json'
    files.WRITE_HOOK = kill_at(3)
    try:
        with pytest.raises(Killed):
            evaluate(model, images, out=out, **SETTINGS)
    finally:
        files.WRITE_HOOK = None
    other = trained_tiny_cnn(seed=1)
    with pytest.raises(JournalError, match=r'holds the progress of another evaluation \(model weights was '
                                           r'sha256:[0-9a-f]{12}\.\.\., now sha256:.*--overwrite'):
        evaluate(other, images, out=out, **SETTINGS)
    with pytest.raises(JournalError, match=r"--seed was 0, now 3"):
        evaluate(model, images, out=out, **{**SETTINGS, 'seed': 3})
    with pytest.raises(JournalError, match=r"data.first_batch_sha256"):
        x, y = eval_data(n=24, seed=6)
        evaluate(model, TensorDataset(x, y), out=out, **SETTINGS)
    fresh = evaluate(other, images, out=tmp_path / 'fresh.json', **SETTINGS)
    assert timeless(evaluate(other, images, out=out, overwrite=True, **SETTINGS).to_dict()) == \
        timeless(fresh.to_dict())


# -- the command line: faults are one-line errors, nothing measured is lost ---------------------------------
@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A timm model's weights and an image folder, for the command line."""
    import timm
    from conftest import image_folders
    root = tmp_path_factory.mktemp('cli')
    torch.manual_seed(0)
    model = timm.create_model('nf_resnet18_cifar_nofrost', num_classes=5, channels=[8, 8, 16, 16], stem_chs=8)
    torch.save(model.state_dict(), root / 'weights.pth')
    return root / 'weights.pth', image_folders(root / 'data', train=1, val=6)


def eval_args(checkpoint, out, *extra):
    weights, data = checkpoint
    return ['eval', '--model', 'nf_resnet18_cifar_nofrost', '--model-kwargs',
            '{"channels": [8, 8, 16, 16], "stem_chs": 8}', '--num-classes', '5', '--checkpoint', str(weights),
            '--data', str(data), '--img-size', '16', '--attacks', 'clean,pgd-3,apgd-ce-5', '--batch-size', '2',
            '--no-progress', '--json', '--out', str(out), *extra]


def one_line_error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('timm-nofrost eval: error: '), err
    return err


def test_cli_a_full_disk_while_recording_progress_is_one_line_and_the_rest_continues(checkpoint, tmp_path,
                                                                                    capsys):
    out = tmp_path / 'r.json'
    assert main(eval_args(checkpoint, tmp_path / 'ref.json')) == 0
    expected = timeless(json.loads((tmp_path / 'ref.json').read_text()))
    capsys.readouterr()
    seen = []

    def full(path: Path, stage: str) -> None:
        seen.append(path.name)
        if path.name == 'batch-000001.json':
            raise OSError(errno.ENOSPC, 'No space left on device')
    files.WRITE_HOOK = full
    try:
        err = one_line_error(capsys, main(eval_args(checkpoint, out)))
    finally:
        files.WRITE_HOOK = None
    assert 'No space left on device' in err and 'run the same command again to continue' in err
    assert (progress_folder(out) / 'batch-000000.json').is_file() and not out.exists()
    assert main(eval_args(checkpoint, out)) == 0
    assert timeless(json.loads(out.read_text())) == expected


def test_cli_a_corrupt_progress_file_is_named(checkpoint, tmp_path, capsys):
    out = tmp_path / 'r.json'
    files.WRITE_HOOK = kill_at(3)
    try:
        with pytest.raises(Killed):
            main(eval_args(checkpoint, out))
    finally:
        files.WRITE_HOOK = None
    batch = progress_folder(out) / 'batch-000000.json'
    batch.write_text('{"n": 2, "clean": [1, 0')
    err = one_line_error(capsys, main(eval_args(checkpoint, out)))
    assert str(batch) in err and 'remove it' in err
    assert batch.read_text() == '{"n": 2, "clean": [1, 0'  # left for the user to look at
    batch.unlink()
    assert main(eval_args(checkpoint, out)) == 0 and out.is_file()


def test_cli_unwritable_outputs_fail_before_any_attack(checkpoint, tmp_path, capsys, monkeypatch):
    from timm_nofrost.evaluate.engine import RobustCounter

    def no_attack(*args, **kwargs):
        raise AssertionError('an attack ran before the output paths were checked')
    monkeypatch.setattr(RobustCounter, 'run_batch', no_attack)
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    for flag in ('--out', '--markdown', '--plot'):
        args = eval_args(checkpoint, tmp_path / 'ok.json')
        args += [flag, str(blocker / 'report')]
        err = one_line_error(capsys, main(args))
        assert str(blocker) in err and flag in err
    err = one_line_error(capsys, main(eval_args(checkpoint, tmp_path, '--markdown', str(tmp_path / 'x.md'))))
    assert 'is a folder' in err


def test_cli_two_evaluations_on_one_out(checkpoint, tmp_path, capsys):
    out = tmp_path / 'r.json'
    folder = progress_folder(out)
    holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f'''
        import time
        from timm_nofrost.files import hold_folder
        with hold_folder({str(folder)!r}, 'timm-nofrost eval (test holder)'):
            print('held', flush=True)
            time.sleep(60)
        ''')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        err = one_line_error(capsys, main(eval_args(checkpoint, out)))
        assert 'is in use by process' in err and str(holder.pid) in err
    finally:
        holder.kill()
        holder.wait()
    assert main(eval_args(checkpoint, out)) == 0 and out.is_file()


# -- a real SIGKILL inside AutoAttack ----------------------------------------------------------------------
KILLED_INSIDE_AUTOATTACK = '''
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
from torch.utils.data import TensorDataset
from timm_nofrost.evaluate import evaluate
from tiny_models import eval_data, trained_tiny_cnn
if {kill}:
    import importlib
    apgd = importlib.import_module({module!r} + '.autopgd_base')  # pyautoattack, or the GitHub package
    calls = []
    original = apgd.APGDAttack_targeted.perturb
    def perturb(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second batch, inside AutoAttack's APGD-T
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    apgd.APGDAttack_targeted.perturb = perturb
x, y = eval_data(n=16, seed=5)
evaluate(trained_tiny_cnn(), TensorDataset(x, y), attacks='clean,apgd-ce-10,autoattack', eps='4/255',
         batch_size=8, sanity=False, progress=False, out={out!r})
'''


@pytest.mark.slow
def test_sigkill_inside_autoattack_then_the_same_command_continues(tmp_path):
    import importlib.util
    module = next((m for m in ('pyautoattack', 'autoattack') if importlib.util.find_spec(m)), None)
    if module is None:
        pytest.skip('needs pyautoattack (or the GitHub autoattack package)')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(TESTS.parent), os.environ.get('PYTHONPATH', '')])}

    def run(out, kill):
        script = KILLED_INSIDE_AUTOATTACK.format(tests=str(TESTS), kill=kill, out=str(out), module=module)
        return subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600)

    assert run(tmp_path / 'ref.json', False).returncode == 0
    out = tmp_path / 'r.json'
    killed = run(out, True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    folder = progress_folder(out)
    assert (folder / 'batch-000000.json').is_file() and not out.exists()
    partial = json.loads((folder / 'batch-000001.json').read_text())
    assert 'apgd-ce-10' in partial['attacks']['4/255'] and 'autoattack' not in partial['attacks']['4/255']
    assert run(out, False).returncode == 0
    assert timeless(json.loads(out.read_text())) == timeless(json.loads((tmp_path / 'ref.json').read_text()))


def test_cli_robustbench_json_refuses_before_any_attack_without_autoattack(checkpoint, tmp_path, capsys,
                                                                            monkeypatch):
    from timm_nofrost.evaluate.engine import RobustCounter
    real = RobustCounter.run_batch
    monkeypatch.setattr(RobustCounter, 'run_batch', lambda *a, **k: pytest.fail('attacked before refusing'))
    weights, data = checkpoint
    bench = tmp_path / 'cifar10'  # a folder named after the benchmark its images come from
    bench.symlink_to(data, target_is_directory=True)
    base = eval_args((weights, bench), tmp_path / 'r.json', '--robustbench-json', str(tmp_path / 'rb.json'))
    err = one_line_error(capsys, main([*base, '--attacks', 'clean,fast-worst-case']))
    assert 'fast-worst-case is not AutoAttack' in err and not (tmp_path / 'rb.json').exists()
    monkeypatch.setattr(RobustCounter, 'run_batch', real)
    # a large eps: APGD-CE breaks every image, AutoAttack's later parts have nothing left to attack (fast)
    assert main([*base, '--attacks', 'clean,apgd-ce-5,autoattack', '--eps', '64/255']) == 0
    report, info = (json.loads((tmp_path / name).read_text()) for name in ('r.json', 'rb.json'))
    assert info['dataset'] == 'cifar10' and info['eps'] == '64/255' and report['clean_accuracy'] > 0
    assert info['clean_acc'] == f"{100 * report['clean_accuracy']:.2f}"
    assert info['autoattack_acc'] == f"{100 * report['accuracy']['64/255']['autoattack']:.2f}"
