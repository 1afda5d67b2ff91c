"""A loopback fake of the Hugging Face Hub HTTP API, for tests that drive the real ``huggingface_hub`` client.

Stdlib only. ``LocalHub`` serves, from daemon threads on 127.0.0.1 (free ports), the Hub API at ``hub.url`` and a
"CDN" at ``hub.cdn_url`` standing in for the storage LFS files are PUT to and redirected to: being another origin,
the client does not forward its token there, as with the real Hub. State lives in memory.

Xet: huggingface_hub 2.x picks Xet client-side whenever ``hf_xet`` is importable and ``HF_HUB_DISABLE_XET`` is off,
without asking the server, so the server cannot force the LFS path: clients must disable Xet (``configure_client``
does), and the Xet token endpoints answer 501 saying so. Downloads never use Xet: no ``X-Xet-Hash`` header is sent.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["DEFAULT_TOKEN", "LocalHub", "RecordedRequest", "HubError"]

DEFAULT_TOKEN = "hf_test_token"
USER = "test-user"
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.model",
                "*.npy", "*.npz", "*.pkl", "*.pickle", "*.gguf", "*.tflite", "*.zip", "*.gz", "*.tar", "*.parquet",
                "*.arrow", "*tfevents*")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB in LFS whatever their name
REPO_ACTIONS = {"revision", "tree", "refs", "branch", "preupload", "commit", "paths-info", "commits",
                "xet-read-token", "xet-write-token"}
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
RECORDED_HEADERS = ("authorization", "content-type", "content-length", "range", "transfer-encoding", "user-agent")


def git_blob_sha1(data: bytes) -> str:
    """Git's object id for a blob holding ``data`` (what the Hub reports as the oid/ETag of regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file committed in place of ``data``."""
    return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
        hashlib.sha256(data).hexdigest().encode(), len(data))


def _typed_repo(parts: list[str]) -> tuple[str, str]:
    """``["datasets", "ns", "name"]`` -> ``("dataset", "ns/name")``; no prefix means a model."""
    if parts[0] in ("datasets", "spaces"):
        return parts[0][:-1], "/".join(parts[1:])
    return "model", "/".join(parts)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


