"""Keys and values of each task's static prefix (pseudo tokens and fixed text
before the template's first field), computed once per task version.

Entries are keyed by TaskPrompt.key, (task_id, version, digest of the artifact
bytes): a new upload is never served an old prefix, even when a store that lost
its data gives version 1 again; an evicted entry is simply recomputed.
"""

from __future__ import annotations

from server.engine.kv_cache import SlotKV
from server.lru import LRU

PromptKey = tuple[str, int, str]  # TaskPrompt.key: task_id, version, digest


class PrefixCache(LRU[PromptKey, SlotKV]):
    """One entry per task version; `get` -> its prefix's keys and values, or None."""
