"""Files a run writes: atomic writes under unique names with one mode, folder locks between real processes, and
checksums that turn a flipped bit into a ``CheckpointError`` naming the file."""
import errno
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from timm_nofrost import files
from timm_nofrost.checkpoint import CheckpointError, content_checksum, read_checkpoint, read_state_dict
from timm_nofrost.files import FolderBusy, atomic_copy, atomic_json, atomic_write, hold_folder
from timm_nofrost.training.checkpointing import atomic_save

REPO = Path(__file__).parents[1]


def test_atomic_write_unique_temporaries_and_one_mode(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(files, 'WRITE_HOOK', lambda path, stage: seen.append(
        (path.name, stage, sorted(p.name for p in tmp_path.iterdir()))))
    atomic_json(tmp_path / 'a.json', {'x': 1})
    atomic_save({'state_dict': {'w': torch.ones(2)}, 'epoch': 0}, tmp_path / 'c.pth')
    atomic_copy(tmp_path / 'c.pth', tmp_path / 'best.pth')
    assert [s[:2] for s in seen] == [('a.json', 'begin'), ('a.json', 'commit'), ('c.pth', 'begin'),
                                     ('c.pth', 'commit'), ('best.pth', 'begin'), ('best.pth', 'commit')]
    commit_temps = [t for name, stage, listing in seen if stage == 'commit' for t in listing if t.endswith('.tmp')]
    assert len(commit_temps) == len(set(commit_temps)) == 3  # one unique temporary file per write
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(['a.json', 'c.pth', 'best.pth'], 0o666 & ~umask)
    assert (tmp_path / 'best.pth').read_bytes() == (tmp_path / 'c.pth').read_bytes()


@pytest.mark.parametrize('stage', ['begin', 'commit'])
def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch, stage):
    atomic_json(tmp_path / 'a.json', {'v': 'old'})

    def full_disk(path, at):
        if at == stage:
            raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(files, 'WRITE_HOOK', full_disk)
    with pytest.raises(OSError, match='No space'):
        atomic_json(tmp_path / 'a.json', {'v': 'new'})
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.json']
    assert '"old"' in (tmp_path / 'a.json').read_text()


def test_write_failing_inside_content_leaves_nothing(tmp_path):
    def broken(f):
        f.write(b'half')
        raise RuntimeError('writer died')
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / 'x.bin', broken)
    assert list(tmp_path.iterdir()) == []


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / '.checkpoint-last.pth.abc.tmp').write_bytes(b'partial')
    (tmp_path / 'keep.json').write_text('{}')
    files.remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ['keep.json']


_HOLDER = textwrap.dedent('''
    import sys, time
    from timm_nofrost.files import hold_folder
    with hold_folder(sys.argv[1], 'test holder'):
        print('held', flush=True)
        time.sleep(float(sys.argv[2]))
''')


def _holder(folder: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, '-c', _HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert proc.stdout.readline().strip() == 'held'
    return proc


def test_folder_lock_between_processes(tmp_path):
    proc = _holder(tmp_path, 60)
    try:
        with pytest.raises(FolderBusy, match=rf'in use by process {proc.pid} \(test holder\)'):
            with hold_folder(tmp_path, 'second'):
                pass
        with hold_folder(tmp_path / 'other', 'a different run'):  # other folders proceed in parallel
            pass
    finally:
        proc.kill()  # SIGKILL: the kernel releases the lock, no stale lock blocks
        proc.wait()
    with hold_folder(tmp_path, 'after the kill'):
        with hold_folder(tmp_path, 're-entered by the same process'):
            pass
    assert 'after the kill' in (tmp_path / files.LOCK_FILE).read_text()


def test_checksum_catches_every_flipped_bit_in_the_content(tmp_path):
    torch.manual_seed(0)
    weights = {'w': torch.randn(40, 30), 'b': torch.randn(30).to(torch.bfloat16), 'n': torch.tensor(3)}
    atomic_save({'state_dict': weights, 'epoch': 4, 'history': '[{"epoch": 5}]'}, tmp_path / 'c.pth')
    content = read_checkpoint(tmp_path / 'c.pth')
    assert 'checksum' not in content and content['epoch'] == 4
    raw = (tmp_path / 'c.pth').read_bytes()
    caught = harmless = 0
    for pos in range(0, len(raw), 3):
        flipped = bytearray(raw)
        flipped[pos] ^= 0x04
        (tmp_path / 'f.pth').write_bytes(bytes(flipped))
        try:
            loaded = read_checkpoint(tmp_path / 'f.pth')
        except CheckpointError as e:
            assert 'f.pth' in str(e)
            caught += 1
            continue
        # a flip the reader never looks at (zip padding), or one in the checksum's key name (the file then reads
        # as one without a checksum), must leave the content exactly as written
        loaded = {k: v for k, v in loaded.items() if not str(v).startswith('sha256:')}
        assert content_checksum(loaded) == content_checksum(content)
        harmless += 1
    assert caught > 0.7 * (caught + harmless)
    # every byte of the weights themselves is covered
    start = raw.find(weights['w'].numpy().tobytes()[:32])
    flipped = bytearray(raw)
    flipped[start + 100] ^= 0x01
    (tmp_path / 'f.pth').write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"'.*f\.pth' is corrupted: its content does not match"):
        read_state_dict(tmp_path / 'f.pth')


def test_checksum_of_safetensors_metadata(tmp_path):
    from safetensors.torch import save_file
    weights = {'w': torch.arange(12.).reshape(3, 4)}
    save_file(weights, str(tmp_path / 'm.safetensors'), metadata={'checksum': content_checksum(weights)})
    assert torch.equal(read_state_dict(tmp_path / 'm.safetensors')['w'], weights['w'])
    save_file({'w': weights['w'] + 1}, str(tmp_path / 'bad.safetensors'),
              metadata={'checksum': content_checksum(weights)})
    with pytest.raises(CheckpointError, match='bad.safetensors'):
        read_state_dict(tmp_path / 'bad.safetensors')
    save_file(weights, str(tmp_path / 'plain.safetensors'))  # files without a checksum (timm's, the Hub's) load
    assert torch.equal(read_state_dict(tmp_path / 'plain.safetensors')['w'], weights['w'])