class HubError(Exception):
    """An HTTP error answered the way the Hub does: JSON ``{"error": ...}`` plus ``X-Error-*`` headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


@dataclass
class Commit:
    """One commit: the full file set at that point (``lfs`` names the paths stored as LFS)."""
    oid: str
    message: str
    parent: str | None
    files: dict[str, bytes]
    lfs: set[str]
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    """A repository: visibility, commits by oid, and branch name -> head commit oid."""
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    next_pr: int = 1

    def resolve(self, revision: str) -> Commit:
        """The commit a branch name or commit oid points at, or a 404 ``RevisionNotFound``."""
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


@dataclass
class RecordedRequest:
    """What one request carried: ``path`` is percent-decoded, ``json`` the parsed JSON/ndjson body if any."""
    server: str
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    json: Any = None
    status: int = 0


@dataclass
class _Fault:
    status: int
    path_contains: str
    method: str | None
    times: int
    message: str


@dataclass
class _Call:
    method: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None


Response = tuple[int, dict[str, str], Any]  # status, headers, body (bytes, or JSON-able)


class LocalHub:
    """In-memory Hub on loopback. Use as a context manager: ``with LocalHub() as hub: ... hub.url ...``."""

    def __init__(self, token: str = DEFAULT_TOKEN) -> None:
        self.token = token
        self.requests: list[RecordedRequest] = []
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.url = self.cdn_url = ""

    # ----------------------------------------------------------------- lifecycle and test-facing API
    def start(self) -> LocalHub:
        """Bind both servers to free loopback ports and serve them from daemon threads."""
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.hub, server.role = self, role  # type: ignore[attr-defined]
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"LocalHub-{role}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        return self

    def stop(self) -> None:
        """Stop serving and close the sockets (idempotent)."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, status: int = 500, path_contains: str = "", method: str | None = None, times: int = 1,
                  message: str = "Internal Error - We're working hard to fix this as soon as possible!") -> None:
        """Answer the next ``times`` requests whose decoded path contains ``path_contains`` (and whose method is
        ``method``, if given) with ``status`` and ``{"error": message}``, before any other processing.

        Note that the client retries 5xx answers with backoff (1 s, 2 s, ...) on preupload, LFS batch and LFS PUT;
        ``/commit/`` and ``resolve`` HEAD are not retried.
        """
        with self._lock:
            self._faults.append(_Fault(status, path_contains, method.upper() if method else None, times, message))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file (path -> content) at ``revision`` of ``repo_id``; includes the initial ``.gitattributes``."""
        with self._lock:
            return dict(self.repos[repo_id].resolve(revision).files)

    def history(self, repo_id: str, revision: str = "main") -> list[str]:
        """Commit messages reachable from ``revision``, newest first."""
        with self._lock:
            repo, messages = self.repos[repo_id], []
            commit: Commit | None = repo.resolve(revision)
            while commit is not None:
                messages.append(commit.message)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return messages

    def configure_client(self, monkeypatch: Any, token: bool = True) -> None:
        """Point huggingface_hub at this hub, online, with Xet off, through pytest's ``monkeypatch``: the constants
        ENDPOINT / HF_HUB_OFFLINE / HF_HUB_DISABLE_XET and matching env vars, proxies removed. ``token``: set
        ``HF_TOKEN`` to ``self.token``; else unset it and hide any token stored on the machine."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}")
        for name, value in {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_ENDPOINT": self.url}.items():
            monkeypatch.setenv(name, value)
        if token:
            monkeypatch.setenv("HF_TOKEN", self.token)
        else:
            monkeypatch.delenv("HF_TOKEN", raising=False)
            monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
            missing = os.path.join(tempfile.gettempdir(), f"localhub-no-token-{uuid.uuid4().hex}")  # never created
            monkeypatch.setattr(constants, "HF_TOKEN_PATH", os.path.join(missing, "token"))
            monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", os.path.join(missing, "stored_tokens"))
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name, raising=False)

    # ----------------------------------------------------------------- request handling (handler threads)
    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path_contains in path and fault.method in (None, method):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _route(self, role: str, call: _Call) -> Response:
        seg, m = call.segments, call.method
        if role == "cdn":
            if len(seg) == 2 and seg[0] == "lfs":
                return self._cdn(call, seg[1])
            raise HubError(404, "Not found")
        auth = self._auth(call)
        if seg[:1] == ["api"]:
            if seg[1:] == ["repos", "create"] and m == "POST":
                return self._create_repo(call, auth)
            if seg[1:] == ["validate-yaml"] and m == "POST":
                return 200, {}, {"errors": [], "warnings": []}
            if len(seg) >= 3 and seg[1] in ("models", "datasets", "spaces"):
                repo_id, rest = self._split_repo(seg[2:])
                return self._repo_api(call, auth, seg[1][:-1], repo_id, rest)
            raise HubError(404, "Not found")
        if len(seg) >= 5 and seg[-4:-1] == ["info", "lfs", "objects"] and seg[-5].endswith(".git") and m == "POST":
            repo_type, repo_id = _typed_repo([*seg[:-5], seg[-5][: -len(".git")]])
            return self._lfs_api(call, auth, repo_type, repo_id, seg[-1])
        if "resolve" in seg[:4] and m in ("GET", "HEAD"):
            i = seg.index("resolve")
            if len(seg) < i + 3:
                raise HubError(404, "Not found")
            return self._resolve(call, auth, *_typed_repo(seg[:i]), seg[i + 1], "/".join(seg[i + 2:]))
        raise HubError(404, "Not found")

    @staticmethod
    def _split_repo(seg: list[str]) -> tuple[str, list[str]]:
        if len(seg) >= 2 and seg[1] not in REPO_ACTIONS:
            return f"{seg[0]}/{seg[1]}", seg[2:]
        return seg[0], seg[1:]

    def _auth(self, call: _Call) -> bool:
        """Whether the right token came; a wrong one is refused everywhere, as the Hub does."""
        value = call.headers.get("authorization")
        if value is None:
            return False
        if value != f"Bearer {self.token}":
            raise HubError(401, INVALID_CREDENTIALS, headers={"X-Error-Message": INVALID_CREDENTIALS})
        return True

    @staticmethod
    def _require_write(auth: bool) -> None:
        if not auth:
            raise HubError(401, "You must be authenticated to access this resource (Authorization: Bearer <token>)")

    def _repo(self, repo_type: str, repo_id: str, auth: bool, write: bool = False) -> Repo:
        if write:
            self._require_write(auth)
        repo = self.repos.get(repo_id)
        if repo is None or repo.repo_type != repo_type or (repo.private and not auth):
            raise HubError(404 if auth else 401, "Repository not found", "RepoNotFound")
        return repo

    def _create_repo(self, call: _Call, auth: bool) -> Response:
        self._require_write(auth)
        body = call.json()
        name, org, repo_type = body.get("name"), body.get("organization") or USER, body.get("type") or "model"
        if not name:
            raise HubError(400, "Missing repo name")
        repo_id = f"{org}/{name}"
        url = f"{self.url}/{repo_id}" if repo_type == "model" else f"{self.url}/{repo_type}s/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo", url=url)  # the Hub sends url too
            private = body.get("visibility") == "private" or body.get("private") is True
            repo = Repo(repo_id, repo_type, private)
            self._commit(repo, "main", None, "initial commit", {".gitattributes": GITATTRIBUTES}, set())
            self.repos[repo_id] = repo
        return 200, {}, {"url": url, "name": repo_id, "id": repo_id}

    def _repo_api(self, call: _Call, auth: bool, repo_type: str, repo_id: str, rest: list[str]) -> Response:
        action, m = (rest[0] if rest else ""), call.method
        if action.startswith("xet-"):
            raise HubError(501, "LocalHub does not implement Xet storage: set HF_HUB_DISABLE_XET=1 (huggingface_hub "
                                "uploads through Xet whenever hf_xet is installed) so the client uses LFS")
        with self._lock:
            if action in ("", "revision") and m == "GET":
                repo = self._repo(repo_type, repo_id, auth)
                return 200, {}, self._info(repo, repo.resolve(rest[1] if rest else "main"), call.query)
            if action == "tree" and m == "GET" and len(rest) >= 2:
                repo = self._repo(repo_type, repo_id, auth)
                return self._tree(repo.resolve(rest[1]), "/".join(rest[2:]), call.query)
            if action == "refs" and m == "GET":
                repo = self._repo(repo_type, repo_id, auth)
                refs = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
                return 200, {}, {"branches": [r for r in refs if not r["name"].startswith("refs/pr/")], "tags": [],
                                 "converts": [], "pullRequests": [r for r in refs if r["name"].startswith("refs/pr/")]}
            if action == "branch" and len(rest) == 2 and m == "POST":
                repo = self._repo(repo_type, repo_id, auth, write=True)
                if rest[1] in repo.branches:
                    raise HubError(409, f"Reference already exists: refs/heads/{rest[1]}")
                repo.branches[rest[1]] = repo.resolve(call.json().get("startingPoint") or "main").oid
                return 200, {}, {}
            if action == "preupload" and m == "POST" and len(rest) == 2:
                return self._preupload(self._repo(repo_type, repo_id, auth, write=True), rest[1], call)
            if action == "commit" and m == "POST" and len(rest) == 2:
                return self._commit_api(self._repo(repo_type, repo_id, auth, write=True), rest[1], call)
        raise HubError(404, f"Not found: {'/'.join(rest)}")

    def _info(self, repo: Repo, commit: Commit, query: dict[str, list[str]]) -> dict[str, Any]:
        blobs = query.get("blobs", [""])[0].lower() in ("1", "true")
        siblings = [{"rfilename": p, **(self._entry(commit, p, sibling=True) if blobs else {})}
                    for p in sorted(commit.files)]
        return {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.oid,
                "lastModified": _iso(commit.date), "createdAt": _iso(repo.created), "private": repo.private,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(len(b) for b in commit.files.values())}

    @staticmethod
    def _entry(commit: Commit, path: str, sibling: bool = False) -> dict[str, Any]:
        data = commit.files[path]
        if path in commit.lfs:
            pointer = lfs_pointer(data)
            lfs = {"oid" if not sibling else "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                   "pointerSize": len(pointer)}
            oid = git_blob_sha1(pointer)
        else:
            lfs, oid = None, git_blob_sha1(data)
        if sibling:
            return {"size": len(data), "blobId": oid, **({"lfs": lfs} if lfs else {})}
        return {"type": "file", "oid": oid, "size": len(data), "path": path, **({"lfs": lfs} if lfs else {})}

    def _tree(self, commit: Commit, prefix: str, query: dict[str, list[str]]) -> Response:
        recursive = query.get("recursive", [""])[0].lower() in ("1", "true")
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        under = [p for p in sorted(commit.files) if p.startswith(base)]
        if prefix and not under:
            raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
        folders: set[str] = set()
        files: list[dict[str, Any]] = []
        for path in under:
            parts = path[len(base):].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):
                folders.add(base + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                files.append(self._entry(commit, path))
        dirs = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                for d in sorted(folders)]
        return 200, {}, dirs + files

    def _preupload(self, repo: Repo, revision: str, call: _Call) -> Response:
        commit = repo.resolve(revision)
        answers = []
        for f in call.json().get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = (any(fnmatch.fnmatch(f["path"].rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
                   or f.get("size", 0) >= LFS_THRESHOLD or b"\0" in sample)
            old = commit.files.get(f["path"])
            oid = None if old is None else hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old)
            answers.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
        return 200, {}, {"files": answers, "commitOid": commit.oid}

    def _lfs_api(self, call: _Call, auth: bool, repo_type: str, repo_id: str, action: str) -> Response:
        with self._lock:
            self._repo(repo_type, repo_id, auth, write=True)
            body = call.json()
            if action == "verify":
                if body.get("oid") not in self.lfs_store:
                    raise HubError(404, f"LFS object {body.get('oid')} not found")
                return 200, {}, {"success": True}
            if action != "batch" or body.get("operation") != "upload":
                raise HubError(400, "Only the LFS batch 'upload' operation is supported")
            objects, prefix = [], "" if repo_type == "model" else f"{repo_type}s/"
            for obj in body.get("objects", []):
                oid, size = obj["oid"], obj["size"]
                entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if oid not in self.lfs_store or len(self.lfs_store[oid]) != size:
                    entry["actions"] = {"upload": {"href": f"{self.cdn_url}/lfs/{oid}?size={size}"},
                                        "verify": {"href": f"{self.url}/{prefix}{repo_id}.git/info/lfs/objects/verify"}}
                objects.append(entry)
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, {"transfer": "basic", "objects": objects}

    def _cdn(self, call: _Call, oid: str) -> Response:
        if call.method == "PUT":
            if hashlib.sha256(call.body).hexdigest() != oid:
                raise HubError(400, f"Uploaded content does not match sha256 {oid}")
            with self._lock:
                self.lfs_store[oid] = call.body
            return 200, {"ETag": f'"{oid}"'}, b""
        if call.method in ("GET", "HEAD") and oid in self.lfs_store:
            return _content(call, self.lfs_store[oid], {"ETag": f'"{oid}"'})
        raise HubError(404, "Not found")

    def _commit_api(self, repo: Repo, revision: str, call: _Call) -> Response:
        try:
            lines = [json.loads(line) for line in call.body.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Commit payload is not valid ndjson") from None
        header = next((item["value"] for item in lines if item.get("key") == "header"), None)
        if not header or not header.get("summary"):
            raise HubError(400, "Commit header with a summary is required")
        base = repo.resolve(revision)
        if "parentCommit" in header and header["parentCommit"] != base.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        pr = call.query.get("create_pr", [""])[0] in ("1", "true")
        if not pr and revision not in repo.branches:
            raise HubError(400 if revision in repo.commits else 404, f"Cannot commit to {revision}: not a branch",
                           None if revision in repo.commits else "RevisionNotFound")
        files, lfs = dict(base.files), set(base.lfs)
        for item in lines:
            key, value = item.get("key"), item.get("value", {})
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_store:
                    raise HubError(400, f"LFS file {value['path']} ({value['oid']}) was never uploaded")
                files[value["path"]] = self.lfs_store[value["oid"]]
                lfs.add(value["path"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                for path in [p for p in files if p.startswith(value["path"].rstrip("/") + "/")]:
                    del files[path]
            elif key != "header":
                raise HubError(400, f"Unsupported commit operation {key!r}")
        branch, pr_url = revision, None
        if pr:
            branch = f"refs/pr/{repo.next_pr}"
            pr_url = f"{self.url}/{repo.repo_id}/discussions/{repo.next_pr}"
            repo.next_pr += 1
        commit = self._commit(repo, branch, base.oid, header["summary"], files, lfs & set(files))
        return 200, {}, {"success": True, "commitOid": commit.oid, "commitMessage": commit.message,
                         "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}", "hookOutput": "",
                         "pullRequestUrl": pr_url}

    @staticmethod
    def _commit(repo: Repo, branch: str, parent: str | None, message: str, files: dict[str, bytes],
                lfs: set[str]) -> Commit:
        digest = hashlib.sha1(json.dumps([parent, message, time.time_ns(), sorted(
            (p, hashlib.sha256(b).hexdigest()) for p, b in files.items())]).encode()).hexdigest()
        commit = Commit(digest, message, parent, files, lfs)
        repo.commits[digest] = commit
        repo.branches[branch] = digest
        return commit

    def _resolve(self, call: _Call, auth: bool, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
        with self._lock:
            repo = self._repo(repo_type, repo_id, auth)
            commit = repo.resolve(revision)
            headers = {"X-Repo-Commit": commit.oid}
            if path not in commit.files:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
            data = commit.files[path]
        if path in commit.lfs:
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"Location": f"{self.cdn_url}/lfs/{sha}", "ETag": f'"{git_blob_sha1(lfs_pointer(data))}"',
                            "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
            return 302, headers, b""
        return _content(call, data, {**headers, "ETag": f'"{git_blob_sha1(data)}"'})


def _content(call: _Call, data: bytes, headers: dict[str, str]) -> Response:
    """Serve ``data`` whole, or the single ``bytes=a-b`` range asked for (206)."""
    headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    spec = call.headers.get("range", "")
    if spec.startswith("bytes=") and "," not in spec:
        start_s, _, end_s = spec[len("bytes="):].partition("-")
        start = int(start_s) if start_s else max(len(data) - int(end_s or 0), 0)
        end = min(int(end_s), len(data) - 1) if start_s and end_s else len(data) - 1
        if start >= len(data):
            return 416, {"Content-Range": f"bytes */{len(data)}"}, b""
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return 206, headers, data[start:end + 1]
    return 200, headers, data


class _Handler(BaseHTTPRequestHandler):
    """Parses one request, records it, applies faults, and hands it to ``LocalHub._route``."""

    timeout = 30  # seconds a socket read may block: keeps every request loop bounded
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024).strip():
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        hub: LocalHub = self.server.hub  # type: ignore[attr-defined]
        role: str = self.server.role  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        body = self._read_body()
        record = RecordedRequest(role, self.command, unquote(split.path), parse_qs(split.query),
                                 {k: v for k, v in headers.items() if k in RECORDED_HEADERS})
        if body and len(body) < 1_000_000 and "json" in headers.get("content-type", ""):
            try:
                text = body.decode()
                record.json = [json.loads(x) for x in text.splitlines() if x.strip()] if "ndjson" in \
                    headers["content-type"] else json.loads(text)
            except ValueError:
                pass
        hub.requests.append(record)
        call = _Call(self.command, [unquote(s) for s in split.path.split("/") if s], parse_qs(split.query),
                     headers, body)
        try:
            fault = hub._take_fault(self.command, record.path)
            if fault is not None:
                raise HubError(fault.status, fault.message, headers={"X-Error-Message": fault.message})
            status, out_headers, payload = hub._route(role, call)
        except HubError as err:
            status, payload = err.status, {"error": err.message, **err.extra}
            out_headers = {**err.headers, **({"X-Error-Code": err.code} if err.code else {})}
        except Exception as err:  # a bug in the fake: surface it to the client as a 500 with the reason
            status, out_headers, payload = 500, {}, {"error": f"LocalHub internal error: {err!r}"}
        record.status = status
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
            out_headers.setdefault("Content-Type", "application/json; charset=utf-8")
        self.send_response(status)
        for name, value in out_headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
