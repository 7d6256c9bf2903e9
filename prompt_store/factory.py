"""Opening the store a URL names. Apart from the store interface
(prompt_store/store.py), which both backends import."""

from __future__ import annotations

from .store import PromptStore


def open_store(url: str) -> PromptStore:
    """`redis://...` / `rediss://...` / `redis+sentinel://...` -> Redis; anything
    else is a directory path."""
    if url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")):
        from .redis_store import RedisStore

        return RedisStore(url)
    from .disk_store import DiskStore

    return DiskStore(url)
