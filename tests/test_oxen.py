"""fluxlora.oxen: remote logic against a fake adapter, local Oxen repositories for real."""
from __future__ import annotations

import ast
import hashlib
import inspect
import logging
import re
import tomllib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from unittest import mock

import oxen
import pytest

from fluxlora import oxen as fo
from fluxlora.config import ConfigError

TOKEN = "sk-oxen-0123456789abcdef"
NOW = datetime(2026, 11, 27, 9, 30, 5)


@pytest.fixture(autouse=True)
def oxen_config(tmp_path, monkeypatch):
    """A private Oxen config folder with a user, so no test reads or writes ~/.config/oxen."""
    config_dir = tmp_path / "oxen-config"
    config_dir.mkdir()
    monkeypatch.setenv("OXEN_CONFIG_DIR", str(config_dir))
    monkeypatch.delenv("OXEN_API_KEY", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    oxen.user.config_user("Test User", "test@example.com")
    return config_dir


# ----------------------------------------------------------------------------------------------
# A fake Oxen server and adapter.


class FakeServer:
    """Branches of commits (id, message, {path: bytes}, parent id), plus call records and faults."""

    def __init__(self, files: dict[str, bytes] | None = None):
        self.commits: dict[str, tuple[str, dict[str, bytes], str | None]] = {}
        self.branches: dict[str, str] = {}
        self.calls: list[tuple] = []
        self.faults: dict[str, list[BaseException]] = {}
        self.fail_download_after: int | None = None  # raise once this many files are written
        if files is not None:
            self.branches["main"] = self.new_commit("initial", dict(files), None)

    def new_commit(self, message: str, files: dict[str, bytes], parent: str | None) -> str:
        commit_id = hashlib.sha1(f"{message}{len(self.commits)}".encode()).hexdigest()[:32]
        self.commits[commit_id] = (message, files, parent)
        return commit_id

    def push(self, branch: str, files: dict[str, bytes], message: str = "update") -> str:
        """Commit a new state of `branch` (as another client would)."""
        self.branches[branch] = self.new_commit(message, files, self.branches.get(branch))
        return self.branches[branch]

    def resolve(self, revision: str) -> str:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        raise ValueError(f"{revision} is not a valid branch name or commit id")

    def files_at(self, revision: str) -> dict[str, bytes]:
        return self.commits[self.resolve(revision)][1]

    def history(self, revision: str) -> list[str]:
        out, commit = [], self.resolve(revision)
        while commit is not None:
            out.append(commit)
            commit = self.commits[commit][2]
        return out

    def maybe_fail(self, method: str) -> None:
        queue = self.faults.get(method)
        if queue:
            raise queue.pop(0)

    def count(self, method: str) -> int:
        return sum(1 for call in self.calls if call[0] == method)


def fake_remote_class(server: FakeServer) -> type:
    """An adapter class bound to `server` (the bound class keeps the real constructor's signature)."""

    class FakeRemote(FakeRemoteBase):
        SERVER = server

    return FakeRemote


class FakeRemoteBase:
    """Behaves like OxenRemote over a FakeServer, including oxen's download placement rules."""

    SERVER: FakeServer

    def __init__(self, repo_id: str, host: str = "hub.oxen.ai", revision: str = "main",
                 scheme: str = "https"):
        self.server = self.SERVER
        self.server.calls.append(("init", repo_id, host, revision, scheme))
        self.server.maybe_fail("init")
        self.revision = revision
        self.commit_id = self.server.resolve(revision)
        self.workspace: dict[str, bytes] | None = None
        self.workspace_branch: str | None = None

    def log(self, revision: str | None = None, path: str | None = None, page_num: int = 1,
            page_size: int = 10) -> list[str]:
        self.server.calls.append(("log", revision))
        self.server.maybe_fail("log")
        history = self.server.history(revision or self.revision)
        return history[(page_num - 1) * page_size: page_num * page_size]

    def scan(self, directory: str | None = None, page_size: int = 100) -> Iterator[fo.RemoteEntry]:
        self.server.calls.append(("scan", directory))
        prefix = f"{directory}/" if directory else ""
        seen: dict[str, bool] = {}
        for path in self.server.files_at(self.revision):
            if path.startswith(prefix):
                head, _, rest = path[len(prefix):].partition("/")
                seen[head] = seen.get(head, False) or bool(rest)
        for name, is_dir in seen.items():
            yield fo.RemoteEntry(name=name, is_dir=is_dir)

    def download(self, src: str, dst: str | None = None, revision: str | None = None) -> None:
        self.server.calls.append(("download", src, dst, revision))
        self.server.maybe_fail("download")
        files = self.server.files_at(revision or self.revision)
        dst_path = Path(dst if dst is not None else src)
        if src in files:  # a file: at dst, or dst/<name> when dst is a folder; parent must exist
            target = dst_path / Path(src).name if dst_path.is_dir() else dst_path
            if not target.parent.is_dir():
                raise ValueError(f"{target.parent} does not exist")
            self._write(target, files[src])
            return
        inside = {p: b for p, b in files.items() if p.startswith(src + "/")}
        if not inside:
            raise ValueError(f"Path does not exist: {src}")
        for path, data in sorted(inside.items()):  # a folder: at dst/<its path>
            (dst_path / path).parent.mkdir(parents=True, exist_ok=True)
            self._write(dst_path / path, data)

    def _write(self, target: Path, data: bytes) -> None:
        if self.server.fail_download_after is not None:
            if self.server.fail_download_after == 0:
                raise ValueError("connection reset by peer")
            self.server.fail_download_after -= 1
        target.write_bytes(data)

    def branches(self) -> list[str]:
        self.server.calls.append(("branches",))
        self.server.maybe_fail("branches")
        return list(self.server.branches)

    def branch_exists(self, name: str) -> bool:
        self.server.calls.append(("branch_exists", name))
        self.server.maybe_fail("branch_exists")
        return name in self.server.branches

    def create_branch(self, branch: str) -> None:
        self.server.calls.append(("create_branch", branch))
        self.server.maybe_fail("create_branch")
        assert branch not in self.server.branches, "creating a branch that exists"
        self.server.branches[branch] = self.commit_id

    def add(self, src: str, dst: str | None = "", branch: str | None = None,
            workspace_name: str | None = None) -> None:
        self.server.calls.append(("add", src, dst, branch))
        self.server.maybe_fail("add")
        branch = branch or self.revision
        if self.workspace is None:
            self.workspace, self.workspace_branch = {}, branch
        assert self.workspace_branch == branch, "a different workspace is already open"
        self.workspace[f"{dst}/{Path(src).name}" if dst else Path(src).name] = Path(src).read_bytes()

    def commit(self, message: str, branch: str | None = None) -> str:
        self.server.calls.append(("commit", message, branch))
        self.server.maybe_fail("commit")
        if self.workspace is None:
            raise ValueError("No workspace found. Please call add() first.")
        target = branch or self.workspace_branch
        files = dict(self.server.files_at(target))
        if all(files.get(p) == b for p, b in self.workspace.items()):
            raise ValueError("No changes to commit")
        files.update(self.workspace)
        self.workspace = None
        return self.server.push(target, files, message)

    def delete_workspace(self) -> None:
        self.server.calls.append(("delete_workspace",))
        self.workspace = None


ADAPTED = ("__init__", "log", "scan", "download", "branches", "branch_exists", "create_branch",
           "add", "commit", "delete_workspace")


def _params(func) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


@pytest.mark.parametrize("cls", [fo.OxenRemote, FakeRemoteBase], ids=["adapter", "fake"])
def test_adapter_and_fake_match_the_real_remote_repo(cls):
    public = {name for name, _ in inspect.getmembers(fo.OxenRemote, inspect.isfunction)
              if not name.startswith("_")}
    assert public == set(ADAPTED) - {"__init__"}, "a new adapter method needs checking here"
    for name in ADAPTED:
        assert _params(getattr(cls, name)) == _params(getattr(oxen.RemoteRepo, name)), name


def test_adapter_calls_the_real_remote_repo_as_it_is_declared(monkeypatch):
    """create_autospec makes every call fail unless it fits oxen.RemoteRepo's real signatures."""
    spec = mock.create_autospec(oxen.RemoteRepo)
    repo = spec.return_value
    repo.log.return_value = [mock.Mock(id="c2"), mock.Mock(id="c1")]
    entry = mock.Mock(is_dir=True)
    entry.filename = "images"
    repo.scan.return_value = iter([entry])
    repo.branches.return_value = [mock.Mock(), mock.Mock()]
    repo.branches.return_value[0].name = "main"
    repo.branches.return_value[1].name = "run-1"
    repo.branch_exists.return_value = False
    repo.commit.return_value = mock.Mock(id="c3")
    monkeypatch.setattr(fo.oxen, "RemoteRepo", spec)

    remote = fo.OxenRemote("me/data", host="localhost:3000", revision="dev", scheme="http")
    spec.assert_called_once_with("me/data", host="localhost:3000", revision="dev", scheme="http")
    assert remote.log(revision="dev", page_size=1) == ["c2", "c1"]
    assert list(remote.scan(None)) == [fo.RemoteEntry("images", True)]
    assert remote.branches() == ["main", "run-1"]
    assert remote.branch_exists("x") is False
    remote.download("images", "/tmp/x", revision="c2")
    repo.download.assert_called_once_with("images", dst="/tmp/x", revision="c2")
    remote.add("/tmp/a.png", dst="samples", branch="run-1")
    repo.add.assert_called_once_with("/tmp/a.png", dst="samples", branch="run-1", workspace_name=None)
    assert remote.commit("msg", branch="run-1") == "c3"
    remote.create_branch("run-2")
    repo.create_branch.assert_called_once_with("run-2")


# ----------------------------------------------------------------------------------------------
# parse_oxen_uri, hosts, branch names.


@pytest.mark.parametrize("uri, expected", [
    ("oxen:ox/flux-data", ("ox/flux-data", None)),
    ("oxen:ox/flux_data.v2@main", ("ox/flux_data.v2", "main")),
    ("oxen:me/data@feature/x", ("me/data", "feature/x")),
    ("oxen:me/data@6b3e2a0c9d1f4e5a8b7c6d5e4f3a2b1c", ("me/data", "6b3e2a0c9d1f4e5a8b7c6d5e4f3a2b1c")),
])
def test_parse_oxen_uri(uri, expected):
    assert fo.parse_oxen_uri(uri) == expected


@pytest.mark.parametrize("uri", ["ox/data", "oxen:data", "oxen:a/b/c", "oxen:/b", "oxen:a/b@",
                                 "oxen:a b/c", "hf:ox/data"])
def test_parse_oxen_uri_rejects_malformed(uri):
    with pytest.raises(ConfigError, match="--dataset"):
        fo.parse_oxen_uri(uri)


def test_resolve_host(oxen_config):
    assert fo.resolve_host(None) == ("hub.oxen.ai", "https")
    assert fo.resolve_host("http://localhost:3000/") == ("localhost:3000", "http")
    assert fo.resolve_host("oxen.example.com") == ("oxen.example.com", "https")
    (oxen_config / "auth_config.toml").write_text('default_host = "oxen.internal:3001"\n')
    assert fo.resolve_host(None) == ("oxen.internal:3001", "https")


@pytest.mark.parametrize("run_name", ["flux-lora-20261127-093005", "My Run: v2 (final)!", "a/b/../c",
                                      ".hidden.lock", "", "  ", "ünïcødé ✨", "x" * 300, "-leading",
                                      "trailing.", "a@{b}", "tab\there"])
def test_new_branch_name_is_valid(run_name):
    name = fo.new_branch_name(run_name, [], now=NOW)
    assert fo.is_valid_branch_name(name), name
    assert name.endswith("20261127-093005")
    assert re.fullmatch(r"[a-z0-9._-]+", name) and "/" not in name


def test_new_branch_name_keeps_the_run_name():
    assert fo.new_branch_name("My Run", ["main"], now=NOW) == "my-run-20261127-093005"


def test_new_branch_name_never_collides():
    existing = {"main", "My-Run-20261127-093005"}  # the same name in other case counts
    names = []
    for _ in range(30):
        name = fo.new_branch_name("my run", existing, now=NOW)
        assert name.lower() not in {e.lower() for e in existing}
        existing.add(name)
        names.append(name)
    assert len(set(names)) == 30
    assert names[0] == "my-run-20261127-093005-2"


@pytest.mark.parametrize("name, valid", [("main", True), ("runs/flux-1", True), ("a..b", False),
                                         ("a b", False), (".x", False), ("x.lock", False),
                                         ("a/.b", False), ("x.", False), ("-x", False),
                                         ("a~b", False), ("a@{1}", False), ("", False)])
def test_is_valid_branch_name(name, valid):
    assert fo.is_valid_branch_name(name) is valid


# ----------------------------------------------------------------------------------------------
# fetch_dataset.

DATA = {"metadata.jsonl": b'{"file_name": "images/a.png", "text": "a cat"}\n',
        "images/a.png": b"png-a", "images/sub/b.png": b"png-b", "README.md": b"# data"}


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _fetch(server, cache, **kw):
    return fo.fetch_dataset("me/data", cache_root=cache, remote_factory=fake_remote_class(server), **kw)


def test_fetch_dataset_downloads_once_and_reuses_the_same_commit(tmp_path):
    server = FakeServer(DATA)
    folder = _fetch(server, tmp_path / "cache")
    assert folder == tmp_path / "cache" / "me" / "data" / "main"
    assert _tree(folder) == DATA
    downloads = server.count("download")
    # Pinned to the commit the marker records, not to the moving branch name.
    assert {call[3] for call in server.calls if call[0] == "download"} == {server.branches["main"]}

    again = _fetch(server, tmp_path / "cache")
    assert again == folder and _tree(again) == DATA
    assert server.count("download") == downloads
    assert server.count("log") == 2  # the commit id is checked every time


def test_fetch_dataset_downloads_again_for_a_new_commit(tmp_path):
    server = FakeServer(DATA)
    folder = _fetch(server, tmp_path)
    newer = {"metadata.jsonl": b"{}\n", "images/a.png": b"png-a2"}  # images/sub/b.png removed
    server.push("main", newer)
    downloads = server.count("download")
    assert _fetch(server, tmp_path) == folder
    assert server.count("download") > downloads
    assert _tree(folder) == newer  # nothing of the old copy lingers
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".main.")] \
        == [".main" + fo._MARKER_SUFFIX]


