"""Weights in the authors' formats load safely; bad files fail with errors that name them."""
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from timm_nofrost import CheckpointError, clean_state_dict, read_state_dict

from conftest import TINY_ARGS, TINY_MODEL, authors_state_dict


def _load(path: Path, **kwargs) -> torch.nn.Module:
    args = {**TINY_ARGS, **kwargs}
    return timm.create_model(TINY_MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **args).eval()


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_authors_best_ra_format_loads_with_identical_logits(authors_checkpoint, sample_batch):
    source, path = authors_checkpoint
    loaded = _load(path)
    assert torch.equal(_logits(loaded, sample_batch), _logits(source, sample_batch))


def test_authors_latest_format_loads(tmp_path, authors_checkpoint, sample_batch):
    source, _ = authors_checkpoint
    path = tmp_path / 'latest.pth'
    torch.save({'model': authors_state_dict(source), 'optimizer': {'state': {}, 'param_groups': []},
                'epoch': 89, 'best_RA': 0.2245}, path)
    assert torch.equal(_logits(_load(path), sample_batch), _logits(source, sample_batch))


def test_safetensors_and_in_memory_state_dict(tmp_path, authors_checkpoint, sample_batch):
    source, _ = authors_checkpoint
    path = tmp_path / 'weights.safetensors'
    safetensors.torch.save_file(source.state_dict(), str(path))
    assert torch.equal(_logits(_load(path), sample_batch), _logits(source, sample_batch))
    # the filter also runs on in-memory state dicts, which timm does not clean: DDP + compile prefixes
    wrapped = {f'module._orig_mod.{k}': v for k, v in source.state_dict().items()}
    model = timm.create_model(TINY_MODEL, pretrained=True, pretrained_cfg_overlay=dict(state_dict=wrapped),
                              **TINY_ARGS)
    assert torch.equal(_logits(model, sample_batch), _logits(source, sample_batch))


def test_clean_state_dict_unwraps_nesting_and_prefixes():
    tensor = torch.ones(1)
    cleaned = clean_state_dict({'state_dict': {'module._orig_mod.a.weight': tensor, 'step': 3}, 'epoch': 1})
    assert list(cleaned) == ['a.weight'] and cleaned['a.weight'] is tensor
    with pytest.raises(CheckpointError, match='holds no tensors'):
        clean_state_dict({'epoch': 1})


def test_other_architecture_is_rejected_with_key_summary(tmp_path):
    path = tmp_path / 'resnet18_bn.pth'
    torch.save(authors_state_dict(timm.create_model('resnet18')), path)  # a BatchNorm ResNet
    with pytest.raises(CheckpointError) as info:
        _load(path)
    message = str(info.value)
    assert str(path) in message and 'nf_resnet18_cifar_nofrost' in message
    assert 'missing keys (stem.conv.weight' in message
    assert 'unexpected keys (conv1.weight, bn1.weight' in message


def test_bottleneck_checkpoint_into_basic_model(tmp_path):
    other = timm.create_model('nf_resnet26_nofrost', channels=(16, 32, 64, 128), stem_chs=16)
    path = tmp_path / 'other.pth'
    torch.save(authors_state_dict(other), path)
    with pytest.raises(CheckpointError) as info:
        _load(path)
    message = str(info.value)
    assert '24 unexpected keys (stages.0.0.conv3.weight' in message  # bottleneck-only convs
    assert 'stages.0.0.conv1.weight: checkpoint (8, 16, 1, 1) vs model (8, 8, 3, 3)' in message


