"""Folders in object storage, mirrored into this node's cache: model weights and LoRA adapters.

A folder URL is ``s3://bucket/prefix``, ``gs://bucket/prefix`` (gcsfs),
``file:///dir`` or a plain directory. ``s3://anonymous@bucket/prefix`` and
``gs://anonymous@bucket/prefix`` read a public bucket unsigned. Credentials and
endpoints come from the standard environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION;
GOOGLE_APPLICATION_CREDENTIALS), through fsspec.

``FolderMirror.mirror()`` makes a complete local copy and returns its path:

- one download per node: replicas starting together wait on a file lock for the
  first one's download, then find the copy done;
- a copy is only used complete: files land in a partial folder that is renamed
  into place at the end, and what a killed download left is removed;
- files already mirrored and unchanged in the bucket (same size and ETag) are
  linked, not fetched, when the folder changed;
- a missing bucket or prefix is a ``FolderMissingError``, missing credentials or
  access a ``StorageError``, each saying which.

``mirror_weights`` is the model replica's entry point; it publishes progress
that ``llmserve run`` shows in its status lines (``downloads_since``).

Example::

    mirror = FolderMirror("s3://weights/qwen", cache_root("models"))
    local_dir = mirror.mirror(progress=lambda done, total: print(done, total)).path
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from llmserve.errors import ConfigError, FolderMissingError, StorageError

logger = logging.getLogger(__name__)

MANIFEST = ".llmserve-manifest.json"
# Download progress goes to Ray's key-value store, where `llmserve run` shows it.
PROGRESS_NAMESPACE = "llmserve_downloads"
ANONYMOUS = "anonymous@"
PARALLEL_FILES = 4
Progress = Callable[[int, int], None]  # (bytes fetched so far, bytes to fetch)


def cache_root(kind: str) -> Path:
    """Where this node keeps mirrored folders of one kind ("models", "adapters")."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmserve" / kind


@dataclass(frozen=True)
class Mirrored:
    path: str
    fetched_files: int = 0
    fetched_bytes: int = 0
    linked_files: int = 0
    seconds: float = 0.0


class FolderMirror:
    """One folder of object storage and its copy under ``cache_dir`` (shared by the node's replicas)."""

    def __init__(self, url: str, cache_dir: Path):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.is_local = "file" in protocols(self.fs)
        self._dir = cache_dir / hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def mirror(self, *, recheck: bool = True, required: Optional[str] = None, progress: Optional[Progress] = None) -> Mirrored:
        """A complete local copy of the folder.

        ``recheck=False`` trusts a finished copy without listing the bucket (for
        folders that never change under one name, like adapters). ``required``
        names a file the folder must hold to count as there at all.
        """
        started = time.monotonic()
        self._dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            current = self._current()
            if current is not None and not recheck:
                return Mirrored(str(current))
            listing = self._listing(required)
            if current is not None and _read_manifest(current) == listing:
                return Mirrored(str(current))
            return self._fetch(listing, current, progress, started)

    def _listing(self, required: Optional[str]) -> dict[str, list]:
        """Each file under the folder (relative path) with what tells a changed file: size and ETag."""
        with self._storage_errors():
            entries = self.fs.find(self.root, detail=True)
        listing = {
            name[len(self.root) :].lstrip("/"): [entry.get("size"), _version_tag(entry)]
            for name, entry in entries.items()
            if entry.get("type") != "directory"
        }
        listing.pop(MANIFEST, None)
        if not listing:
            raise FolderMissingError(f"{self.url}: {self._missing_what()}")
        if required and required not in listing:
            raise FolderMissingError(f"{self.url} has no {required}")
        return listing

    @contextlib.contextmanager
    def _storage_errors(self) -> Iterator[None]:
        """fsspec's and the cloud SDKs' failures, as errors that say what to fix."""
        try:
            yield
        except FileNotFoundError as exc:
            raise FolderMissingError(f"{self.url}: {self._missing_what()}") from exc
        except PermissionError as exc:
            raise StorageError(f"{self.url}: access denied; check the credentials this replica gets ({exc})") from exc
        except Exception as exc:
            if type(exc).__name__ in ("NoCredentialsError", "DefaultCredentialsError", "PartialCredentialsError"):
                raise StorageError(
                    f"{self.url}: no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, e.g. in "
                    f"runtime_env.env_vars; for a public bucket write {self._anonymous_url()})"
                ) from exc
            raise

    def _missing_what(self) -> str:
        bucket = self.root.split("/", 1)[0]
        if not self.is_local and not self.fs.exists(bucket):
            return f"the bucket {bucket!r} does not exist (or these credentials cannot see it)"
        return "no files under this prefix"

    def _anonymous_url(self) -> str:
        scheme, rest = self.url.split("://", 1)
        return f"{scheme}://{ANONYMOUS}{rest}"

    def _fetch(self, listing: dict[str, list], previous: Optional[Path], progress: Optional[Progress], started: float) -> Mirrored:
        for stale in self._dir.glob(".partial+*"):
            # What a process killed mid-download left (it held the lock, and we hold it now).
            shutil.rmtree(stale, ignore_errors=True)
        old = _read_manifest(previous) if previous is not None else {}
        partial = Path(tempfile.mkdtemp(prefix=".partial+", dir=self._dir))
        try:
            linked = [name for name, tag in listing.items() if old.get(name) == tag]
            for name in linked:
                _place(partial / name)
                os.link(previous / name, partial / name)
            to_fetch = [name for name in listing if name not in linked]
            fetched = self._download(to_fetch, partial, sum(listing[name][0] or 0 for name in to_fetch), progress)
            (partial / MANIFEST).write_text(json.dumps(listing, sort_keys=True))
            version = self._dir / hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]
            shutil.rmtree(version, ignore_errors=True)
            partial.rename(version)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        self._point_current_at(version, previous)
        return Mirrored(str(version), len(to_fetch), fetched, len(linked), time.monotonic() - started)

    def _download(self, names: list[str], into: Path, total: int, progress: Optional[Progress]) -> int:
        counted = _ByteCount(total, progress)

        def fetch_one(name: str) -> None:
            _place(into / name)
            self.fs.get_file(f"{self.root}/{name}", str(into / name), callback=counted.callback())

        with self._storage_errors(), concurrent.futures.ThreadPoolExecutor(PARALLEL_FILES) as pool:
            for done in concurrent.futures.as_completed([pool.submit(fetch_one, name) for name in names]):
                done.result()
        counted.report(force=True)
        return counted.done

    def _point_current_at(self, version: Path, previous: Optional[Path]) -> None:
        link = self._dir / "current"
        swap = self._dir / f".current+{os.getpid()}"
        swap.unlink(missing_ok=True)
        swap.symlink_to(version.name)
        os.replace(swap, link)
        # Older copies go, but the one just replaced stays: a replica may still be loading from it.
        for other in self._dir.iterdir():
            if other.is_dir() and not other.name.startswith(".") and other not in (version, previous) and other.name != "current":
                shutil.rmtree(other, ignore_errors=True)

    def _current(self) -> Optional[Path]:
        link = self._dir / "current"
        if not link.is_symlink():
            return None
        target = (self._dir / os.readlink(link)).resolve()
        return target if (target / MANIFEST).exists() else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others find it done
            yield


