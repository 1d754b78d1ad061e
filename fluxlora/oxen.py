"""Oxen.ai integration: datasets in (precompute) and training results out (trainer).

Every call that reaches an Oxen server goes through `OxenRemote`, a thin adapter over
`oxen.RemoteRepo` with only the methods used here. Everything else in this module (branch naming,
retries with backoff, which files go where, the local dataset cache, the model card, scrubbing
credentials from messages) is plain Python on top of it, so the tests drive it with a fake adapter
whose method signatures are checked against the real `oxen.RemoteRepo`.

Credentials are Oxen's own: the token that `oxen.auth.config_auth(token, host)` (or the `oxen`
command line's `oxen config --auth HOST TOKEN`) stores in `auth_config.toml` under Oxen's config
folder (`OXEN_CONFIG_DIR`, default `~/.config/oxen`). oxenai itself does not read an `OXEN_API_KEY`
environment variable; when one is set and the config holds no token for the host, it is stored
there for the host before the first request (oxenai reads its auth config once per process). The
commit author is Oxen's configured user (`oxen.user.config_user(name, email)`).

Library behaviours this module relies on (oxenai 0.65):
- `RemoteRepo(...)` contacts the server in its constructor; every failure, network or server, is a
  `ValueError` whose message may quote the server's reply.
- A missing user config makes oxenai panic with `pyo3_runtime.PanicException`, which derives from
  `BaseException`, not `Exception`.
- `RemoteRepo.download(dir, dst)` puts a folder at `dst/<dir path>` but a file at `dst` itself
  (or `dst/<file name>` when `dst` is an existing folder), like `cp`.
- `RemoteRepo.add(src, dst)` stages `src` into the folder `dst` under `src`'s own file name.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import oxen

from fluxlora.config import ConfigError

logger = logging.getLogger(__name__)

URI_PREFIX = "oxen:"
DEFAULT_HOST = "hub.oxen.ai"  # oxen.RemoteRepo's default
DEFAULT_BRANCH = "main"  # the branch Oxen creates with a repository
MAX_BRANCH_LEN = 100
MAX_BACKOFF_S = 60.0
_MARKER_SUFFIX = ".fluxlora-complete.json"
_REPO_ID = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")


class OxenError(RuntimeError):
    """An Oxen operation failed; the message says what to check and never holds a credential."""


# ----------------------------------------------------------------------------------------------
# The adapter: the only code that talks to an Oxen server.


@dataclass(frozen=True)
class RemoteEntry:
    """One entry of a remote folder listing."""

    name: str
    is_dir: bool


class RemoteLike(Protocol):
    """What this module needs from a remote repository (`OxenRemote` or a test fake)."""

    def log(self, revision: str | None = None, path: str | None = None, page_num: int = 1,
            page_size: int = 10) -> list[str]: ...
    def scan(self, directory: str | None = None, page_size: int = 100) -> Iterator[RemoteEntry]: ...
    def download(self, src: str, dst: str | None = None, revision: str | None = None) -> None: ...
    def branches(self) -> list[str]: ...
    def branch_exists(self, name: str) -> bool: ...
    def create_branch(self, branch: str) -> None: ...
    def add(self, src: str, dst: str | None = "", branch: str | None = None,
            workspace_name: str | None = None) -> None: ...
    def commit(self, message: str, branch: str | None = None) -> str: ...
    def delete_workspace(self) -> None: ...


RemoteFactory = Callable[..., RemoteLike]
# Files to commit: destination path in the repository -> local file, or local files (and a lone
# local file) that go to the repository's root under their own names.
Files = Mapping[str, Path | str] | Sequence[Path | str] | Path | str


class OxenRemote:
    """`oxen.RemoteRepo` cut down to what fluxlora uses, returning plain Python values.

    Each method keeps the parameter names, order and defaults of the `oxen.RemoteRepo` method of
    the same name (a test checks it), so a fake built to this class behaves like the library.
    """

    def __init__(self, repo_id: str, host: str = DEFAULT_HOST, revision: str = DEFAULT_BRANCH,
                 scheme: str = "https"):
        # Contacts the server: resolves `revision` to the commit new branches start from.
        self._repo = oxen.RemoteRepo(repo_id, host=host, revision=revision, scheme=scheme)

    def log(self, revision: str | None = None, path: str | None = None, page_num: int = 1,
            page_size: int = 10) -> list[str]:
        """Commit ids of `revision` (a branch or commit id), newest first, one page of them."""
        page = self._repo.log(revision=revision, path=path, page_num=page_num, page_size=page_size)
        return [commit.id for commit in page]

    def scan(self, directory: str | None = None, page_size: int = 100) -> Iterator[RemoteEntry]:
        """The entries of a folder (the root when None) at the revision this handle was made for."""
        for entry in self._repo.scan(directory=directory, page_size=page_size):
            yield RemoteEntry(name=entry.filename, is_dir=entry.is_dir)

    def download(self, src: str, dst: str | None = None, revision: str | None = None) -> None:
        """Download a file or folder of the repository (see the module notes for where it lands)."""
        self._repo.download(src, dst=dst, revision=revision)

    def branches(self) -> list[str]:
        """Names of all branches."""
        return [branch.name for branch in self._repo.branches()]

    def branch_exists(self, name: str) -> bool:
        """Whether a branch of that name exists."""
        return bool(self._repo.branch_exists(name))

    def create_branch(self, branch: str) -> None:
        """Create `branch` at the commit of the revision this handle was made for."""
        self._repo.create_branch(branch)

    def add(self, src: str, dst: str | None = "", branch: str | None = None,
            workspace_name: str | None = None) -> None:
        """Stage the local file `src` into the remote folder `dst` of a workspace on `branch`."""
        self._repo.add(src, dst=dst, branch=branch, workspace_name=workspace_name)

    def commit(self, message: str, branch: str | None = None) -> str:
        """Commit the workspace (to the branch it was opened on when None); returns the commit id."""
        return self._repo.commit(message, branch=branch).id

    def delete_workspace(self) -> None:
        """Drop the open workspace, if any, with whatever it had staged."""
        self._repo.delete_workspace()


# ----------------------------------------------------------------------------------------------
# Names, hosts and credentials.


def parse_oxen_uri(uri: str) -> tuple[str, str | None]:
    """Split "oxen:OWNER/REPO" or "oxen:OWNER/REPO@REVISION" into (repo id, revision or None).

    Raises:
        ConfigError: (naming --dataset) the text is not of that form.
    """
    if not uri.startswith(URI_PREFIX):
        raise ConfigError("dataset", f"{uri!r} is not an Oxen dataset; write oxen:OWNER/REPO or "
                                     f"oxen:OWNER/REPO@BRANCH_OR_COMMIT")
    repo_id, at, revision = uri[len(URI_PREFIX):].partition("@")
    if not _REPO_ID.fullmatch(repo_id) or (at and not revision.strip()):
        raise ConfigError("dataset", f"{uri!r} is not of the form oxen:OWNER/REPO or "
                                     f"oxen:OWNER/REPO@BRANCH_OR_COMMIT")
    return repo_id, (revision if at else None)


def _oxen_config_dir() -> Path:
    return Path(oxen.oxen_py.util.get_oxen_config_dir())


def _auth_config() -> dict[str, Any]:
    """Oxen's auth config (default host, per-host tokens); empty when absent or unreadable."""
    try:
        return tomllib.loads((_oxen_config_dir() / "auth_config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _configured_token(host: str) -> str | None:
    for entry in _auth_config().get("host_configs", []):
        if entry.get("host") == host and entry.get("auth_token"):
            return str(entry["auth_token"])
    return None


def resolve_host(host: str | None) -> tuple[str, str]:
    """(host, scheme) to connect to.

    `host` may carry a scheme ("http://localhost:3000" for a local oxen-server); when None, the
    default host of Oxen's auth config is used, else hub.oxen.ai.
    """
    if not host:
        host = str(_auth_config().get("default_host") or DEFAULT_HOST)
    scheme, sep, rest = host.partition("://")
    if sep:
        return rest.rstrip("/"), scheme
    return host.rstrip("/"), "https"


def _apply_api_key(host: str) -> None:
    """Store OXEN_API_KEY as the host's token when Oxen's auth config has none for it.

    oxenai reads only its auth config, and only once per process, so this must run before the
    first request. A token already configured for the host is kept.
    """
    token = os.environ.get("OXEN_API_KEY", "").strip()
    if not token:
        return
    configured = _configured_token(host)
    if configured == token:
        return
    if configured is not None:
        logger.warning("OXEN_API_KEY differs from the token Oxen's auth config holds for %s; the "
                       "configured token is used (change it with oxen.auth.config_auth)", host)
        return
    path = _oxen_config_dir() / "auth_config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    oxen.oxen_py.auth.config_auth(host, token, str(path))
    logger.info("Stored OXEN_API_KEY as the token for %s in %s", host, path)


def _secrets() -> list[str]:
    """Every credential this process could send: OXEN_API_KEY and the configured tokens."""
    found = [os.environ.get("OXEN_API_KEY", "").strip()]
    found += [str(entry.get("auth_token", "")) for entry in _auth_config().get("host_configs", [])]
    # Longest first, so a token containing another is replaced whole.
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


_SECRET_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s'\",;]+"),
    re.compile(r"(?i)((?:api[_-]?key|auth[_-]?token|access[_-]?token|token|password)\s*[=:]\s*['\"]?)"
               r"[^\s'\",;&]+"),
)


def scrub(text: str, secrets: Sequence[str] | None = None) -> str:
    """`text` with credentials replaced by "***": known tokens and anything shaped like one."""
    for secret in _secrets() if secrets is None else secrets:
        text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + "***", text)
    return text


