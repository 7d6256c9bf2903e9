"""The embedded default store: one directory on disk.

Layout, per task `ROOT/<task_id>/`:
- `<version>.<digest>.safetensors`: one file per kept version, the highest
  the latest (digest: sha256 of its bytes, see store.py), so one directory
  listing tells every kept prompt's identity;
  stores written before digests were named `<version>.safetensors`, and those
  files are still read (their digest is computed from their bytes);
- `.version`: the highest version given before the last delete, so versions
  never repeat after a delete (the high-water mark is the larger of it and the
  versions of the files present);
- `.lock`: a per-task `flock` that serialises writes, also across processes
  sharing the directory.

A put publishes with ONE rename: the bytes go to a temporary file (`.tmp-*`),
which is fsynced, renamed to its final name, and the directory fsynced. Any
failure before the end removes what it made, so the previous version stays
whole and served; versions past keep_versions are removed only afterwards. Temporary files
left by a killed server are removed when the store is next opened.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .artifact import read_header, summarize
from .check import damaged
from .errors import ArtifactError, StoredPromptDamaged, StoreOutcomeUnknown, StoreUnavailable
from .store import (
    DEFAULT_KEEP_VERSIONS,
    PromptIdentity,
    PromptStore,
    StoredPrompt,
    check_keep_versions,
    check_task_id,
    digest_of,
    is_task_id,
)

_SUFFIX = ".safetensors"
_TEMPORARY = ".tmp-"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _File:
    """One version's file in a task folder."""

    name: str
    version: int
    digest: str | None  # None for a file named before digests were


def _parse(name: str) -> _File | None:
    if not name.endswith(_SUFFIX):
        return None
    version, _, digest = name[: -len(_SUFFIX)].partition(".")
    if not version.isdigit() or (digest and len(digest) != 64):
        return None
    return _File(name, int(version), digest or None)


def _files(d: Path) -> list[_File]:
    """The version files in task folder `d`, oldest first; [] when there is no folder."""
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    return sorted((f for f in map(_parse, names) if f is not None), key=lambda f: f.version)


def _summarize(stored: StoredPrompt) -> dict:
    """The summary of a stored version: one whose header does not parse is damaged (a 503, not the client's 422)."""
    try:
        return summarize(stored.task_id, stored.version, read_header(stored.data))
    except ArtifactError as e:
        raise damaged(stored, f"it is not a valid artifact: {e}") from None


def _pick(files: list[_File], version: int | None) -> _File | None:
    """The latest of `files` (None: version), or the one of `version`; None if absent."""
    if version is None:
        return files[-1] if files else None
    return next((f for f in files if f.version == version), None)


