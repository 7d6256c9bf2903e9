import pytest

from prompt_store.artifact import artifact_bytes
from prompt_store.disk_store import DiskStore
from ptcore.errors import TaskNotFound
from server.prompt_cache import PromptCache
from tests.helpers import random_prompt


@pytest.fixture
def store(tmp_path):
    return DiskStore(tmp_path)


def put(store, loaded, task, seed):
    store.put(task, artifact_bytes(random_prompt(loaded, "[P:2]{input}", seed=seed)))


def test_lru_eviction_and_reload(store, loaded):
    cache = PromptCache(store, loaded, capacity=2, max_artifact_bytes=1 << 20)
    for i, task in enumerate(["a", "b", "c"]):
        put(store, loaded, task, i)
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is a  # hit
    cache.get("c")  # evicts b, the least recently used
    assert cache.stats() == {"size": 2, "capacity": 2, "hits": 1, "misses": 3, "evictions": 1}
    assert cache.get("b").version == 1 and cache.stats()["evictions"] == 2


def test_a_new_version_replaces_the_cached_one_and_delete_forgets_it(store, loaded):
    cache = PromptCache(store, loaded, capacity=4, max_artifact_bytes=1 << 20)
    put(store, loaded, "t", 1)
    old = cache.get("t")
    put(store, loaded, "t", 2)
    new = cache.get("t")
    assert (old.version, new.version) == (1, 2)
    assert not (old.rows == new.rows).all()
    assert old.rows.device == loaded.device and new.rows.dtype == loaded.dtype
    store.delete("t")
    with pytest.raises(TaskNotFound):
        cache.get("t")
    assert cache.stats()["size"] == 0


def test_a_recreated_task_folder_is_never_served_stale(store, loaded, tmp_path):
    """The task folder is deleted behind the server's back and a different prompt
    uploaded: it is version 1 again, and the cache must serve the new rows."""
    import shutil

    cache = PromptCache(store, loaded, capacity=4, max_artifact_bytes=1 << 20)
    put(store, loaded, "t", 1)
    old = cache.get("t")
    shutil.rmtree(tmp_path / "t")
    put(store, loaded, "t", 2)
    new = cache.get("t")
    assert (old.version, new.version) == (1, 1)
    assert not (old.rows == new.rows).all(), "the cache served the deleted folder's rows"
    assert new.digest == store.get("t").digest != old.digest
    assert cache.get("t") is new  # and it is cached from then on


def test_a_kept_version_is_an_entry_of_its_own_and_delete_forgets_every_version(store, loaded):
    cache = PromptCache(store, loaded, capacity=4, max_artifact_bytes=1 << 20)
    put(store, loaded, "t", 1)
    put(store, loaded, "t", 2)
    old, latest = cache.get("t", 1), cache.get("t")
    assert (old.version, latest.version) == (1, 2) and not (old.rows == latest.rows).all()
    assert cache.get("t", 1) is old and cache.get("t", 2).version == 2 and cache.stats()["size"] == 3
    with pytest.raises(TaskNotFound) as caught:
        cache.get("t", 7)
    assert str(caught.value) == "task 't' has no version 7: the store keeps versions 2, 1 (newest first)"
    store.delete("t")
    with pytest.raises(TaskNotFound):
        cache.get("t")
    assert cache.stats()["size"] == 0  # the kept versions' entries went with the latest's


def test_a_kept_version_whose_bytes_changed_is_reloaded(store, loaded, tmp_path):
    """The folder is re-created behind the server's back: version 1 names other
    rows now, and the pinned entry must not serve the old ones."""
    import shutil

    cache = PromptCache(store, loaded, capacity=4, max_artifact_bytes=1 << 20)
    put(store, loaded, "t", 1)
    put(store, loaded, "t", 2)
    old = cache.get("t", 1)
    shutil.rmtree(tmp_path / "t")
    put(store, loaded, "t", 3)
    new = cache.get("t", 1)
    assert new.version == 1 and new.digest == store.get("t", 1).digest != old.digest
