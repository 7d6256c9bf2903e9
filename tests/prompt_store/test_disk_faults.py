"""The disk store under faults: a full disk at every step of a write, an
unreadable store, and temporary files left by a killed upload."""

import errno
import fcntl
import os
import tempfile

import pytest

from prompt_store.disk_store import DiskStore
from prompt_store.errors import StoreOutcomeUnknown, StoreUnavailable
from tests.helpers import deny, fill_of, filled_artifact

# the filesystem calls a write is made of; each may fail with ENOSPC
WRITE_CALLS = ("open", "write", "fsync", "replace", "rename")


def snapshot(root):
    """Every file under root with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def without_high_water(files: dict) -> dict:
    return {name: content for name, content in files.items() if not name.endswith("/.version")}


def count_calls(monkeypatch, action) -> dict[str, int]:
    """How many times `action` calls each of WRITE_CALLS."""
    counts = dict.fromkeys(WRITE_CALLS, 0)
    for name in WRITE_CALLS:
        real = getattr(os, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, counted)
    action()
    monkeypatch.undo()
    return counts


def fail_nth(monkeypatch, name: str, n: int) -> None:
    """Make the n-th call (1-based) of os.<name> raise ENOSPC."""
    real, seen = getattr(os, name), [0]

    def failing(*args, **kwargs):
        seen[0] += 1
        if seen[0] == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, failing)


def stages(prepare, action):
    """(call, n) for every filesystem call that `action` makes on a store set up by `prepare`."""
    import _pytest.monkeypatch

    with tempfile.TemporaryDirectory() as tmp:
        store = DiskStore(tmp)
        prepare(store)
        counts = count_calls(_pytest.monkeypatch.MonkeyPatch(), lambda: action(store))
    return [(name, n) for name, c in counts.items() for n in range(1, c + 1)]


def put_v1(store):
    store.put("t", filled_artifact(1.0))


def put_v2(store):
    return store.put("t", filled_artifact(2.0))


def latest(store):
    stored = store.get("t")
    return stored and (stored.version, stored.data)


@pytest.mark.parametrize("call,n", stages(put_v1, put_v2))
def test_a_full_disk_at_any_step_of_an_upload_changes_nothing(tmp_path, monkeypatch, call, n):
    store = DiskStore(tmp_path)
    put_v1(store)
    before, served = snapshot(tmp_path), latest(store)
    fail_nth(monkeypatch, call, n)
    with pytest.raises(StoreUnavailable) as e:
        put_v2(store)
    monkeypatch.undo()
    assert latest(store) == served, "a failed upload is served"
    assert snapshot(tmp_path) == before, "a failed upload left something behind"
    assert put_v2(store)["version"] == 2, "the failed upload used up a version number"
    assert "No space left" in str(e.value) and str(tmp_path) not in str(e.value)


@pytest.mark.parametrize("call,n", stages(put_v1, lambda store: store.delete("t")))
def test_a_full_disk_during_a_delete_keeps_the_task(tmp_path, monkeypatch, call, n):
    store = DiskStore(tmp_path)
    put_v1(store)
    before, served = without_high_water(snapshot(tmp_path)), latest(store)
    fail_nth(monkeypatch, call, n)
    try:
        store.delete("t")
    except StoreOutcomeUnknown:  # removed, but not known to be on disk: the answer says so
        monkeypatch.undo()
        assert store.get("t") is None and put_v2(store)["version"] == 2
        return
    except StoreUnavailable:
        pass
    else:
        pytest.fail("a delete whose filesystem call failed reported success")
    monkeypatch.undo()
    # the task is whole; the high-water mark (.version) may already say its version
    assert without_high_water(snapshot(tmp_path)) == before and latest(store) == served
    assert store.delete("t") is True and store.get("t") is None
    assert put_v2(store)["version"] == 2  # versions never repeat after a delete


def test_an_unreadable_store_raises_store_unavailable_without_paths(tmp_path, monkeypatch):
    store = DiskStore(tmp_path / "prompts")
    store.put("t", filled_artifact(1.0))
    deny(monkeypatch, tmp_path)
    for op in (store.list, lambda: store.get("t"), lambda: store.identity("t"), lambda: store.summary("t"),
               lambda: store.delete("t"), lambda: store.put("t", filled_artifact(2.0)), store.ping):  # fmt: skip
        with pytest.raises(StoreUnavailable) as e:
            op()
        assert str(tmp_path) not in str(e.value) and "Permission denied" in str(e.value)


def test_opening_the_store_removes_temporary_files_of_killed_uploads(tmp_path):
    store = DiskStore(tmp_path)
    store.put("t", filled_artifact(1.0))
    store.put("u", filled_artifact(1.0))
    (tmp_path / "t" / ".tmp-killed").write_bytes(b"half an upload")
    (tmp_path / "u" / ".tmp-in-flight").write_bytes(b"another replica is writing this")
    with open(tmp_path / "u" / ".lock", "a") as lock:  # that replica holds u's lock while it writes
        fcntl.flock(lock, fcntl.LOCK_EX)
        DiskStore(tmp_path)
    assert not (tmp_path / "t" / ".tmp-killed").exists()
    assert (tmp_path / "u" / ".tmp-in-flight").exists()
    assert fill_of(DiskStore(tmp_path).get("t")) == 1.0


def test_a_first_upload_makes_its_task_folder_durable(tmp_path, monkeypatch):
    """The 201 of a task's first upload must survive a crash: the store root,
    which gained the task's folder, is fsynced too."""
    import prompt_store.disk_store as disk_store

    store = DiskStore(tmp_path)
    synced = []
    real = disk_store._sync_dir
    monkeypatch.setattr(disk_store, "_sync_dir", lambda d: synced.append(os.path.realpath(d)) or real(d))
    store.put("fresh", filled_artifact(1.0))
    assert os.path.realpath(tmp_path) in synced
    synced.clear()
    store.put("fresh", filled_artifact(2.0))
    assert os.path.realpath(tmp_path) not in synced  # an existing folder needs no second sync of the root