def _describe(err: BaseException) -> str:
    return scrub(f"{type(err).__name__}: {err}")


def _is_panic(err: BaseException) -> bool:
    # oxenai's Rust panics surface as pyo3_runtime.PanicException, a BaseException subclass
    # that `except Exception` does not catch.
    return type(err).__name__ == "PanicException"


def _is_error(err: BaseException) -> bool:
    """An error to handle, as opposed to KeyboardInterrupt, SystemExit and the like."""
    return isinstance(err, Exception) or _is_panic(err)


def _is_permanent(err: BaseException) -> bool:
    """Errors that another attempt cannot fix: credentials, a missing repository, panics, bugs."""
    if _is_panic(err) or not isinstance(err, (ValueError, OSError, RuntimeError)):
        return True
    text = str(err).lower()
    return any(word in text for word in ("401", "403", "404", "unauthorized", "forbidden",
                                         "api key", "authenticat", "does not exist", "not found"))


def _has_user_config() -> bool:
    return (_oxen_config_dir() / "user_config.toml").is_file()


# ----------------------------------------------------------------------------------------------
# Branch names.


def is_valid_branch_name(name: str) -> bool:
    """Whether `name` is a branch name git and Oxen accept (git's check-ref-format rules)."""
    if not name or len(name) > MAX_BRANCH_LEN or name.startswith("-") or name == "@":
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c in " ~^:?*[\\" for c in name):
        return False
    if ".." in name or "@{" in name or name.endswith("."):
        return False
    return all(part and not part.startswith(".") and not part.endswith(".lock")
               for part in name.split("/"))