def test_width_mismatch_lists_shapes(tmp_path, authors_checkpoint):
    _, path = authors_checkpoint
    with pytest.raises(CheckpointError, match=r'shape mismatches.*stem\.conv\.weight|shape mismatches') as info:
        timm.create_model(TINY_MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert str(path) in str(info.value) and 'checkpoint (8,' in str(info.value)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / 'notes.pth'
    path.write_text('this is not a checkpoint\n' * 10)
    with pytest.raises(CheckpointError, match='not a PyTorch') as info:
        _load(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match=str(path)):
        read_state_dict(path)


def test_corrupted_safetensors(tmp_path, authors_checkpoint):
    source, _ = authors_checkpoint
    path = tmp_path / 'model.safetensors'
    safetensors.torch.save_file(source.state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match='not a valid safetensors file') as info:
        _load(path)
    assert str(path) in str(info.value)


class _Payload:
    """Unpickling this object would run code (here: create a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


@pytest.mark.parametrize('writer', ['pickle', 'torch.save'])
def test_code_executing_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    payload = {'stem.conv.weight': torch.zeros(1), 'x': _Payload(str(marker))}
    if writer == 'pickle':
        with path.open('wb') as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r'refusing to load .*imports .*open') as info:
        _load(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match='refusing to load'):
        read_state_dict(path)
    assert not marker.exists()


def test_missing_file_is_named(tmp_path):
    path = tmp_path / 'nope.pth'
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        _load(path)
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        read_state_dict(path)


def test_unknown_pretrained_tag_lists_accepted_tags():
    with pytest.raises(ValueError, match=r"Unknown pretrained tag 'bogus_in1k'.*'at_in1k'"):
        timm.create_model('nf_resnet50_nofrost.bogus_in1k', pretrained=True)
    with pytest.raises(ValueError, match='bogus'):
        timm.create_model('nf_resnet50_nofrost', pretrained_cfg='bogus')


def test_num_classes_different_from_weights_resets_head(authors_checkpoint, sample_batch):
    source, path = authors_checkpoint
    model = _load(path, num_classes=3)
    assert model.get_classifier().out_features == 3
    with torch.no_grad():
        assert torch.equal(model.forward_features(sample_batch), source.forward_features(sample_batch))
        assert model(sample_batch).shape == (2, 3)


def test_wrong_num_classes_hint(tmp_path, authors_checkpoint):
    """A checkpoint trained for other classes, loaded as if the registry's class count were right."""
    source, _ = authors_checkpoint
    head_swapped = timm.create_model(TINY_MODEL, num_classes=7, **TINY_ARGS)
    state = source.state_dict()
    state.update({k: v for k, v in head_swapped.state_dict().items() if k.startswith('head.')})
    path = tmp_path / 'seven.pth'
    torch.save(state, path)
    with pytest.raises(CheckpointError, match='pass num_classes=7'):
        _load(path)
    assert _load(path, num_classes=7).get_classifier().out_features == 7


def test_in_chans_adapts_first_conv(authors_checkpoint, sample_batch):
    source, path = authors_checkpoint
    gray = _load(path, in_chans=1)
    expected = source.stem.conv.weight.sum(dim=1, keepdim=True)  # timm's RGB -> gray adaptation
    assert torch.allclose(gray.stem.conv.weight, expected)
    assert torch.equal(gray.stages[0][0].conv1.weight, source.stages[0][0].conv1.weight)
    assert _logits(gray, sample_batch[:, :1]).shape == (2, 10)


def test_one_loader_reports_what_does_not_fit_as_fields(tmp_path):
    """``load_checkpoint`` (the loader the CLI, train, export, convert and the study use): the CheckpointError
    carries the file and the key differences as fields, not only in its message."""
    from timm_nofrost.checkpoint import load_checkpoint
    small = timm.create_model('nf_resnet18_cifar_nofrost', num_classes=4, channels=(8, 8, 16, 16), stem_chs=8)
    path = tmp_path / 'small.pth'
    torch.save({'state_dict': small.state_dict(), 'epoch': 3}, path)
    wide = timm.create_model('nf_resnet18_cifar_nofrost', num_classes=4, channels=(8, 8, 16, 32), stem_chs=8)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(wide, path)
    e = info.value
    assert e.path == str(path) and e.missing == [] and e.unexpected == []
    assert 'stages.3.0.conv1.weight: checkpoint (16, 16, 3, 3) vs model (32, 16, 3, 3)' in e.mismatched
    assert len(e.mismatched) == sum(a.shape != b.shape for a, b in zip(small.state_dict().values(),
                                                                       wide.state_dict().values()))
    assert str(e).startswith(f"checkpoint '{path}' does not fit nf_resnet18_cifar_nofrost: ")
    other = timm.create_model('nf_resnet18_cifar_nofrost', num_classes=7, channels=(8, 8, 16, 16), stem_chs=8)
    with pytest.raises(CheckpointError, match='trained for 4 classes: pass num_classes=4') as info:
        load_checkpoint(other, path)
    assert [m.split(':')[0] for m in info.value.mismatched] == ['head.fc.weight', 'head.fc.bias']
    assert load_checkpoint(timm.create_model('nf_resnet18_cifar_nofrost', num_classes=4, channels=(8, 8, 16, 16),
                                             stem_chs=8), path) is not None  # fits: loaded
