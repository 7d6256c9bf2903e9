"""The embedded default store: one directory on disk.

Layout: `ROOT/<task_id>/<version>.safetensors` (the latest version only) and
`ROOT/<task_id>/.version` (the highest version ever given, kept after a delete so
versions never repeat). Writes go to a temporary file that is fsynced and then
renamed over, so a crash leaves either the old or the new file, never half of one.
A per-task `flock` serialises puts, also across processes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .artifact import read_header, summarize
from .errors import ArtifactError, StoreUnavailable
from .store import PromptStore, StoredPrompt, check_task_id, is_task_id

_SUFFIX = ".safetensors"
log = logging.getLogger(__name__)


class DiskStore(PromptStore):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, task_id: str) -> Path:
        return self.root / check_task_id(task_id)

    @contextmanager
    def _locked(self, task_id: str):
        d = self._dir(task_id)
        d.mkdir(exist_ok=True)
        with open(d / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield d
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def _versions(d: Path) -> list[int]:
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        return sorted(int(n[: -len(_SUFFIX)]) for n in names if n.endswith(_SUFFIX) and n[: -len(_SUFFIX)].isdigit())

    @staticmethod
    def _high_water(d: Path) -> int:
        try:
            return int((d / ".version").read_text())
        except (FileNotFoundError, ValueError):
            return 0

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def put(self, task_id: str, data: bytes) -> dict:
        header = read_header(data)
        summary = summarize(task_id, 0, header)
        try:
            with self._locked(task_id) as d:
                old = self._versions(d)
                version = max([self._high_water(d), *old]) + 1
                self._write_atomic(d / f"{version}{_SUFFIX}", data)
                self._write_atomic(d / ".version", str(version).encode())
                for v in old:
                    (d / f"{v}{_SUFFIX}").unlink(missing_ok=True)
        except OSError as e:  # disk full, permissions: nothing half-written, say why
            raise StoreUnavailable(f"prompt directory {self.root}: cannot write: {e}") from None
        return {**summary, "version": version}

    def _latest(self, task_id: str) -> tuple[int, Path] | None:
        d = self._dir(task_id)
        versions = self._versions(d)
        return (versions[-1], d / f"{versions[-1]}{_SUFFIX}") if versions else None

    def get(self, task_id: str) -> StoredPrompt | None:
        # A concurrent put may remove the file between listing and reading: retry.
        for _ in range(5):
            latest = self._latest(task_id)
            if latest is None:
                return None
            try:
                return StoredPrompt(task_id, latest[0], latest[1].read_bytes())
            except FileNotFoundError:
                continue
        raise StoreUnavailable(f"task {task_id!r} kept changing while being read")

    def version(self, task_id: str) -> int | None:
        latest = self._latest(task_id)
        return latest[0] if latest else None

    def summary(self, task_id: str) -> dict | None:
        stored = self.get(task_id)
        return summarize(task_id, stored.version, read_header(stored.data)) if stored else None

    def list(self) -> list[dict]:
        """Every task; entries that are not task directories (lost+found, a
        corrupt file) are logged and skipped, so one bad entry hides no others."""
        out = []
        for d in sorted(self.root.iterdir()):
            if not d.is_dir() or not is_task_id(d.name):
                continue
            try:
                s = self.summary(d.name)
            except (ArtifactError, OSError) as e:
                log.warning("prompt store: skipping %s: %s", d, e)
                continue
            if s is not None:
                out.append(s)
        return out

    def delete(self, task_id: str) -> bool:
        d = self._dir(task_id)
        if not d.exists():
            return False
        with self._locked(task_id) as d:
            versions = self._versions(d)
            for v in versions:
                (d / f"{v}{_SUFFIX}").unlink(missing_ok=True)
        return bool(versions)

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StoreUnavailable(f"prompt directory {self.root} is not writable")