def mirror_weights(model_id: str, url: str) -> str:
    """The local folder of a model's weights in object storage, mirrored into the node's cache."""
    key = f"{model_id}@{os.uname().nodename}:{os.getpid()}"

    def show(done: int, total: int) -> None:
        _publish(key, f"downloading {url}: {done / 1e6:.1f} of {total / 1e6:.1f} MB ({100 * done // max(total, 1)}%)")

    _publish(key, f"fetching {url} (or waiting for this node's download of it)")
    try:
        copy = FolderMirror(url, cache_root("models")).mirror(progress=show)
    except Exception as exc:
        _publish(key, f"cannot fetch {url}: {exc}")
        raise
    if copy.fetched_files or copy.linked_files:
        done = (
            f"{url} is in {copy.path}: fetched {copy.fetched_files} files ({copy.fetched_bytes / 1e6:.1f} MB) "
            f"in {copy.seconds:.1f}s, kept {copy.linked_files} unchanged"
        )
    else:
        done = f"{url} is in {copy.path}, unchanged since this node fetched it"
    logger.info("%s", done)
    _publish(key, done)
    return copy.path


def downloads_since(started_at: float) -> dict[str, str]:
    """The latest progress line of each model download published since ``started_at`` (wall-clock time)."""
    from ray.experimental import internal_kv

    lines = {}
    for key in internal_kv._internal_kv_list("", namespace=PROGRESS_NAMESPACE):
        value = internal_kv._internal_kv_get(key, namespace=PROGRESS_NAMESPACE)
        if value:
            entry = json.loads(value)
            if entry["at"] >= started_at:
                lines[key.decode()] = entry["line"]
    return lines


def _publish(key: str, line: str) -> None:
    try:
        from ray.experimental import internal_kv

        if internal_kv._internal_kv_initialized():
            value = json.dumps({"line": line, "at": time.time()})
            internal_kv._internal_kv_put(key, value, overwrite=True, namespace=PROGRESS_NAMESPACE)
    except Exception:  # progress is a courtesy: never fail a download over it
        logger.debug("could not publish download progress", exc_info=True)


class _ByteCount:
    """Bytes fetched by parallel downloads, reported at most once a second."""

    def __init__(self, total: int, progress: Optional[Progress]):
        import fsspec.callbacks

        self._callback_class = fsspec.callbacks.Callback
        self.total, self.done = total, 0
        self._progress = progress
        self._lock = threading.Lock()
        self._reported_at = 0.0

    def callback(self) -> Any:
        counter = self

        class Counting(self._callback_class):
            def relative_update(self, inc: int = 1) -> None:
                super().relative_update(inc)
                counter.add(inc)

        return Counting()

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
        self.report()

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._progress is not None and (force or now - self._reported_at >= 1.0):
            self._reported_at = now
            self._progress(self.done, self.total)


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path in it (anonymous@ reads a public bucket unsigned)."""
    import fsspec

    scheme, has_scheme, rest = url.partition("://")
    if has_scheme and rest.startswith(ANONYMOUS) and scheme in ("s3", "gs", "gcs"):
        options = {"anon": True} if scheme == "s3" else {"token": "anon"}
        return _filesystem_class(scheme)(**options), rest[len(ANONYMOUS) :].rstrip("/")
    if has_scheme and scheme not in ("file", "local"):
        _filesystem_class(scheme)  # says which package a scheme needs
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def _filesystem_class(scheme: str) -> Any:
    import fsspec

    try:
        return fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfss": "adlfs", "azure": "adlfs"}.get(scheme, "an fsspec driver")
        raise ConfigError(f"{scheme}:// folders need the {package} package: pip install {package}") from exc


def protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _version_tag(entry: dict[str, Any]) -> Any:
    for key in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified"):
        if entry.get(key) is not None:
            return str(entry[key])
    return None


def _read_manifest(folder: Path) -> dict[str, list]:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _place(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
