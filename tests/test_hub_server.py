"""Tests of the loopback Hub emulation, driven through huggingface_hub's real client code."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

try:
    from .hub_server import HubServer, configure_hub_env
except ImportError:  # tests/ is not a package
    from hub_server import HubServer, configure_hub_env

# huggingface_hub's own LFS upload code triggers this httpx2 warning (`data=fileobj`), not these tests.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

REPO_ID = "test-org/tiny-model"
TOKEN = "hf_test_token_123"
CONFIG = b'{"architecture": "resnet18", "num_classes": 10}\n'
WEIGHTS = bytes(range(256)) * 64  # binary content => served as an LFS file


def git_sha1(data: bytes) -> str:
    """git-sha1 of a blob, the ETag of regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running server with one repo, and huggingface_hub configured to use it with a private cache."""
    repo = tmp_path / "hub" / REPO_ID
    repo.mkdir(parents=True)
    (repo / "config.json").write_bytes(CONFIG)
    (repo / "model.safetensors").write_bytes(WEIGHTS)
    with HubServer(tmp_path / "hub") as server:
        configure_hub_env(monkeypatch, server.endpoint, tmp_path / "hf_home")
        yield server


def test_download_matches_repo_bytes(hub: HubServer, tmp_path: Path) -> None:
    config_path = Path(hf_hub_download(REPO_ID, "config.json"))
    weights_path = Path(hf_hub_download(REPO_ID, "model.safetensors", revision="main"))

    assert config_path.read_bytes() == CONFIG
    assert weights_path.read_bytes() == WEIGHTS
    assert config_path.is_relative_to(tmp_path / "hf_home" / "hub" / "models--test-org--tiny-model")
    # Blobs are named after the ETag: git-sha1 for regular files, sha256 for LFS files.
    blobs = {p.name for p in (tmp_path / "hf_home/hub/models--test-org--tiny-model/blobs").iterdir()}
    assert blobs == {git_sha1(CONFIG), hashlib.sha256(WEIGHTS).hexdigest()}
    assert hub.requests == [
        ("HEAD", f"/{REPO_ID}/resolve/main/config.json"),
        ("GET", f"/{REPO_ID}/resolve/main/config.json"),
        ("HEAD", f"/{REPO_ID}/resolve/main/model.safetensors"),
        ("GET", f"/{REPO_ID}/resolve/main/model.safetensors"),
    ]
    assert hub.auth_headers == []  # no token configured


def test_commit_hash_revision_and_range(hub: HubServer) -> None:
    response = get_session().head(f"{hub.endpoint}/{REPO_ID}/resolve/main/model.safetensors")
    commit = response.headers["X-Repo-Commit"]
    assert len(commit) == 40
    assert response.headers["X-Linked-Etag"] == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    assert int(response.headers["X-Linked-Size"]) == len(WEIGHTS)

    assert Path(hf_hub_download(REPO_ID, "config.json", revision=commit)).read_bytes() == CONFIG

    partial = get_session().get(
        f"{hub.endpoint}/{REPO_ID}/resolve/main/model.safetensors", headers={"Range": "bytes=100-199"}
    )
    assert partial.status_code == 206
    assert partial.headers["Content-Range"] == f"bytes 100-199/{len(WEIGHTS)}"
    assert partial.content == WEIGHTS[100:200]


def test_offline_download_uses_cache(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    online_path = hf_hub_download(REPO_ID, "model.safetensors")
    nb_requests = len(hub.requests)

    configure_hub_env(monkeypatch, hub.endpoint, tmp_path / "hf_home", offline=True)
    offline_path = hf_hub_download(REPO_ID, "model.safetensors")

    assert offline_path == online_path
    assert Path(offline_path).read_bytes() == WEIGHTS
    assert len(hub.requests) == nb_requests  # nothing was sent
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO_ID, "config.json")  # never downloaded
    assert len(hub.requests) == nb_requests


def test_missing_repo_raises_repository_not_found(hub: HubServer) -> None:
    with pytest.raises(RepositoryNotFoundError) as exc_info:
        hf_hub_download("test-org/does-not-exist", "config.json")
    assert exc_info.value.response.status_code == 404
    assert exc_info.value.response.headers["X-Error-Code"] == "RepoNotFound"


def test_missing_file_raises_entry_not_found(hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(EntryNotFoundError) as exc_info:
        hf_hub_download(REPO_ID, "pytorch_model.bin")
    assert exc_info.value.response.headers["X-Error-Code"] == "EntryNotFound"
    # The client caches the non-existence under the commit the server reported.
    commit = exc_info.value.response.headers["X-Repo-Commit"]
    no_exist = tmp_path / "hf_home/hub/models--test-org--tiny-model/.no_exist" / commit / "pytorch_model.bin"
    assert no_exist.is_file()

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO_ID, "config.json", revision="v0.1")


def test_upload_folder_then_download(hub: HubServer, tmp_path: Path) -> None:
    folder = tmp_path / "to_upload"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "model.safetensors").write_bytes(WEIGHTS[::-1])
    (folder / "sub" / "notes.txt").write_text("hello")
    api = HfApi(token=TOKEN)

    repo_url = api.create_repo("test-org/uploaded", exist_ok=True)
    assert repo_url.repo_id == "test-org/uploaded"
    assert api.create_repo("test-org/uploaded", exist_ok=True).repo_id == "test-org/uploaded"  # 409 => ok
    commit = api.upload_folder(repo_id="test-org/uploaded", folder_path=folder, commit_message="add")

    stored = tmp_path / "hub" / "test-org" / "uploaded"
    assert sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "sub/notes.txt",
    ]
    assert commit.oid == api.model_info("test-org/uploaded").sha
    # The binary file went through the LFS batch API ("basic" transfer), the text files inline.
    oid = hashlib.sha256(WEIGHTS[::-1]).hexdigest()
    assert ("POST", "/test-org/uploaded.git/info/lfs/objects/batch") in hub.requests
    assert ("PUT", f"/_lfs/upload/{oid}") in hub.requests
    assert ("POST", "/api/models/test-org/uploaded/commit/main") in hub.requests
    assert not any("xet" in path for _, path in hub.requests)
    assert hub.auth_headers and set(hub.auth_headers) == {f"Bearer {TOKEN}"}

    assert Path(hf_hub_download("test-org/uploaded", "model.safetensors")).read_bytes() == WEIGHTS[::-1]
    assert Path(hf_hub_download("test-org/uploaded", "sub/notes.txt")).read_text() == "hello"
    assert sorted(api.list_repo_files("test-org/uploaded")) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "sub/notes.txt",
    ]


def test_upload_inline_with_xet_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("hf_xet")
    folder = tmp_path / "to_upload"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    with HubServer(tmp_path / "hub", lfs=False) as server:
        configure_hub_env(monkeypatch, server.endpoint, tmp_path / "hf_home", disable_xet=False)
        api = HfApi(token=TOKEN)
        api.create_repo("test-org/inline")
        api.upload_folder(repo_id="test-org/inline", folder_path=folder)

        assert Path(hf_hub_download("test-org/inline", "model.safetensors")).read_bytes() == WEIGHTS
        assert not any("lfs" in path or "xet" in path for _, path in server.requests)


def test_timm_push_and_load_roundtrip(hub: HubServer) -> None:
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from timm.models import load_model_config_from_hf, push_to_hf_hub

    model = timm.create_model("test_vit", pretrained=False, num_classes=7)
    push_to_hf_hub(model, "test-org/timm-vit", token=TOKEN)

    config, model_name, _ = load_model_config_from_hf("test-org/timm-vit")
    assert model_name == "test_vit"
    assert config["num_classes"] == 7
    loaded = timm.create_model("hf-hub:test-org/timm-vit", pretrained=True)
    expected = model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    assert ("GET", "/test-org/timm-vit/resolve/main/model.safetensors") in hub.requests
    assert f"Bearer {TOKEN}" in hub.auth_headers