def _write_file(path: Path, data: bytes) -> None:
    """`path` ends up either unchanged or holding all of `data`, fsynced; no
    temporary file is left either way."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TEMPORARY)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sync_dir(d: Path) -> None:
    """Make the renames and removals in `d` durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskStore(PromptStore):
    def __init__(self, root: str | os.PathLike, keep_versions: int = DEFAULT_KEEP_VERSIONS):
        self.root = Path(root)
        self.keep_versions = check_keep_versions(keep_versions)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

    def _dir(self, task_id: str) -> Path:
        return self.root / check_task_id(task_id)

    @contextmanager
    def _faults(self, action: str):
        """A filesystem error becomes StoreUnavailable (503). Its message goes to
        clients, so it names no path; the log has the whole error."""
        try:
            yield
        except OSError as e:
            log.error("prompt store %s: cannot %s: %s", self.root, action, e)
            raise StoreUnavailable(f"the prompt store cannot {action}: {e.strerror or type(e).__name__}") from None

    @contextmanager
    def _locked(self, task_id: str):
        d = self._dir(task_id)
        if not d.is_dir():
            d.mkdir(exist_ok=True)
            _sync_dir(self.root)  # a first upload's 201 must survive a crash: its folder too
        with open(d / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield d
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def _high_water(d: Path, files: list[_File]) -> int:
        try:
            recorded = int((d / ".version").read_text())
        except (FileNotFoundError, ValueError):
            recorded = 0
        return max([recorded, *(f.version for f in files)])

    def _remove_stale_temporaries(self) -> None:
        """Remove `.tmp-*` files of uploads that were killed midway. A put holds its
        task's lock while its temporary file exists, so a task whose lock is free
        has no upload in flight (not even one by another server sharing this
        directory); a locked task is left alone. Never stops the store opening."""
        try:
            tasks = [e.name for e in os.scandir(self.root) if e.is_dir() and is_task_id(e.name)]
        except OSError as e:
            log.warning("prompt store %s: cannot look for temporary files: %s", self.root, e)
            return
        for task_id in tasks:
            d = self.root / task_id
            try:
                if not any(n.startswith(_TEMPORARY) for n in os.listdir(d)):
                    continue
                with open(d / ".lock", "a") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # an upload is in flight
                    try:
                        for name in os.listdir(d):
                            if name.startswith(_TEMPORARY):
                                (d / name).unlink(missing_ok=True)
                                log.info("prompt store: removed %s, left by an interrupted upload", d / name)
                    finally:
                        fcntl.flock(f, fcntl.LOCK_UN)
            except OSError as e:
                log.warning("prompt store %s: cannot remove temporary files: %s", d, e)

    # -- writes ------------------------------------------------------------

    def put(self, task_id: str, data: bytes) -> dict:
        header = read_header(data)
        summary = summarize(task_id, 0, header)
        digest = digest_of(data)
        with self._faults("store the upload"), self._locked(task_id) as d:
            files = _files(d)
            latest = files[-1] if files else None
            if latest is not None and latest.digest in (None, digest) and (d / latest.name).read_bytes() == data:
                return {**summary, "version": latest.version}  # these bytes are already the latest version
            version = self._high_water(d, files) + 1
            path = d / f"{version}.{digest}{_SUFFIX}"
            _write_file(path, data)
            try:
                _sync_dir(d)
            except OSError:
                self._take_back(path)
                raise
            for old in files[: max(0, len(files) - (self.keep_versions - 1))]:  # oldest first: what is left is
                try:  # always the newest
                    (d / old.name).unlink(missing_ok=True)
                except OSError as e:
                    log.warning("prompt store: cannot remove the old version %s: %s", d / old.name, e)
                    break
        return {**summary, "version": version}

    @staticmethod
    def _take_back(path: Path) -> None:
        """Unpublish a new version that is not known to be durable."""
        try:
            path.unlink()
        except OSError:
            raise StoreOutcomeUnknown(
                "the prompt store failed while publishing the upload and could not undo it: "
                "the outcome is unknown; uploading the same bytes again is safe"
            ) from None

    def delete(self, task_id: str) -> bool:
        return self._remove(task_id, None)

    def drop_version(self, task_id: str, version: int) -> bool:
        return self._remove(task_id, version)

    def _remove(self, task_id: str, version: int | None) -> bool:
        """Remove every version (None), or one."""
        with self._faults("delete the task" if version is None else "remove the version"):
            if not self._dir(task_id).is_dir():
                return False
            with self._locked(task_id) as d:
                files = _files(d)
                gone = files if version is None else [f for f in files if f.version == version]
                if not gone:
                    return False
                high_water = self._high_water(d, files)
                _write_file(d / ".version", str(high_water).encode())  # versions never repeat
                _sync_dir(d)
                for f in gone:  # newest last: a failure here leaves the task as it was
                    (d / f.name).unlink()
                try:
                    _sync_dir(d)
                except OSError as e:
                    log.error("prompt store %s: a removal is not known to be durable: %s", self.root, e)
                    raise StoreOutcomeUnknown(
                        f"task {task_id!r} was removed, but the prompt store could not make that durable: "
                        "it may come back after a crash; deleting it again is safe"
                    ) from None
        return True

    # -- reads -------------------------------------------------------------

    def _read(self, task_id: str, version: int | None = None) -> tuple[StoredPrompt | None, list[_File]]:
        """The latest version (or `version`), and the listing it was found in."""
        d = self._dir(task_id)
        # A concurrent put may remove the file between listing and reading: retry.
        for _ in range(5):
            files = _files(d)
            found = _pick(files, version)
            if found is None:
                return None, files
            try:
                data = (d / found.name).read_bytes()
            except FileNotFoundError:
                continue
            return StoredPrompt(task_id, found.version, data, found.digest or digest_of(data)), files
        raise StoreUnavailable(f"task {task_id!r} kept changing while being read")

    def get(self, task_id: str, version: int | None = None) -> StoredPrompt | None:
        with self._faults("read the task"):
            return self._read(task_id, version)[0]

    def identity(self, task_id: str, version: int | None = None) -> PromptIdentity | None:
        with self._faults("read the task"):
            found = _pick(_files(self._dir(task_id)), version)
            if found is not None and found.digest is not None:
                return PromptIdentity(found.version, found.digest)
            stored = self._read(task_id, version)[0]  # no file, or one named before digests were
            return None if stored is None else stored.identity

    def _summary(self, task_id: str) -> dict | None:
        stored, files = self._read(task_id)
        if stored is None:
            return None
        versions = [f.version for f in reversed(files) if f.version <= stored.version]
        return {**_summarize(stored), "versions": versions}

    def summary(self, task_id: str) -> dict | None:
        with self._faults("read the task"):
            return self._summary(task_id)

    def versions(self, task_id: str) -> list[dict] | None:
        """A version removed while this reads (pushed out by a put) is left out, and so is a
        damaged one (logged; `ptserve store check` reports it)."""
        out = []
        with self._faults("read the task"):
            files = _files(self._dir(task_id))
            for f in reversed(files):
                stored = self._read(task_id, f.version)[0]
                if stored is None:
                    continue
                try:
                    out.append(_summarize(stored))
                except StoredPromptDamaged:  # logged where it is raised
                    continue
        return out if files else None

    def task_ids(self) -> list[str]:
        with self._faults("list the tasks"):
            return sorted(e.name for e in os.scandir(self.root) if e.is_dir() and is_task_id(e.name) and _files(e.path))

    def kept_versions(self, task_id: str) -> list[int]:
        with self._faults("read the task"):
            return [f.version for f in reversed(_files(self._dir(task_id)))]

    def list(self) -> list[dict]:
        """Every task; entries that are not task directories (lost+found, a
        corrupt file) are logged and skipped, so one bad entry hides no others."""
        out = []
        with self._faults("list the tasks"):
            entries = sorted(self.root.iterdir())
        for d in entries:
            try:
                if not d.is_dir() or not is_task_id(d.name):
                    continue
                s = self._summary(d.name)
            except (ArtifactError, StoredPromptDamaged, OSError) as e:
                log.warning("prompt store: skipping %s: %s", d, e)
                continue
            if s is not None:
                out.append(s)
        return out

    def ping(self) -> None:
        with self._faults("be reached"):
            writable = os.access(self.root, os.W_OK)
        if not writable:
            log.error("prompt store %s is not writable", self.root)
            raise StoreUnavailable("the prompt store's directory is not writable")