def new_branch_name(run_name: str, existing: Collection[str], now: datetime | None = None) -> str:
    """A fresh branch name for a run: "<run name>-<YYYYmmdd-HHMMSS>", plus "-2", "-3"... on collision.

    The run name is lower-cased and cut down to letters, digits, ".", "_" and "-" (no slashes), so
    the name is valid for git and Oxen whatever the run is called. Names are compared ignoring case
    (branches are files on case-insensitive disks too), so the result never collides with `existing`.
    """
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^a-z0-9._-]+", "-", run_name.lower())
    slug = re.sub(r"\.{2,}", ".", slug).strip(".-_")
    slug = slug[: MAX_BRANCH_LEN - len(stamp) - 8].rstrip(".-_")
    base = f"{slug}-{stamp}" if slug else f"run-{stamp}"
    taken = {name.lower() for name in existing}
    name, counter = base, 1
    while name in taken:
        counter += 1
        name = f"{base}-{counter}"
    return name


# ----------------------------------------------------------------------------------------------
# Datasets in.


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fluxlora" / "oxen"


def _safe_dirname(revision: str) -> str:
    """A folder name for a revision; branch names may hold "/" and other characters."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", revision).lstrip(".") or "_"
    if safe != revision:
        # Two revisions that sanitise alike ("a/b", "a_b") must not share a folder.
        safe += "-" + uuid.uuid5(uuid.NAMESPACE_URL, revision).hex[:8]
    return safe


def _check_repo_path(path: str, flag: str) -> str:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path:
        raise ConfigError(flag, f"{path!r} is not a relative path inside the repository "
                                f"(use forward slashes, no '..')")
    return pure.as_posix()


def _read_marker(marker: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _entry_is_dir(remote: RemoteLike, path: str, where: str) -> bool:
    parent, name = posixpath.split(path)
    for entry in remote.scan(parent or None):
        if entry.name == name:
            return entry.is_dir
    raise OxenError(f"{path} is not in {where}; check the path (ls the repository on Oxen)")


def _download_tree(remote: RemoteLike, commit_id: str, paths: Sequence[str], dest: Path,
                   where: str) -> None:
    """Download `paths` (or every top-level entry) at `commit_id` into `dest`, keeping repo paths."""
    if paths:
        targets = [(path, _entry_is_dir(remote, path, where)) for path in paths]
    else:
        targets = [(entry.name, entry.is_dir) for entry in remote.scan(None)]
        if not targets:
            raise OxenError(f"{where} holds no files")
    for path, is_dir in targets:
        if is_dir:
            # A folder lands at dst/<its path>.
            remote.download(path, str(dest), revision=commit_id)
        else:
            # A file lands at dst itself; its parent folder must exist.
            target = dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            remote.download(path, str(target), revision=commit_id)


def _remove_leftovers(folder: Path) -> None:
    """Partial downloads and swapped-out copies that an interrupted process left behind."""
    for pattern in (f".{folder.name}.partial-*", f".{folder.name}.old-*"):
        for stale in folder.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def fetch_dataset(repo_id: str, *, revision: str | None = None, host: str | None = None,
                  paths: Sequence[str] = (), cache_root: Path | None = None,
                  remote_factory: RemoteFactory | None = None) -> Path:
    """Download an Oxen repository's dataset files into a local cache folder; reuse it when unchanged.

    `repo_id` is "OWNER/REPO" (an "oxen:" prefix and an "@REVISION" suffix are accepted too).
    `revision` is a branch or commit id (default: the "main" branch); `paths` picks files or folders
    of the repository (default: all of it). The copy lives in
    `<cache_root>/<owner>/<repo>/<revision>` (`cache_root` defaults to ~/.cache/fluxlora/oxen, or
    under $XDG_CACHE_HOME) and is downloaded again only when the revision's latest commit differs
    from the one recorded after the last complete download (or `paths` or the host changed). Files
    are fetched at that exact commit into a temporary folder that replaces the copy only once it is
    whole, so an interrupted download is never reused. When the server cannot be reached, a
    complete copy of the same revision is used with a warning. Call it from one process at a time
    (e.g. under accelerate's main_process_first): a download clears other half-finished ones.

    Returns:
        The local folder, laid out as in the repository.
    Raises:
        ConfigError: a malformed repository id, revision or path (naming the flag).
        OxenError: the download failed; the message says what to check and holds no credential.
    """
    if repo_id.startswith(URI_PREFIX):
        repo_id, uri_revision = parse_oxen_uri(repo_id)
    else:
        repo_id, uri_revision = parse_oxen_uri(URI_PREFIX + repo_id)
    if uri_revision and revision and uri_revision != revision:
        raise ConfigError("oxen_revision", f"{revision!r} contradicts the revision {uri_revision!r} "
                                           f"in --dataset; give it in one place")
    revision = revision or uri_revision or DEFAULT_BRANCH
    paths = [_check_repo_path(p, "dataset") for p in paths]
    host_name, scheme = resolve_host(host)
    owner, name = repo_id.split("/")
    folder = (cache_root or _default_cache_root()) / owner / name / _safe_dirname(revision)
    marker = folder.with_name(f".{folder.name}{_MARKER_SUFFIX}")
    where = f"oxen:{repo_id}@{revision} on {host_name}"
    wanted = {"host": f"{scheme}://{host_name}", "paths": sorted(paths)}

    recorded = _read_marker(marker) if folder.is_dir() else None
    usable = recorded if recorded and all(recorded.get(k) == v for k, v in wanted.items()) else None
    factory = remote_factory or OxenRemote
    try:
        _apply_api_key(host_name)
        remote = factory(repo_id, host=host_name, revision=revision, scheme=scheme)
        commits = remote.log(revision=revision, page_size=1)
    except BaseException as err:
        if not _is_error(err):
            raise
        if usable:
            logger.warning("Could not reach %s (%s); using the copy at commit %s in %s", where,
                           _describe(err), usable["commit_id"], folder)
            return folder
        raise OxenError(f"Could not read {where}: {_describe(err)}. Check --dataset and "
                        f"--oxen_revision, --oxen_host, the network, and your Oxen token "
                        f"(oxen.auth.config_auth or OXEN_API_KEY)") from None
    if not commits:
        raise OxenError(f"{where} has no commits yet; push the dataset first")
    commit_id = commits[0]
    if usable and usable.get("commit_id") == commit_id:
        logger.info("Using the cached copy of %s at commit %s: %s", where, commit_id, folder)
        return folder

    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    logger.info("Downloading %s (commit %s) to %s", where, commit_id, folder)
    try:
        _download_tree(remote, commit_id, paths, partial, where)
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OxenError) or not _is_error(err):
            raise  # our own message, or KeyboardInterrupt and the like
        raise OxenError(f"Downloading {where} failed: {_describe(err)}; run again to retry") from None
    # Drop the marker before swapping folders: a crash in between then means "download again".
    marker.unlink(missing_ok=True)
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex}")
    if folder.exists():
        folder.rename(old)
    partial.rename(folder)
    _write_json_atomic(marker, {**wanted, "commit_id": commit_id, "repo": repo_id,
                                "revision": revision})
    shutil.rmtree(old, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------------------------
# Results out.


def _plan_uploads(files: Files) -> list[tuple[str, Path]]:
    """(destination in the repository, local file) pairs; a sequence goes to the root by file name.

    Raises:
        ValueError: a destination is not a relative path, or two files share one.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]  # one path, not a sequence of characters
    pairs = (list(files.items()) if isinstance(files, Mapping)
             else [(Path(f).name, f) for f in files])
    plan: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for dest, local in pairs:
        pure = PurePosixPath(str(dest))
        if pure.is_absolute() or not pure.parts or ".." in pure.parts or pure.parts[0] == ".oxen":
            raise ValueError(f"{dest!r} is not a relative path inside the repository")
        if pure.as_posix() in seen:
            raise ValueError(f"two files are to be uploaded to {pure.as_posix()}")
        seen.add(pure.as_posix())
        plan.append((pure.as_posix(), Path(local)))
    return plan