def test_interrupted_download_is_never_reused(tmp_path):
    server = FakeServer(DATA)
    server.fail_download_after = 2
    with pytest.raises(fo.OxenError, match="connection reset"):
        _fetch(server, tmp_path)
    repo_dir = tmp_path / "me" / "data"
    assert list(repo_dir.iterdir()) == []  # no folder, no marker, no partial copy

    server.fail_download_after = None
    folder = _fetch(server, tmp_path)
    assert _tree(folder) == DATA


def test_interrupted_update_keeps_no_stale_marker(tmp_path):
    server = FakeServer(DATA)
    folder = _fetch(server, tmp_path)
    server.push("main", {"images/a.png": b"new"})
    server.fail_download_after = 0
    with pytest.raises(fo.OxenError):
        _fetch(server, tmp_path)
    server.fail_download_after = None
    downloads = server.count("download")
    assert _tree(_fetch(server, tmp_path)) == {"images/a.png": b"new"}
    assert server.count("download") > downloads
    assert folder.is_dir()


def test_crash_after_the_swap_never_pairs_new_files_with_the_old_marker(tmp_path, monkeypatch):
    server = FakeServer(DATA)
    folder = _fetch(server, tmp_path)
    first = server.branches["main"]
    server.push("main", {"images/a.png": b"new"})
    with monkeypatch.context() as patch:  # the process dies before it records the new commit
        patch.setattr(fo, "_write_json_atomic", mock.Mock(side_effect=KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            _fetch(server, tmp_path)
    server.branches["main"] = first  # the branch is reset to the commit the old marker named
    assert _tree(_fetch(server, tmp_path)) == DATA
    assert folder.is_dir()


def test_leftover_partial_from_a_killed_process_is_not_used(tmp_path):
    server = FakeServer(DATA)
    repo_dir = tmp_path / "me" / "data"
    leftover = repo_dir / ".main.partial-killed"
    leftover.mkdir(parents=True)
    (leftover / "images").mkdir()
    folder = _fetch(server, tmp_path)
    assert _tree(folder) == DATA
    assert not leftover.exists()


def test_fetch_dataset_paths_and_revision(tmp_path):
    server = FakeServer(DATA)
    server.push("dev", {**DATA, "extra.csv": b"a,b\n"})
    folder = _fetch(server, tmp_path, revision="dev", paths=["images/sub/b.png", "metadata.jsonl"])
    assert folder.name == "dev"
    assert _tree(folder) == {"images/sub/b.png": b"png-b", "metadata.jsonl": DATA["metadata.jsonl"]}

    # Other paths of the same revision: not the cached selection.
    _fetch(server, tmp_path, revision="dev", paths=["images"])
    assert _tree(folder) == {"images/a.png": b"png-a", "images/sub/b.png": b"png-b"}


def test_fetch_dataset_accepts_a_uri_and_a_commit_id(tmp_path):
    server = FakeServer(DATA)
    first = server.branches["main"]
    server.push("main", {"new.txt": b"x"})
    folder = fo.fetch_dataset(f"oxen:me/data@{first}", cache_root=tmp_path,
                              remote_factory=fake_remote_class(server))
    assert folder.name == first and _tree(folder) == DATA
    with pytest.raises(ConfigError, match="--oxen_revision"):
        fo.fetch_dataset("me/data@dev", revision="main", cache_root=tmp_path,
                         remote_factory=fake_remote_class(server))


def test_fetch_dataset_branch_with_slash_gets_its_own_folder(tmp_path):
    server = FakeServer(DATA)
    server.push("feature/x", {"a.txt": b"1"})
    server.push("feature_x", {"b.txt": b"2"})
    one = _fetch(server, tmp_path, revision="feature/x")
    two = _fetch(server, tmp_path, revision="feature_x")
    assert one != two and one.parent == two.parent == tmp_path / "me" / "data"
    assert _tree(one) == {"a.txt": b"1"} and _tree(two) == {"b.txt": b"2"}


def test_fetch_dataset_missing_path_is_named(tmp_path):
    with pytest.raises(fo.OxenError, match="train.parquet is not in oxen:me/data@main"):
        _fetch(FakeServer(DATA), tmp_path, paths=["train.parquet"])
    with pytest.raises(ConfigError, match="--dataset"):
        _fetch(FakeServer(DATA), tmp_path, paths=["../etc/passwd"])


def test_fetch_dataset_offline_uses_a_complete_copy(tmp_path, caplog):
    server = FakeServer(DATA)
    folder = _fetch(server, tmp_path)
    server.faults["init"] = [ValueError("error sending request for url (https://hub.oxen.ai)")]
    with caplog.at_level(logging.WARNING, logger="fluxlora.oxen"):
        assert _fetch(server, tmp_path) == folder
    assert "using the copy at commit" in caplog.text


def test_fetch_dataset_unreachable_without_cache_raises_a_scrubbed_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OXEN_API_KEY", TOKEN)
    server = FakeServer(DATA)
    server.faults["init"] = [ValueError(f"401 Unauthorized: bad token {TOKEN}")]
    with pytest.raises(fo.OxenError) as info:
        _fetch(server, tmp_path / "cache")
    assert TOKEN not in str(info.value)
    assert "--oxen_host" in str(info.value) and "***" in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_fetch_dataset_default_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = fo.fetch_dataset("me/data", remote_factory=fake_remote_class(FakeServer(DATA)))
    assert folder == tmp_path / "home" / ".cache" / "fluxlora" / "oxen" / "me" / "data" / "main"


# ----------------------------------------------------------------------------------------------
# upload_results.


@pytest.fixture
def results(tmp_path) -> dict[str, Path]:
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    files = {"pytorch_lora_weights.safetensors": b"lora", "samples/step_100_0.png": b"png0",
             "samples/step_100_1.png": b"png1", "log.jsonl": b'{"step": 1}\n', "README.md": b"# card"}
    for rel, data in files.items():
        (run / rel).write_bytes(data)
    return {rel: run / rel for rel in files}


def _upload(server, files, sleeps=None, **kw):
    kw = {"branch": None, "run_name": "My Run", "message": "fluxlora: results", **kw}
    return fo.upload_results("me/results", files, remote_factory=fake_remote_class(server),
                             sleep=(sleeps.append if sleeps is not None else _no_sleep), **kw)


def _no_sleep(seconds: float) -> None:
    raise AssertionError(f"unexpected sleep({seconds})")


def test_upload_results_commits_on_a_new_branch_from_main(results):
    server = FakeServer({"README.md": b"# dataset", "images/a.png": b"a"})
    main_before = server.branches["main"]
    branch = _upload(server, results)
    assert branch is not None and branch.startswith("my-run-") and fo.is_valid_branch_name(branch)
    assert server.branches["main"] == main_before  # main untouched
    head = server.branches[branch]
    message, files, parent = server.commits[head]
    assert message == "fluxlora: results" and parent == main_before  # one commit, on top of main
    assert files == {"images/a.png": b"a", **{rel: p.read_bytes() for rel, p in results.items()}}
    constructed = [call for call in server.calls if call[0] == "init"]
    assert constructed == [("init", "me/results", "hub.oxen.ai", "main", "https")]
    adds = [call for call in server.calls if call[0] == "add"]
    assert {(Path(c[1]).name, c[2], c[3]) for c in adds} == {
        ("pytorch_lora_weights.safetensors", "", branch), ("step_100_0.png", "samples", branch),
        ("step_100_1.png", "samples", branch), ("log.jsonl", "", branch), ("README.md", "", branch)}


def test_upload_results_renames_and_takes_a_plain_list(results, tmp_path):
    server = FakeServer({"x": b"x"})
    branch = _upload(server, {"loras/final.safetensors": results["pytorch_lora_weights.safetensors"]})
    assert server.files_at(branch)["loras/final.safetensors"] == b"lora"
    branch2 = _upload(server, [results["log.jsonl"], results["samples/step_100_0.png"]])
    assert {"log.jsonl", "step_100_0.png"} <= set(server.files_at(branch2))
    assert branch2 != branch
    branch3 = _upload(server, results["log.jsonl"])  # one path alone
    assert set(server.files_at(branch3)) == {"x", "log.jsonl"}


def test_upload_results_reuses_a_given_branch_for_a_resumed_run(results):
    server = FakeServer({"x": b"x"})
    first = _upload(server, {"log.jsonl": results["log.jsonl"]}, branch="run-a")
    assert first == "run-a" and server.count("create_branch") == 1
    results["log.jsonl"].write_bytes(b'{"step": 1}\n{"step": 2}\n')
    assert _upload(server, {"log.jsonl": results["log.jsonl"]}, branch="run-a", message="resumed") == "run-a"
    assert server.count("create_branch") == 1
    assert [server.commits[c][0] for c in server.history("run-a")[:2]] == ["resumed", "fluxlora: results"]
    # Nothing new to commit counts as success.
    assert _upload(server, {"log.jsonl": results["log.jsonl"]}, branch="run-a") == "run-a"


def test_upload_results_retries_with_backoff(results):
    server = FakeServer({"x": b"x"})
    server.faults["commit"] = [ValueError("502 Bad Gateway"), ValueError("operation timed out")]
    server.faults["init"] = [ValueError("error sending request")]
    sleeps: list[float] = []
    branch = _upload(server, results, sleeps=sleeps)
    assert branch is not None and sleeps == [2.0, 4.0, 8.0]
    assert server.count("create_branch") == 1  # the name chosen once, the branch made once
    assert [b for b in server.branches if b != "main"] == [branch]
    assert server.count("delete_workspace") == 2  # failed attempts clean up their workspaces
    assert server.files_at(branch)["README.md"] == b"# card"


def test_upload_results_gives_up_with_a_warning(results, caplog):
    server = FakeServer({"x": b"x"})
    server.faults["init"] = [ValueError("connection refused")] * 10
    before = {rel: p.read_bytes() for rel, p in results.items()}
    sleeps: list[float] = []
    with caplog.at_level(logging.WARNING, logger="fluxlora.oxen"):
        assert _upload(server, results, sleeps=sleeps, retries=3, backoff_s=1.5) is None
    assert sleeps == [1.5, 3.0, 6.0] and server.count("init") == 4
    assert "failed after 4 attempt(s)" in caplog.text and str(results["README.md"]) in caplog.text
    assert {rel: p.read_bytes() for rel, p in results.items()} == before


@pytest.mark.parametrize("message", ["401 Unauthorized", "Repository ox/flux not found",
                                     "Remote repository ox/flux does not exist"])
def test_upload_results_does_not_retry_what_another_attempt_cannot_fix(results, caplog, message):
    """Bad credentials and a missing repository fail at once (a retry would only wait)."""
    server = FakeServer({"x": b"x"})
    server.faults["init"] = [ValueError(message)] * 5
    with caplog.at_level(logging.WARNING, logger="fluxlora.oxen"):
        assert _upload(server, results) is None  # _no_sleep fails the test on any wait
    assert server.count("init") == 1 and message in caplog.text


def test_upload_results_scrubs_credentials(results, caplog, capsys, oxen_config, monkeypatch):
    monkeypatch.setenv("OXEN_API_KEY", TOKEN)
    other = "configured-token-999"
    oxen.oxen_py.auth.config_auth("oxen.example.com", other, str(oxen_config / "auth_config.toml"))
    server = FakeServer({"x": b"x"})
    server.faults["add"] = [ValueError(f"upload failed: token={TOKEN} header Authorization: Bearer "
                                       f"{other} sent to https://hub.oxen.ai")] * 3
    sleeps: list[float] = []
    with caplog.at_level(logging.DEBUG):
        assert _upload(server, results, sleeps=sleeps, retries=2) is None
    out = capsys.readouterr()
    logged = caplog.text + out.out + out.err
    assert TOKEN not in logged and other not in logged
    assert "upload failed" in logged and "***" in logged and len(sleeps) == 2


def test_upload_results_stores_oxen_api_key_for_the_host(results, oxen_config, monkeypatch, caplog):
    monkeypatch.setenv("OXEN_API_KEY", TOKEN)
    server = FakeServer({"x": b"x"})
    with caplog.at_level(logging.DEBUG):
        assert _upload(server, results, host="http://localhost:3000") is not None
    config = tomllib.loads((oxen_config / "auth_config.toml").read_text())
    assert {"host": "localhost:3000", "auth_token": TOKEN} in config["host_configs"]
    assert server.calls[0] == ("init", "me/results", "localhost:3000", "main", "http")
    assert TOKEN not in caplog.text
    # A token already configured for the host is kept.
    monkeypatch.setenv("OXEN_API_KEY", "another-key-123")
    _upload(server, results, host="http://localhost:3000")
    config = tomllib.loads((oxen_config / "auth_config.toml").read_text())
    assert [h["auth_token"] for h in config["host_configs"] if h["host"] == "localhost:3000"] == [TOKEN]


def test_upload_results_survives_an_oxen_panic(results, tmp_path):
    """oxenai panics (a BaseException) e.g. without a user config; training must go on."""
    def panic(*args, **kwargs):
        oxen.user.current_user(str(tmp_path / "nowhere" / "user_config.toml"))

    server = FakeServer({"x": b"x"})
    with mock.patch.object(FakeRemoteBase, "commit", panic):
        assert _upload(server, results) is None


def test_upload_results_needs_a_user_and_skips_missing_files(results, oxen_config, caplog):
    server = FakeServer({"x": b"x"})
    files = {**results, "samples/missing.png": results["README.md"].with_name("missing.png")}
    with caplog.at_level(logging.WARNING, logger="fluxlora.oxen"):
        branch = _upload(server, files)
    assert "missing.png does not exist" in caplog.text
    assert "samples/missing.png" not in server.files_at(branch)
    assert _upload(server, {"x/missing": Path("/nonexistent")}) is None

    (oxen_config / "user_config.toml").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxlora.oxen"):
        assert _upload(server, results) is None
    assert "config_user" in caplog.text


@pytest.mark.parametrize("files, branch", [({"../x": Path("a")}, None), ({"/abs": Path("a")}, None),
                                           ({".oxen/x": Path("a")}, None), ({"a": Path("a")}, "bad name")])
def test_upload_results_rejects_bad_input_without_raising(files, branch, caplog):
    server = FakeServer({"x": b"x"})
    with caplog.at_level(logging.WARNING, logger="fluxlora.oxen"):
        assert _upload(server, files, branch=branch) is None
    assert server.calls == [] and "Not uploading" in caplog.text


# ----------------------------------------------------------------------------------------------
# Local repositories, for real.


@pytest.fixture
def local_repo(tmp_path) -> Path:
    path = tmp_path / "repo"
    repo = oxen.Repo(str(path), mkdir=True).init()
    (path / "data.csv").write_text("a,b\n1,2\n")
    repo.add(str(path / "data.csv"))
    repo.commit("dataset")
    return path


def test_commit_to_local_repo(local_repo, results):
    commit_id = fo.commit_to_local_repo(local_repo, results, branch="run-1", message="run 1 results")
    repo = oxen.Repo(str(local_repo))
    assert repo.current_branch.name == "main"  # the checkout is as it was
    assert not (local_repo / "samples").exists() and (local_repo / "data.csv").exists()
    assert {b.name for b in repo.branches()} == {"main", "run-1"}

    repo.checkout("run-1")
    log = repo.log()
    assert [c.message for c in log] == ["run 1 results", "dataset"] and log[0].id == commit_id
    for rel, path in results.items():
        assert (local_repo / rel).read_bytes() == path.read_bytes()
    assert repo.status().is_clean()
    repo.checkout("main")

    # A resumed run commits on top of its branch; unchanged files are no new commit.
    results["log.jsonl"].write_bytes(b"more\n")
    second = fo.commit_to_local_repo(local_repo, results, branch="run-1", message="resumed")
    assert fo.commit_to_local_repo(local_repo, results, branch="run-1", message="again") == second
    repo.checkout("run-1")
    assert [c.message for c in repo.log()][:2] == ["resumed", "run 1 results"]
    assert (local_repo / "log.jsonl").read_bytes() == b"more\n"


def test_commit_to_local_repo_refuses_unsafe_states(local_repo, results, tmp_path):
    (local_repo / "data.csv").write_text("changed\n")
    with pytest.raises(ValueError, match="uncommitted changes"):
        fo.commit_to_local_repo(local_repo, results, branch="run-1", message="m")
    assert oxen.Repo(str(local_repo)).branch_exists("run-1") is False

    empty = tmp_path / "empty"
    oxen.Repo(str(empty), mkdir=True).init()
    with pytest.raises(ValueError, match="no branch checked out"):
        fo.commit_to_local_repo(empty, results, branch="run-1", message="m")
    with pytest.raises(ValueError, match="not an Oxen repository"):
        fo.commit_to_local_repo(tmp_path, results, branch="run-1", message="m")
    with pytest.raises(ValueError, match="valid branch name"):
        fo.commit_to_local_repo(local_repo, results, branch="bad name", message="m")


# ----------------------------------------------------------------------------------------------
# Model card.


def test_model_card():
    card = fo.model_card(base_model="black-forest-labs/FLUX.1-dev", trigger_phrase='ohwx "dog"',
                         rank=16, alpha=8.0, steps=2000, learning_rate=1e-4, resolutions=[512, 1024],
                         sample_files=["samples/step_2000_0.png"], extra={"dataset": "oxen:me/dogs|v2"},
                         lora_file="pytorch_lora_weights.safetensors")
    assert card.startswith("---\nbase_model: \"black-forest-labs/FLUX.1-dev\"\n")
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    tree = ast.parse(code)  # the snippet is valid Python even with quotes in the trigger
    calls = {node.func.attr: node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    load = calls["load_lora_weights"]
    assert ast.literal_eval(load.args[0]) == "."
    assert ast.literal_eval(load.keywords[0].value) == "pytorch_lora_weights.safetensors"
    assert ast.literal_eval(calls["from_pretrained"].args[0]) == "black-forest-labs/FLUX.1-dev"
    generate = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name) and node.func.id == "pipe")
    assert ast.literal_eval(generate.args[0]).startswith('ohwx "dog", ')
    assert "| rank | 16 |" in card and "| alpha | 8.0 |" in card and "| steps | 2000 |" in card
    assert "| resolutions | 512, 1024 |" in card and "| dataset | oxen:me/dogs\\|v2 |" in card
    assert "![sample 1](samples/step_2000_0.png)" in card
    assert "ComfyUI/models/loras" in card and "LoraLoaderModelOnly" in card
    assert "strength to 0.5" in card  # alpha != rank is spelled out for loaders that ignore it
    assert "(https://huggingface.co/black-forest-labs/FLUX.1-dev)" in card

    plain = fo.model_card(base_model="b/m", trigger_phrase="", rank=4, alpha=4, steps=1,
                          learning_rate=1e-3, resolutions=[512], sample_files=[])
    assert "instance_prompt" not in plain and "## Samples" not in plain and "strength to" not in plain
    local = fo.model_card(base_model="/models/flux-dev", trigger_phrase="", rank=4, alpha=4, steps=1,
                          learning_rate=1e-3, resolutions=[512], sample_files=[])
    assert "huggingface.co" not in local and "`/models/flux-dev`" in local
