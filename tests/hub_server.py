"""A loopback HTTP server emulating the subset of the Hugging Face Hub API used by timm.

Only the standard library is used. The server is meant for tests: it binds to ``127.0.0.1`` on a
free port, serves in a daemon thread and stores repositories as plain folders on disk::

    root/<org>/<name>/<files>

Supported client calls (``huggingface_hub`` 2.4.0):

* ``hf_hub_download`` / ``get_hf_file_metadata`` / ``HfApi.file_exists``:
  ``HEAD`` and ``GET /{org}/{name}/resolve/{revision}/{filename}`` (with ``Range`` support).
  404 answers carry ``X-Error-Code`` = ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``.
* ``HfApi.model_info`` / ``repo_info``: ``GET /api/models/{org}/{name}[/revision/{revision}]``.
* ``HfApi.list_repo_tree`` / ``list_repo_files``: ``GET /api/models/{org}/{name}/tree/{revision}[/{path}]``.
* ``HfApi.create_repo``: ``POST /api/repos/create``.
* ``HfApi.upload_folder`` / ``create_commit``: ``POST /api/validate-yaml``,
  ``POST /api/models/{org}/{name}/preupload/{revision}``, the git-LFS batch API
  ``POST /{org}/{name}.git/info/lfs/objects/batch`` ("basic" transfer: ``PUT`` upload + ``POST`` verify on
  ``/_lfs/...``) and ``POST /api/models/{org}/{name}/commit/{revision}`` (ndjson payload).

Only the ``main`` revision exists (the current commit hash, derived from the repo content, is accepted too).
The Xet protocol is not implemented. In ``huggingface_hub`` 2.4.0 the choice between Xet and LFS is made
client-side only (``is_xet_available()``: ``hf_xet`` installed and ``HF_HUB_DISABLE_XET`` unset), so clients
must run with Xet disabled (:func:`configure_hub_env` does it), or the server must be created with
``lfs=False`` so that every file is committed inline ("regular" upload mode) and no LFS/Xet transfer happens.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import pytest

__all__ = ["HubServer", "configure_hub_env", "is_lfs_file"]

DEFAULT_REVISION = "main"
DEFAULT_NAMESPACE = "user"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_EXTENSIONS = frozenset(
    {
        ".bin", ".ckpt", ".gz", ".h5", ".joblib", ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".pickle",
        ".pkl", ".pt", ".pth", ".safetensors", ".tar", ".tflite", ".zip",
    }
)
_CHUNK = 1024 * 1024
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = rf"(?P<org>{_NAME})/(?P<name>{_NAME})"

_RESOLVE_RE = re.compile(rf"^/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")
_INFO_RE = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<revision>[^/]+))?$")
_TREE_RE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?$")
_PREUPLOAD_RE = re.compile(rf"^/api/models/{_REPO}/preupload/(?P<revision>[^/]+)$")
_COMMIT_RE = re.compile(rf"^/api/models/{_REPO}/commit/(?P<revision>[^/]+)$")
_LFS_BATCH_RE = re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$")
_LFS_OBJECT_RE = re.compile(r"^/_lfs/(?P<action>upload|verify)/(?P<oid>[0-9a-f]{64})$")


def is_lfs_file(path: str, size: int, sample: bytes) -> bool:
    """Whether a file is stored with git-LFS: known binary extension, large size, or binary content."""
    return PurePosixPath(path).suffix.lower() in LFS_EXTENSIONS or size >= LFS_SIZE_THRESHOLD or b"\0" in sample


def git_blob_oid(data: bytes) -> str:
    """The git-sha1 of a blob (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The content of the git-LFS pointer file committed in place of a large file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class RepoFileInfo:
    """Metadata of one file of a repository, as the Hub would report it."""

    path: str
    size: int
    is_lfs: bool
    sha256: str
    git_oid: str  # git-sha1 of the blob, or of the LFS pointer for LFS files

    @property
    def etag(self) -> str:
        """ETag of ``/resolve``: the sha256 for LFS files, the git-sha1 otherwise."""
        return self.sha256 if self.is_lfs else self.git_oid

    @property
    def remote_oid(self) -> str:
        """The oid the preupload endpoint reports, compared client-side to skip unchanged files."""
        return self.sha256 if self.is_lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        """Size of the git-LFS pointer file."""
        return len(lfs_pointer(self.sha256, self.size))

    def tree_entry(self) -> dict[str, Any]:
        """Entry of the ``/tree`` API."""
        entry: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": self.path}
        if self.is_lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling_entry(self) -> dict[str, Any]:
        """Entry of ``siblings`` in the model info API."""
        entry: dict[str, Any] = {"rfilename": self.path, "size": self.size, "blobId": self.git_oid}
        if self.is_lfs:
            entry["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry


class HttpError(Exception):
    """An error answered to the client, with Hub-style ``X-Error-Code`` / ``X-Error-Message`` headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class _RepoStore:
    """On-disk repositories (``root/<org>/<name>``) plus staged LFS objects; thread-safe."""

    def __init__(self, root: Path, staging: Path) -> None:
        self.root = root
        self.staging = staging
        self.lock = threading.RLock()
        self._hash_cache: dict[tuple[str, int, int, int], tuple[str, str, bool]] = {}

    def repo_dir(self, org: str, name: str) -> Path:
        """Folder of an existing repository; raises ``RepoNotFound`` otherwise."""
        path = self.root / org / name
        if not path.is_dir():
            raise HttpError(404, f"Repository {org}/{name} not found", "RepoNotFound")
        return path

    def file_path(self, repo: Path, filename: str) -> Path:
        """Path of ``filename`` inside ``repo``, rejecting anything escaping the repository."""
        parts = PurePosixPath(filename).parts
        if not parts or filename.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise HttpError(400, f"Invalid path in repo: {filename!r}", "BadRequest")
        return repo.joinpath(*parts)

    def file_info(self, repo: Path, path: Path) -> RepoFileInfo:
        """Hashes of one file, cached by (path, inode, size, mtime)."""
        stat = path.stat()
        key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._hash_cache.get(key)
        if cached is None:
            sha256, git_sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % stat.st_size)
            with path.open("rb") as f:
                sample = f.read(512)
                f.seek(0)
                while chunk := f.read(_CHUNK):
                    sha256.update(chunk)
                    git_sha1.update(chunk)
            rel = path.relative_to(repo).as_posix()
            cached = (sha256.hexdigest(), git_sha1.hexdigest(), is_lfs_file(rel, stat.st_size, sample))
            self._hash_cache[key] = cached
        sha, git_oid, is_lfs = cached
        if is_lfs:
            git_oid = git_blob_oid(lfs_pointer(sha, stat.st_size))
        return RepoFileInfo(path.relative_to(repo).as_posix(), stat.st_size, is_lfs, sha, git_oid)

    def list_files(self, repo: Path) -> list[RepoFileInfo]:
        """All files of a repository, sorted by path."""
        files = sorted(p for p in repo.rglob("*") if p.is_file())
        return [self.file_info(repo, p) for p in files]

    def commit_hash(self, repo: Path) -> str:
        """A 40-hex commit id derived from the repository content (changes whenever a file changes)."""
        digest = hashlib.sha1(b"hub-server-commit\0")
        for info in self.list_files(repo):
            digest.update(f"{info.path}\0{info.git_oid}\n".encode())
        return digest.hexdigest()

    def check_revision(self, repo: Path, revision: str) -> str:
        """Validate a revision (``main`` or the current commit hash) and return the current commit hash."""
        commit = self.commit_hash(repo)
        if revision not in (DEFAULT_REVISION, commit):
            raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def staged_object(self, oid: str) -> Path:
        """Where an uploaded LFS object is staged until it is committed."""
        return self.staging / oid


class _HubHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying a reference to its :class:`HubServer`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        super().__init__(("127.0.0.1", 0), _HubRequestHandler)


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one request to the emulated Hub endpoints. Each connection serves a single request."""

    server: _HubHTTPServer
    protocol_version = "HTTP/1.1"

    # ---------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        """Silence the default stderr access log."""

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        hub._record(method, unquote(split.path), self.headers.get("Authorization"))
        self.close_connection = True
        body = self._read_body() if method in ("POST", "PUT") else b""
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        try:
            self._route(method, split.path, query, body)
        except HttpError as err:
            self._send_error(err)
        except Exception as err:  # report server bugs to the client instead of hanging it
            self._send_error(HttpError(500, f"{type(err).__name__}: {err}"))

    def _read_body(self) -> bytes:
        """Read the request body, sent with ``Content-Length`` or chunked transfer encoding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": content_type})

    def _send_error(self, err: HttpError) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": err.message, **err.headers}
        if err.code is not None:
            headers["X-Error-Code"] = err.code
        self._send(err.status, json.dumps({"error": err.message}).encode(), headers)

    def _json_body(self, body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body or b"{}")
        except json.JSONDecodeError as e:
            raise HttpError(400, f"Invalid JSON body: {e}", "BadRequest") from e
        if not isinstance(payload, dict):
            raise HttpError(400, "JSON body must be an object", "BadRequest")
        return payload

    # ---------------------------------------------------------------- routing

    def _route(self, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        """Call the handler matching ``method`` and the raw (still URL-encoded) ``path``."""
        routes: list[tuple[str, re.Pattern[str], Any]] = [
            ("HEAD", _RESOLVE_RE, self._resolve),
            ("GET", _RESOLVE_RE, self._resolve),
            ("GET", _INFO_RE, self._model_info),
            ("GET", _TREE_RE, self._tree),
            ("POST", _PREUPLOAD_RE, self._preupload),
            ("POST", _COMMIT_RE, self._commit),
            ("POST", _LFS_BATCH_RE, self._lfs_batch),
            ("PUT", _LFS_OBJECT_RE, self._lfs_object),
            ("POST", _LFS_OBJECT_RE, self._lfs_object),
        ]
        for route_method, pattern, handler in routes:
            match = pattern.match(path)
            if route_method == method and match:
                params = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                handler(query=query, body=body, **params)
                return
        if method == "POST" and path == "/api/repos/create":
            self._create_repo(self._json_body(body))
        elif method == "POST" and path == "/api/validate-yaml":
            self._send_json(200, {"errors": [], "warnings": []})
        elif method == "GET" and path == "/api/agent-harnesses":
            self._send_json(200, {"standardEnvVars": [], "harnesses": {}})
        elif "xet-" in path:
            raise HttpError(
                404,
                "HubServer does not implement the Xet protocol: set HF_HUB_DISABLE_XET=1 (see configure_hub_env)"
                " or create the server with lfs=False",
            )
        else:
            raise HttpError(404, f"Not implemented by HubServer: {method} {path}")

    # ---------------------------------------------------------------- downloads

    def _resolve(self, org: str, name: str, revision: str, filename: str, **_: Any) -> None:
        store = self.server.hub._store
        with store.lock:
            repo = store.repo_dir(org, name)
            commit = store.check_revision(repo, revision)
            path = store.file_path(repo, filename)
            if not path.is_file():
                raise HttpError(404, f"Entry not found: {filename}", "EntryNotFound", {"X-Repo-Commit": commit})
            info = store.file_info(repo, path)
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{info.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if info.is_lfs:
            headers["X-Linked-Etag"] = f'"{info.etag}"'
            headers["X-Linked-Size"] = str(info.size)
        start, end = 0, info.size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header and info.size > 0:
            start, end = self._parse_range(range_header, info.size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{info.size}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(max(end - start + 1, 0)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "GET":
            with path.open("rb") as f:
                f.seek(start)
                remaining = end - start + 1
                while remaining > 0 and (chunk := f.read(min(_CHUNK, remaining))):
                    self.wfile.write(chunk)
                    remaining -= len(chunk)

    @staticmethod
    def _parse_range(value: str, size: int) -> tuple[int, int]:
        """Parse a single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range into inclusive bounds."""
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", value)
        if match is None or match.group(1) == match.group(2) == "":
            raise HttpError(416, f"Unsupported range: {value}", headers={"Content-Range": f"bytes */{size}"})
        first, last = match.groups()
        if first == "":
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        if start >= size or start > end:
            raise HttpError(416, f"Unsatisfiable range: {value}", headers={"Content-Range": f"bytes */{size}"})
        return start, end

    def _model_info(self, org: str, name: str, revision: str | None, **_: Any) -> None:
        store = self.server.hub._store
        with store.lock:
            repo = store.repo_dir(org, name)
            commit = store.check_revision(repo, revision or DEFAULT_REVISION)
            files = store.list_files(repo)
        self._send_json(
            200,
            {
                "_id": commit[:24],
                "id": f"{org}/{name}",
                "modelId": f"{org}/{name}",
                "author": org,
                "sha": commit,
                "private": False,
                "gated": False,
                "disabled": False,
                "lastModified": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                "tags": [],
                "siblings": [f.sibling_entry() for f in files],
            },
        )

    def _tree(self, org: str, name: str, revision: str, path: str | None, query: dict[str, str], **_: Any) -> None:
        store = self.server.hub._store
        with store.lock:
            repo = store.repo_dir(org, name)
            store.check_revision(repo, revision)
            files = store.list_files(repo)
        prefix = f"{path.strip('/')}/" if path else ""
        if path and not any(f.path.startswith(prefix) for f in files):
            raise HttpError(404, f"Entry not found: {path}", "EntryNotFound")
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for info in files:
            if not info.path.startswith(prefix):
                continue
            parts = PurePosixPath(info.path[len(prefix) :]).parts
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                if folder not in folders:
                    folders.add(folder)
                    oid = hashlib.sha1(f"tree\0{folder}".encode()).hexdigest()
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entries.append(info.tree_entry())
        self._send_json(200, entries)

    # ---------------------------------------------------------------- uploads

    def _create_repo(self, payload: dict[str, Any]) -> None:
        hub = self.server.hub
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise HttpError(400, f"HubServer only supports model repos, not {repo_type!r}", "BadRequest")
        org = payload.get("organization") or DEFAULT_NAMESPACE
        name = payload.get("name") or ""
        if not re.fullmatch(_NAME, org) or not re.fullmatch(_NAME, name):
            raise HttpError(400, f"Invalid repo name: {org}/{name}", "BadRequest")
        url = f"{hub.endpoint}/{org}/{name}"
        with hub._store.lock:
            repo = hub.root / org / name
            if repo.is_dir():
                self._send_json(409, {"error": "You already created this model repo", "url": url})
                return
            repo.mkdir(parents=True)
        self._send_json(200, {"url": url, "name": f"{org}/{name}", "id": f"{org}/{name}"})

    def _preupload(self, org: str, name: str, revision: str, body: bytes, **_: Any) -> None:
        hub = self.server.hub
        files = self._json_body(body).get("files")
        if not isinstance(files, list):
            raise HttpError(400, "Missing 'files' in preupload payload", "BadRequest")
        with hub._store.lock:
            repo = hub._store.repo_dir(org, name)
            hub._store.check_revision(repo, revision)
            answer = []
            for item in files:
                path = str(item["path"])
                sample = base64.b64decode(item.get("sample", ""))
                lfs = hub.lfs and is_lfs_file(path, int(item.get("size", 0)), sample)
                target = hub._store.file_path(repo, path)
                oid = hub._store.file_info(repo, target).remote_oid if target.is_file() else None
                mode = "lfs" if lfs else "regular"
                answer.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": answer, "commitOid": None})

    def _lfs_batch(self, org: str, name: str, body: bytes, **_: Any) -> None:
        hub = self.server.hub
        payload = self._json_body(body)
        hub._store.repo_dir(org, name)
        if payload.get("operation") != "upload":
            raise HttpError(400, "HubServer only supports the 'upload' LFS operation", "BadRequest")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HttpError(422, f"Unsupported LFS transfers {payload.get('transfers')}: only 'basic' is available")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            staged = hub._store.staged_object(oid)
            if not (staged.is_file() and staged.stat().st_size == size):
                entry["actions"] = {
                    "upload": {"href": f"{hub.endpoint}/_lfs/upload/{oid}", "header": {}},
                    "verify": {"href": f"{hub.endpoint}/_lfs/verify/{oid}", "header": {}},
                }
            objects.append(entry)
        self._send_json(200, {"transfer": "basic", "objects": objects}, "application/vnd.git-lfs+json")

    def _lfs_object(self, action: str, oid: str, body: bytes, **_: Any) -> None:
        store = self.server.hub._store
        staged = store.staged_object(oid)
        if action == "upload":
            if hashlib.sha256(body).hexdigest() != oid:
                raise HttpError(400, f"Uploaded content does not match oid {oid}", "BadRequest")
            tmp = staged.with_name(f"{oid}.{threading.get_ident()}.tmp")
            tmp.write_bytes(body)
            os.replace(tmp, staged)
            self._send(200)
            return
        payload = self._json_body(body)
        if not staged.is_file() or staged.stat().st_size != int(payload.get("size", -1)):
            raise HttpError(404, f"LFS object {oid} was not uploaded", "EntryNotFound")
        self._send_json(200, {"success": True})

    def _commit(self, org: str, name: str, revision: str, query: dict[str, str], body: bytes, **_: Any) -> None:
        hub = self.server.hub
        store = hub._store
        if query.get("create_pr") in ("1", "true"):
            raise HttpError(400, "HubServer does not support pull requests (create_pr)", "BadRequest")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        with store.lock:
            repo = store.repo_dir(org, name)
            parent = store.check_revision(repo, revision)
            writes: list[tuple[Path, bytes | Path]] = []
            deletes: list[Path] = []
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "header":
                    if value.get("parentCommit") not in (None, parent):
                        raise HttpError(412, "Parent commit is not the head of the branch", "BadRequest")
                elif key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HttpError(400, f"Unsupported encoding {value.get('encoding')}", "BadRequest")
                    writes.append((store.file_path(repo, value["path"]), base64.b64decode(value["content"])))
                elif key == "lfsFile":
                    staged = store.staged_object(value["oid"])
                    if not staged.is_file():
                        raise HttpError(400, f"LFS object {value['oid']} for {value['path']} was not uploaded")
                    writes.append((store.file_path(repo, value["path"]), staged))
                elif key in ("deletedFile", "deletedFolder"):
                    target = store.file_path(repo, value["path"].rstrip("/"))
                    if not target.exists():
                        raise HttpError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                    deletes.append(target)
                else:
                    raise HttpError(400, f"Unsupported commit operation {key!r}", "BadRequest")
            for target in deletes:
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            for target, content in writes:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{threading.get_ident()}.tmp")
                if isinstance(content, Path):
                    shutil.copyfile(content, tmp)
                else:
                    tmp.write_bytes(content)
                os.replace(tmp, target)
            commit = store.commit_hash(repo)
        self._send_json(
            200,
            {
                "success": True,
                "commitOid": commit,
                "commitUrl": f"{hub.endpoint}/{org}/{name}/commit/{commit}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )


class HubServer:
    """Context manager running the emulated Hub on ``127.0.0.1`` (random free port) in a daemon thread.

    Args:
        root: folder holding the repositories, as ``root/<org>/<name>/<files>``.
        lfs: when ``False``, the preupload endpoint answers "regular" for every file, so that uploads are
            committed inline (base64 in the commit payload) and work even when the client has Xet enabled.

    Attributes:
        endpoint: base URL of the server, e.g. ``http://127.0.0.1:PORT`` (available once entered).
        requests: ``(method, path)`` of every request received (path URL-decoded, without query string).
        auth_headers: every ``Authorization`` header value received, in order.
    """

    def __init__(self, root: Path, *, lfs: bool = True) -> None:
        self.root = Path(root)
        self.lfs = lfs
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str] = []
        self._log_lock = threading.Lock()
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._staging: tempfile.TemporaryDirectory[str] | None = None
        self._repo_store: _RepoStore | None = None

    @property
    def _store(self) -> _RepoStore:
        if self._repo_store is None:
            raise RuntimeError("HubServer is not running: use it as a context manager")
        return self._repo_store

    @property
    def endpoint(self) -> str:
        """Base URL of the running server."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not running: use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _record(self, method: str, path: str, authorization: str | None) -> None:
        with self._log_lock:
            self.requests.append((method, path))
            if authorization is not None:
                self.auth_headers.append(authorization)

    def __enter__(self) -> HubServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self._staging = tempfile.TemporaryDirectory(prefix="hub-server-lfs-")
        self._repo_store = _RepoStore(self.root, Path(self._staging.name))
        self._httpd = _HubHTTPServer(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, close the listening socket and drop staged LFS objects."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._staging is not None:
            self._staging.cleanup()
        self._httpd, self._thread, self._staging, self._repo_store = None, None, None, None


def configure_hub_env(
    monkeypatch: pytest.MonkeyPatch,
    endpoint: str,
    cache_dir: Path,
    offline: bool = False,
    *,
    disable_xet: bool = True,
) -> None:
    """Point ``huggingface_hub`` at ``endpoint`` with a private cache, inside an already running process.

    ``huggingface_hub.constants`` reads its environment variables once, at import time, and the
    library then reads the module attributes (``constants.ENDPOINT``, ``constants.HF_HUB_OFFLINE``...)
    at call time. Setting the environment variables alone is therefore not enough once the library is
    imported: this helper sets both the variables (for subprocesses and late imports) and the
    constants, through ``monkeypatch`` (a pytest ``MonkeyPatch``) so everything is restored after the test.

    Besides the endpoint (``ENDPOINT`` and the derived ``HUGGINGFACE_CO_URL_TEMPLATE``), the cache
    (``HF_HOME``, ``HF_HUB_CACHE``...) and the offline flag, it also disables telemetry (so that no
    request leaves for telemetry or the agent-harness registry), removes tokens from the environment
    (``HF_TOKEN``, and the token file now lives under ``cache_dir``) and, unless ``disable_xet=False``,
    disables Xet (``HF_HUB_DISABLE_XET``) so uploads go through the regular LFS protocol.
    Call it again (e.g. with ``offline=True``) to switch modes within a test.
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.utils._http as hf_http

    endpoint = endpoint.rstrip("/")
    home = Path(cache_dir)
    hub_cache, assets_cache = str(home / "hub"), str(home / "assets")
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HF_XET_CACHE": str(home / "xet"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1" if disable_xet else "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)

    values: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": offline,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HUGGINGFACE_ASSETS_CACHE": assets_cache,
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": disable_xet,
    }
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    # Origins the client trusts with the auth header across redirects (computed at import time).
    origins = getattr(hf_http, "_HUB_ORIGINS", None)
    if origins is not None:
        monkeypatch.setattr(hf_http, "_HUB_ORIGINS", frozenset(origins) | {hf_http._url_origin(endpoint)})