def _staged_source(dest: str, local: Path, staging: Path) -> Path:
    """A path to `local` whose file name is `dest`'s, since Oxen keeps the local file name."""
    name = posixpath.basename(dest)
    if local.name == name:
        return local
    target = staging / uuid.uuid4().hex / name
    target.parent.mkdir(parents=True)
    try:
        os.link(local, target)  # LoRA files can be large: link rather than copy where possible
    except OSError:
        shutil.copy2(local, target)
    return target


def upload_results(repo_id: str, files: Files, *, branch: str | None, run_name: str, message: str,
                   host: str | None = None, remote_factory: RemoteFactory | None = None,
                   retries: int = 4, backoff_s: float = 2.0, base_branch: str = DEFAULT_BRANCH,
                   sleep: Callable[[float], None] = time.sleep) -> str | None:
    """Commit a run's results to an Oxen repository, on a branch of the run; never raises.

    `files` maps destination paths in the repository to local files (a plain sequence puts each
    file at the root under its own name). With `branch=None` a new branch is named from `run_name`
    and the time (`new_branch_name`, unique among the repository's branches) and created from
    `base_branch`. A given `branch` is used as it is: created from `base_branch` when missing, or
    committed on top of when it exists, which is how a resumed run adds to the branch it made
    before (the caller keeps the name this function returned). All files go in one commit with
    `message`. Failures are retried `retries` times, waiting `backoff_s`, then twice as long each
    time (at most 60 s); credential errors are not retried. Missing local files are skipped with a
    warning. On final failure a warning names the local files, which are never touched.

    Returns:
        The branch name on success (also when the branch already held identical files), else None.
    """
    try:
        plan = _plan_uploads(files)
        if branch is not None and not is_valid_branch_name(branch):
            raise ValueError(f"{branch!r} is not a valid branch name (no spaces, '..', '~^:?*[\\')")
    except (ValueError, TypeError) as err:
        logger.warning("Not uploading to Oxen: %s", scrub(str(err)))
        return None
    present = [(dest, local) for dest, local in plan if local.is_file()]
    for dest, local in plan:
        if not local.is_file():
            logger.warning("Not uploading %s to Oxen: %s does not exist", dest, local)
    if not present:
        logger.warning("Nothing to upload to Oxen (no existing files given)")
        return None
    local_list = ", ".join(str(local) for _, local in present)
    if not _has_user_config():
        logger.warning("Not uploading to Oxen: no Oxen user is configured to author the commit; run "
                       "python -c \"import oxen; oxen.user.config_user('NAME', 'EMAIL')\". The "
                       "results stay in %s", local_list)
        return None
    host_name, scheme = resolve_host(host)
    try:
        _apply_api_key(host_name)
    except OSError as err:
        logger.warning("Could not store OXEN_API_KEY in Oxen's auth config: %s", _describe(err))
    factory = remote_factory or OxenRemote
    with tempfile.TemporaryDirectory(prefix="fluxlora-oxen-") as staging:
        try:
            sources = [(posixpath.dirname(dest), str(_staged_source(dest, local, Path(staging))))
                       for dest, local in present]
        except OSError as err:
            logger.warning("Not uploading to Oxen: could not stage the files (%s). The results stay "
                           "in %s", _describe(err), local_list)
            return None
        chosen, attempt = branch, 0
        while True:
            remote = None
            try:
                remote = factory(repo_id, host=host_name, revision=base_branch, scheme=scheme)
                if chosen is None:  # named once: a retry finds the branch an attempt made
                    chosen = new_branch_name(run_name, remote.branches())
                if not remote.branch_exists(chosen):
                    remote.create_branch(chosen)
                for folder, source in sources:
                    remote.add(source, dst=folder, branch=chosen)
                remote.commit(message, branch=chosen)
                logger.info("Uploaded %d files to oxen:%s on branch %s", len(sources), repo_id, chosen)
                return chosen
            except BaseException as err:
                if not _is_error(err):
                    raise  # KeyboardInterrupt, SystemExit
                if "no changes to commit" in str(err).lower():
                    logger.info("oxen:%s branch %s already holds these files", repo_id, chosen)
                    return chosen
                if remote is not None:
                    _drop_workspace(remote)
                attempt += 1
                if _is_permanent(err) or attempt > max(retries, 0):
                    logger.warning("Uploading to oxen:%s on %s failed after %d attempt(s): %s. The "
                                   "results stay in %s", repo_id, host_name, attempt, _describe(err),
                                   local_list)
                    return None
                delay = min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                logger.warning("Uploading to oxen:%s failed (attempt %d of %d): %s; retrying in "
                               "%.0f s", repo_id, attempt, max(retries, 0) + 1, _describe(err), delay)
                sleep(delay)


