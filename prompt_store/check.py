"""Checking stored artifacts: a version is whole when its bytes match the digest
recorded with it and parse as an artifact. The server checks each version it
loads (a damaged one is a 503, not the client's 422); `ptserve store check`
checks them all, and with --repair removes the damaged ones."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .artifact import PromptArtifact, read_artifact
from .errors import ArtifactError, StoredPromptDamaged
from .store import PromptStore, StoredPrompt, digest_of

log = logging.getLogger(__name__)


def load_stored(stored: StoredPrompt, max_bytes: int) -> PromptArtifact:
    """The artifact of a stored version; StoredPromptDamaged when it is not whole.
    (PayloadTooLarge when it is whole but over `max_bytes`: a limit, not damage.)"""
    if digest_of(stored.data) != stored.digest:
        raise damaged(stored, f"its {len(stored.data)} bytes do not match the sha256 recorded when it was stored")
    try:
        return read_artifact(stored.data, max_bytes)
    except ArtifactError as e:
        raise damaged(stored, f"it is not a valid artifact: {e}") from None


def damaged(stored: StoredPrompt, why: str) -> StoredPromptDamaged:
    """The 503 for a damaged stored version (logged with its task and version)."""
    log.error("prompt store: task %s version %d is damaged: %s", stored.task_id, stored.version, why)
    error = StoredPromptDamaged(
        f"the stored prompt of task {stored.task_id!r} version {stored.version} is damaged ({why}); upload the "
        "artifact again, or run `ptserve store check --repair`"
    )
    error.why = why
    return error


@dataclass(frozen=True)
class Damage:
    task_id: str
    version: int
    why: str


def check_store(store: PromptStore, repair: bool = False, say: Callable[[str], None] = print) -> list[Damage]:
    """Check every kept version of every task; -> the damaged ones. With `repair`,
    remove them: a task whose latest version goes serves its newest whole one,
    and a task with no whole version left is gone."""
    damaged, checked = [], 0
    for task_id in store.task_ids():
        for version in store.kept_versions(task_id):
            stored = store.get(task_id, version)
            if stored is None:  # removed by a put or delete while this ran
                continue
            checked += 1
            try:
                load_stored(stored, len(stored.data))
            except StoredPromptDamaged as e:
                damaged.append(Damage(task_id, version, e.why))
                say(f"damaged: task {task_id} version {version}: {damaged[-1].why}")
                if repair:
                    store.drop_version(task_id, version)
                    latest = store.version(task_id)
                    now = f"it now serves version {latest}" if latest is not None else "no version is left: task gone"
                    say(f"removed task {task_id} version {version}; {now}")
    say(f"checked {checked} stored versions: {len(damaged)} damaged" + (", removed" if repair and damaged else ""))
    return damaged
