"""tests/hub_server.py's LocalHub serves the real huggingface_hub client end to end, on loopback only."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from .hub_server import LocalHub

REPO = "test-user/tiny-moe"
# huggingface_hub's LFS PUT passes a file object as ``data=``, which httpx2 deprecates: the client's business.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    """A running LocalHub; the client is online, Xet-free and pointed at it (tokens are passed explicitly)."""
    with LocalHub() as server:
        server.configure_client(monkeypatch, token=False)
        yield server


def make_folder(folder: Path, seed: int, config: str = '{"model_type": "llama"}') -> dict[str, bytes]:
    """A model-like folder: a ~2 MB safetensors file (LFS) and small json files (regular), one in a subfolder."""
    files = {
        "model.safetensors": random.Random(seed).randbytes(2 * 1024 * 1024 + 17),
        "config.json": config.encode(),
        "tokenizer/tokenizer_config.json": b'{"model_max_length": 64}',
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def read_tree(folder: str | Path) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_private_upload_then_snapshot_download_roundtrip(hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(REPO, private=True, exist_ok=True)
    api.create_repo(REPO, private=True, exist_ok=True)  # exists: 409 swallowed by the client
    create = [r for r in hub.requests if r.path == "/api/repos/create"]
    assert create[0].json == {"name": "tiny-moe", "organization": "test-user", "visibility": "private"}
    assert hub.repos[REPO].private

    files = make_folder(tmp_path / "up", seed=0)
    commit = api.upload_folder(folder_path=tmp_path / "up", repo_id=REPO, commit_message="first", create_pr=False)
    assert commit.oid == hub.repos[REPO].branches["main"]
    assert hub.files(REPO) == {**files, ".gitattributes": hub.files(REPO)[".gitattributes"]}
    assert hub.history(REPO) == ["first", "initial commit"]
    assert REPO in hub.repos and hub.repos[REPO].commits[commit.oid].lfs == {"model.safetensors"}

    # The safetensors file went through LFS: batch on the Hub, PUT to the "CDN" without the token.
    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert any(r.path.endswith(".git/info/lfs/objects/batch") for r in hub.requests)
    puts = [r for r in hub.requests if r.server == "cdn" and r.method == "PUT"]
    assert [r.path for r in puts] == [f"/lfs/{sha}"] and "authorization" not in puts[0].headers
    assert not any("xet" in r.path for r in hub.requests)

    folder = snapshot_download(REPO, cache_dir=tmp_path / "cache", endpoint=hub.url, token=hub.token)
    assert Path(folder).name == commit.oid
    downloaded = read_tree(folder)
    assert downloaded.pop(".gitattributes").startswith(b"*.safetensors filter=lfs")
    assert downloaded == files
    # The LFS file was redirected to the CDN and fetched there without the token.
    cdn_gets = [r for r in hub.requests if r.server == "cdn" and r.method == "GET"]
    assert [r.path for r in cdn_gets] == [f"/lfs/{sha}"] and "authorization" not in cdn_gets[0].headers

    info = api.model_info(REPO)
    assert info.private and info.sha == commit.oid
    assert sorted(api.list_repo_files(REPO)) == sorted([*files, ".gitattributes"])
    assert api.repo_exists(REPO) and not api.repo_exists("test-user/nope")
    assert api.file_exists(REPO, "tokenizer/tokenizer_config.json") and not api.file_exists(REPO, "nope.json")
    path = hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "cache2", endpoint=hub.url, token=hub.token)
    assert Path(path).read_bytes() == files["config.json"]

    # Private: without a token the repo does not exist for the client.
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(REPO, cache_dir=tmp_path / "cache3", endpoint=hub.url, token=False)


def test_second_upload_makes_a_new_commit_that_replaces_files(hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(REPO, private=False, exist_ok=True)
    assert not hub.repos[REPO].private
    make_folder(tmp_path / "v1", seed=1)
    first = api.upload_folder(folder_path=tmp_path / "v1", repo_id=REPO, commit_message="v1")
    snapshot_download(REPO, cache_dir=tmp_path / "cache", endpoint=hub.url, token=hub.token)

    v2 = make_folder(tmp_path / "v2", seed=2, config='{"model_type": "llama", "v": 2}')
    second = api.upload_folder(folder_path=tmp_path / "v2", repo_id=REPO, commit_message="v2")
    assert second.oid != first.oid and hub.history(REPO)[:2] == ["v2", "v1"]
    assert {k: v for k, v in hub.files(REPO).items() if k != ".gitattributes"} == v2
    # The same cache picks up the new main; a fresh one too; the old commit stays downloadable.
    for cache in ("cache", "fresh"):
        folder = snapshot_download(REPO, cache_dir=tmp_path / cache, endpoint=hub.url, token=hub.token)
        assert Path(folder).name == second.oid
        assert {k: v for k, v in read_tree(folder).items() if k != ".gitattributes"} == v2
    old = snapshot_download(REPO, revision=first.oid, cache_dir=tmp_path / "old", endpoint=hub.url, token=hub.token)
    assert read_tree(old)["config.json"] == b'{"model_type": "llama"}'


def test_upload_to_branch_and_download_that_revision(hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(REPO, private=True, exist_ok=True)
    api.create_branch(REPO, branch="dev")
    files = make_folder(tmp_path / "up", seed=3)
    commit = api.upload_folder(folder_path=tmp_path / "up", repo_id=REPO, revision="dev", commit_message="on dev")
    assert any(r.method == "POST" and r.path == f"/api/models/{REPO}/commit/dev" for r in hub.requests)
    assert any(r.path == f"/api/models/{REPO}/preupload/dev" for r in hub.requests)
    assert list(hub.files(REPO, "main")) == [".gitattributes"]
    assert hub.history(REPO, "dev") == ["on dev", "initial commit"]

    folder = snapshot_download(REPO, revision="dev", cache_dir=tmp_path / "cache", endpoint=hub.url, token=hub.token)
    assert Path(folder).name == commit.oid
    assert {k: v for k, v in read_tree(folder).items() if k != ".gitattributes"} == files
    assert (tmp_path / "cache" / "models--test-user--tiny-moe" / "refs" / "dev").read_text() == commit.oid
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main", "dev"]
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="nope", cache_dir=tmp_path / "cache", endpoint=hub.url, token=hub.token)


def test_pull_request_commit(hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(REPO, exist_ok=True)
    make_folder(tmp_path / "up", seed=4)
    commit = api.upload_folder(folder_path=tmp_path / "up", repo_id=REPO, commit_message="pr", create_pr=True)
    assert commit.pr_url == f"{hub.url}/{REPO}/discussions/1" and commit.pr_revision == "refs/pr/1"
    assert hub.history(REPO, "refs/pr/1")[0] == "pr" and list(hub.files(REPO)) == [".gitattributes"]
    folder = snapshot_download(REPO, revision="refs/pr/1", cache_dir=tmp_path / "c", endpoint=hub.url, token=hub.token)
    assert "model.safetensors" in read_tree(folder)


def test_wrong_or_missing_token_is_refused_with_401(hub: LocalHub, tmp_path: Path) -> None:
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token="hf_wrong").create_repo(REPO, private=True, exist_ok=True)
    assert err.value.response.status_code == 401
    assert "Invalid credentials" in str(err.value)
    assert REPO not in hub.repos
    assert all(r.status == 401 for r in hub.requests)

    HfApi(endpoint=hub.url, token=hub.token).create_repo(REPO, exist_ok=True)
    make_folder(tmp_path / "up", seed=5)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token=False).upload_folder(folder_path=tmp_path / "up", repo_id=REPO)
    assert err.value.response.status_code == 401
    assert hub.history(REPO) == ["initial commit"]


def test_injected_500_on_commit_raises_and_changes_nothing(hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(REPO, exist_ok=True)
    make_folder(tmp_path / "up", seed=6)
    hub.fail_next(status=500, path_contains="/commit/", message="commit backend is down")
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(folder_path=tmp_path / "up", repo_id=REPO, commit_message="boom")
    assert err.value.response.status_code == 500 and "commit backend is down" in str(err.value)
    assert hub.history(REPO) == ["initial commit"]
    # The fault was used up: the same upload now goes through (the LFS object is already stored).
    api.upload_folder(folder_path=tmp_path / "up", repo_id=REPO, commit_message="retry")
    assert hub.history(REPO) == ["retry", "initial commit"]


def test_server_stops_cleanly() -> None:
    hub = LocalHub().start()
    url = hub.url
    hub.stop()
    hub.stop()
    import socket

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1).close()


def test_configured_client_needs_no_endpoint_or_token_arguments(hub: LocalHub, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """``configure_client`` makes plain ``HfApi()`` / ``snapshot_download(repo)`` talk to the LocalHub."""
    hub.configure_client(monkeypatch)  # now with HF_TOKEN
    api = HfApi()
    api.create_repo(REPO, private=True, exist_ok=True)
    api.create_branch(REPO, branch="v1", exist_ok=True)
    api.create_branch(REPO, branch="v1", exist_ok=True)  # 409 swallowed
    files = make_folder(tmp_path / "up", seed=7)
    (tmp_path / "up" / ".hidden").write_text("not uploaded")
    api.upload_folder(folder_path=str(tmp_path / "up"), repo_id=REPO, revision="v1", ignore_patterns=[".*"],
                      commit_message="release")
    folder = snapshot_download(REPO, revision="v1", cache_dir=tmp_path / "cache", allow_patterns=["*.json"])
    assert read_tree(folder) == {k: v for k, v in files.items() if k.endswith(".json")}
    assert all(r.headers.get("authorization") == f"Bearer {hub.token}" for r in hub.requests if r.server == "hub")


def test_a_xet_client_fails_fast_with_the_reason(hub: LocalHub, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """huggingface_hub uploads through Xet whenever hf_xet is importable; LocalHub refuses that quickly."""
    pytest.importorskip("hf_xet")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", False)
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(REPO)
    make_folder(tmp_path / "up", seed=8)
    with pytest.raises(Exception, match="501"):
        api.upload_folder(folder_path=tmp_path / "up", repo_id=REPO)
    assert [r.status for r in hub.requests if "/xet-write-token/" in r.path][:1] == [501]
    assert hub.history(REPO) == ["initial commit"]