def _drop_workspace(remote: RemoteLike) -> None:
    """Best effort: a failed attempt's workspace would otherwise linger on the server."""
    try:
        remote.delete_workspace()
    except (ValueError, OSError, RuntimeError) as err:
        logger.debug("Could not delete the Oxen workspace: %s", _describe(err))


def commit_to_local_repo(repo_path: Path, files: Files, *, branch: str, message: str,
                         base_branch: str = DEFAULT_BRANCH) -> str:
    """Commit files to a branch of a local Oxen repository (for users who keep a local clone).

    Creates `branch` from `base_branch` when missing (commits on top of it when it exists), copies
    the files in at their destination paths, adds and commits them, then checks out the branch
    that was checked out before, so the working tree is as it was. Push the branch with oxen's
    `Repo.push(branch=...)` to publish it.

    Returns:
        The id of the new commit (of the branch's head when the files were already committed).
    Raises:
        ValueError: not an Oxen repository, no commits yet, uncommitted changes, no such base
            branch, an invalid branch name or destination path.
    """
    repo_path = Path(repo_path).resolve()
    if not (repo_path / ".oxen").is_dir():
        raise ValueError(f"{repo_path} is not an Oxen repository; create one with "
                         f"oxen.Repo(path).init() or clone one")
    if not is_valid_branch_name(branch):
        raise ValueError(f"{branch!r} is not a valid branch name (no spaces, '..', '~^:?*[\\')")
    plan = _plan_uploads(files)
    for _, local in plan:
        if not Path(local).is_file():
            raise ValueError(f"{local} does not exist")
    repo = oxen.Repo(str(repo_path))
    current = repo.current_branch
    if current is None:
        raise ValueError(f"{repo_path} has no branch checked out (no commits yet, or a detached "
                         f"commit); commit something first or check out {base_branch}")
    status = repo.status()
    changed = (status.added_files() + status.modified_files() + status.removed_files()
               + status.unstaged_modified_files() + status.unstaged_removed_files())
    if changed:
        raise ValueError(f"{repo_path} has uncommitted changes ({', '.join(sorted(changed)[:5])}); "
                         f"commit or restore them first")
    if repo.branch_exists(branch):
        repo.checkout(branch)
    elif repo.branch_exists(base_branch):
        repo.checkout(base_branch)
        repo.checkout(branch, create=True)
    else:
        raise ValueError(f"{repo_path} has no branch {base_branch!r} to create {branch!r} from")
    created: list[Path] = []
    try:
        for dest, local in plan:
            target = repo_path / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                created.append(target)
            shutil.copy2(local, target)
            repo.add(str(target))
        try:
            commit_id = repo.commit(message).id
        except ValueError as err:
            if "no changes to commit" not in str(err).lower():
                raise
            commit_id = repo.log()[0].id
        created.clear()  # committed: they belong to the branch now
    finally:
        for path in created:
            path.unlink(missing_ok=True)
        repo.checkout(current.name)
    return commit_id


