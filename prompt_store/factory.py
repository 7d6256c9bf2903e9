"""Opening the store a URL names. Apart from the store interface
(prompt_store/store.py), which both backends import."""

from __future__ import annotations

from .fine_tuning_store import FineTuningStore
from .store import DEFAULT_KEEP_VERSIONS, PromptStore

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")


def open_store(url: str, keep_versions: int = DEFAULT_KEEP_VERSIONS) -> PromptStore:
    """`redis://...` / `rediss://...` / `redis+sentinel://...` -> Redis; anything
    else is a directory path. `keep_versions`: per task, the latest included."""
    if url.startswith(REDIS_SCHEMES):
        from .redis_store import RedisStore

        return RedisStore(url, keep_versions=keep_versions)
    from .disk_store import DiskStore

    return DiskStore(url, keep_versions)


def open_fine_tuning_store(url: str) -> FineTuningStore:
    """Fine-tuning files and jobs beside the prompts of the store at `url`."""
    if url.startswith(REDIS_SCHEMES):
        from .redis_fine_tuning_store import RedisFineTuningStore

        return RedisFineTuningStore(url)
    from .fine_tuning_store import DiskFineTuningStore

    return DiskFineTuningStore(url)
