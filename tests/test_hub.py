"""Weights through huggingface_hub's real download and upload code, against a loopback Hub server."""
import json

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from timm_nofrost import CheckpointError, export_checkpoint, push_folder
from timm_nofrost.cli import main

from conftest import TINY_ARGS, TINY_MODEL, randomize_gains, tiny_model
from hub_server import HubServer, configure_hub_env

REPO = 'timm-nofrost/tiny-test'


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A loopback Hub holding an exported tiny NoFrost model, with huggingface_hub pointed at it."""
    root = tmp_path / 'hub'
    source = randomize_gains(tiny_model()).eval()
    ckpt = tmp_path / 'best_RA.pth'
    torch.save({f'module.{k}': v for k, v in source.state_dict().items()}, ckpt)
    export_checkpoint(ckpt, root / REPO, model_name=TINY_MODEL, repo_id=REPO, model_kwargs=TINY_ARGS)
    with HubServer(root) as server:
        configure_hub_env(monkeypatch, server.endpoint, tmp_path / 'cache')
        yield server, source, tmp_path / 'cache'


def _tiny_from_hub(repo_id: str = REPO) -> torch.nn.Module:
    return timm.create_model(
        TINY_MODEL, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=repo_id), **TINY_ARGS).eval()


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_pretrained_true_downloads_safetensors(hub, sample_batch, monkeypatch):
    server, source, cache = hub
    model = _tiny_from_hub()
    assert torch.equal(_logits(model, sample_batch), _logits(source, sample_batch))
    downloaded = [path for method, path in server.requests if method == 'GET' and '/resolve/' in path]
    assert downloaded == [f'/{REPO}/resolve/main/model.safetensors']  # safetensors first, nothing else

    # the same from the cache with the network off: no request reaches the server
    n_requests = len(server.requests)
    configure_hub_env(monkeypatch, server.endpoint, cache, offline=True)
    offline = _tiny_from_hub()
    assert torch.equal(_logits(offline, sample_batch), _logits(source, sample_batch))
    assert len(server.requests) == n_requests


def test_hf_hub_prefix_reads_config(hub, sample_batch):
    server, source, _ = hub
    model = timm.create_model(f'hf-hub:{REPO}', pretrained=True).eval()
    assert model.pretrained_cfg['architecture'] == TINY_MODEL
    assert model.pretrained_cfg['input_size'] == (3, 32, 32)
    assert torch.equal(_logits(model, sample_batch), _logits(source, sample_batch))


def test_registered_tag_downloads_from_its_hub_id(tmp_path, monkeypatch):
    """``create_model('nf_resnet50_nofrost', pretrained=True)`` fetches timm-nofrost/nf_resnet50_nofrost.at_in1k."""
    reference = randomize_gains(timm.create_model('nf_resnet50_nofrost')).eval()
    root = tmp_path / 'hub'
    repo = root / 'timm-nofrost' / 'nf_resnet50_nofrost.at_in1k'
    repo.mkdir(parents=True)
    safetensors.torch.save_file(reference.state_dict(), str(repo / 'model.safetensors'))
    with HubServer(root) as server:
        configure_hub_env(monkeypatch, server.endpoint, tmp_path / 'cache')
        model = timm.create_model('nf_resnet50_nofrost', pretrained=True).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(model, x), _logits(reference, x))
    assert ('GET', '/timm-nofrost/nf_resnet50_nofrost.at_in1k/resolve/main/model.safetensors') in server.requests


def test_missing_repo_is_a_clear_error(hub):
    with pytest.raises(RepositoryNotFoundError) as info:
        _tiny_from_hub('timm-nofrost/does-not-exist')
    notes = ' '.join(getattr(info.value, '__notes__', []))
    assert "Hub repo 'timm-nofrost/does-not-exist'" in notes and 'HF_ENDPOINT' in notes


def test_offline_without_cache_is_a_clear_error(tmp_path):
    with pytest.raises(LocalEntryNotFoundError) as info:
        _tiny_from_hub()  # the autouse fixture keeps every test offline with an empty cache
    assert 'HF_HUB_OFFLINE' in ' '.join(getattr(info.value, '__notes__', []))


def test_corrupted_hub_safetensors(hub):
    server, _, _ = hub
    weights = server.root / REPO / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"Hub repo '{REPO}'.*not a valid safetensors"):
        _tiny_from_hub()


def test_push_uploads_with_token_and_never_prints_it(tmp_path, monkeypatch, capsys, sample_batch):
    source = randomize_gains(tiny_model()).eval()
    ckpt = tmp_path / 'w.pth'
    torch.save(source.state_dict(), ckpt)
    folder = tmp_path / 'export'
    export_checkpoint(ckpt, folder, model_name=TINY_MODEL, model_kwargs=TINY_ARGS)
    token = 'hf_test_secret_token_123'
    with HubServer(tmp_path / 'hub') as server:
        configure_hub_env(monkeypatch, server.endpoint, tmp_path / 'cache')
        monkeypatch.setenv('HF_TOKEN', token)
        monkeypatch.setattr('huggingface_hub.constants.HF_TOKEN_PATH', str(tmp_path / 'no-token-file'))
        assert main(['push', str(folder), '--repo-id', 'someone/pushed-model', '--json']) == 0
        out = capsys.readouterr()
        assert token not in out.out + out.err
        assert json.loads(out.out)['repo_id'] == 'someone/pushed-model'
        assert server.auth_headers and set(server.auth_headers) == {f'Bearer {token}'}
        pulled = timm.create_model('hf-hub:someone/pushed-model', pretrained=True).eval()
    assert sorted(p.name for p in (server.root / 'someone' / 'pushed-model').iterdir()) == [
        'README.md', 'config.json', 'model.safetensors']
    assert torch.equal(_logits(pulled, sample_batch), _logits(source, sample_batch))


def test_push_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="Invalid repo_id 'no-slash'"):
        push_folder(tmp_path, 'no-slash')
    with pytest.raises(ValueError, match='missing model.safetensors, config.json'):
        push_folder(tmp_path, 'org/name')
    with pytest.raises(FileNotFoundError, match='nowhere'):
        push_folder(tmp_path / 'nowhere', 'org/name')


def test_pretrained_true_before_the_hub_repos_exist_says_how_to_load_the_authors_files(tmp_path, monkeypatch):
    """Until the project's repos are published, pretrained=True names the repo and the two ways to load the
    authors' files instead (the loopback Hub has no such repo, as the real one today)."""
    (tmp_path / 'hub').mkdir()
    with HubServer(tmp_path / 'hub') as server:
        configure_hub_env(monkeypatch, server.endpoint, tmp_path / 'cache')
        with pytest.raises(RepositoryNotFoundError) as info:
            timm.create_model('nf_resnet50_nofrost.at_in1k', pretrained=True)
    notes = ' '.join(getattr(info.value, '__notes__', []))
    assert "repo 'timm-nofrost/nf_resnet50_nofrost.at_in1k' does not exist" in notes
    assert "pretrained_cfg_overlay=dict(file='best_RA.pth')" in notes
    assert 'timm-nofrost export best_RA.pth --model nf_resnet50_nofrost.at_in1k --out DIR' in notes
    assert 'github.com/amazon-research/normalizer-free-robust-training' in notes