# ----------------------------------------------------------------------------------------------
# Model card.


def _py(text: str) -> str:
    """A double-quoted Python string literal (JSON's escapes are all valid in Python)."""
    return json.dumps(text, ensure_ascii=False)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def model_card(*, base_model: str, trigger_phrase: str, rank: int, alpha: float, steps: int,
               learning_rate: float, resolutions: Sequence[int], sample_files: Sequence[str],
               extra: Mapping[str, Any] = {}, lora_file: str = "pytorch_lora_weights.safetensors",
               title: str | None = None) -> str:
    """A short README.md for the LoRA: what it was trained on, and how to load it in diffusers and ComfyUI.

    `sample_files` are paths relative to the README (they are shown as images); `extra` adds rows
    to the training table; `lora_file` is the weights' path relative to the README.
    """
    title = title or f"FLUX.1 LoRA{f' for {trigger_phrase}' if trigger_phrase else ''}"
    prompt = f"{trigger_phrase}, a photo" if trigger_phrase else "a photo"
    weight_dir, weight_name = posixpath.split(lora_file)
    front = ["---", f"base_model: {json.dumps(base_model)}", "library_name: diffusers",
             "tags: [flux, lora, text-to-image, diffusers]"]
    if trigger_phrase:
        front.append(f"instance_prompt: {json.dumps(trigger_phrase)}")
    # Link hub ids; a local path or single-file checkpoint has no page to link to.
    is_hub_id = _REPO_ID.fullmatch(base_model) and not base_model.startswith(".")
    model_ref = f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id else f"`{base_model}`"
    lines = [*front, "---", "", f"# {title}", "",
             f"A LoRA (rank {rank}) for {model_ref} trained with fluxlora.", ""]
    if trigger_phrase:
        lines += [f"Trigger phrase: `{trigger_phrase}` (start prompts with it).", ""]
    rows = {"base model": base_model, "rank": rank, "alpha": alpha, "steps": steps,
            "learning rate": learning_rate,
            "resolutions": ", ".join(str(r) for r in resolutions), **extra}
    lines += ["## Training", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in rows.items()]
    lines.append("")
    if sample_files:
        lines += ["## Samples", ""]
        lines += [f"![sample {i + 1}]({path})" for i, path in enumerate(sample_files)]
        lines.append("")
    lines += ["## Use with diffusers", "", "```python", "import torch",
              "from diffusers import FluxPipeline", "",
              f"pipe = FluxPipeline.from_pretrained({_py(base_model)}, torch_dtype=torch.bfloat16).to(\"cuda\")",
              f"pipe.load_lora_weights({_py(weight_dir or '.')}, weight_name={_py(weight_name)})",
              f"image = pipe({_py(prompt)}, num_inference_steps=28, guidance_scale=3.5).images[0]",
              "image.save(\"out.png\")", "```", "",
              (f"Run it next to a download of this branch, or give `load_lora_weights` the folder that "
               f"holds `{weight_name}` instead of `{weight_dir or '.'}`."),
              "", "## Use with ComfyUI", "",
              (f"Copy `{weight_name}` into `ComfyUI/models/loras/`, then put a **LoraLoaderModelOnly** "
               f"node between the FLUX model loader and the sampler and pick the file (strength 1.0).")]
    if float(alpha) != float(rank):
        scale = float(alpha) / rank
        lines += ["", (f"Trained with alpha {alpha} and rank {rank}: loaders that ignore a stored alpha "
                       f"apply the LoRA at scale 1 instead of {scale:g}; set their strength to "
                       f"{scale:g} to match.")]
    return "\n".join(lines) + "\n"
