"""One suite, run against both backends: a directory on disk and a real redis-server
(the `store` fixture: tests/prompt_store/conftest.py)."""

import threading
from pathlib import Path

import pytest

from prompt_store.artifact import read_artifact
from prompt_store.disk_store import DiskStore
from prompt_store.errors import ArtifactError, InvalidTaskId
from tests.helpers import fill_of, filled_artifact


def test_put_get_versions(store):
    assert store.get("t") is None and store.version("t") is None and store.summary("t") is None
    s1 = store.put("t", filled_artifact(1.0))
    assert s1["version"] == 1 and s1["task_id"] == "t" and s1["num_virtual_tokens"] == 2
    s2 = store.put("t", filled_artifact(2.0))  # overwrite makes a new version
    assert s2["version"] == 2
    got = store.get("t")
    assert got.version == 2 and fill_of(got) == 2.0 and store.version("t") == 2
    assert store.summary("t")["version"] == 2 and store.summary("t")["template"] == "[P:2]{input}"


def test_list_and_delete(store):
    store.put("b", filled_artifact(1.0))
    store.put("a", filled_artifact(1.0))
    store.put("a", filled_artifact(3.0))
    assert [(s["task_id"], s["version"]) for s in store.list()] == [("a", 2), ("b", 1)]
    assert store.delete("a") is True
    assert store.delete("a") is False
    assert store.get("a") is None and [s["task_id"] for s in store.list()] == ["b"]
    # versions keep growing after a delete, so a cached (task, version) never names two prompts
    assert store.put("a", filled_artifact(4.0))["version"] == 3


@pytest.mark.parametrize("bad", ["../x", "", "x" * 200, "a/b", "..", ".", "tâche", "a b"])
def test_invalid_task_ids(store, bad):
    ops = (store.get, store.version, store.summary, store.delete, lambda t: store.put(t, filled_artifact(1.0)))
    for op in ops:
        with pytest.raises(InvalidTaskId):
            op(bad)
    assert store.list() == []


def test_longest_valid_id(store):
    tid = "A-z_0.9" + "x" * 121
    assert len(tid) == 128 and store.put(tid, filled_artifact(1.0))["version"] == 1


def test_put_refuses_bytes_that_are_not_an_artifact(store):
    with pytest.raises(ArtifactError):
        store.put("t", b"not safetensors at all")
    assert store.get("t") is None and store.list() == []


def test_concurrent_puts_get_distinct_versions(store):
    versions, errors = [], []

    def put(i):
        try:
            versions.append(store.put("c", filled_artifact(float(i)))["version"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(versions) == list(range(1, 17))
    latest = store.get("c")
    assert latest.version == 16
    read_artifact(latest.data)  # the latest file is whole


def test_disk_store_leaves_no_temporary_files(tmp_path):
    s = DiskStore(tmp_path, keep_versions=2)
    for i in range(3):
        s.put("t", filled_artifact(float(i)))
    digests = [s.get("t", v).digest for v in (2, 3)]
    names = [".lock", f"2.{digests[0]}.safetensors", f"3.{digests[1]}.safetensors"]
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == names


def test_disk_listing_skips_entries_that_are_not_tasks(tmp_path):
    s = DiskStore(tmp_path)
    s.put("good", filled_artifact(1.0))
    s.put("broken", filled_artifact(1.0))
    (tmp_path / "lost+found").mkdir()  # the root of a mounted ext4 volume has one
    (tmp_path / "stray.txt").write_text("x")
    for f in (tmp_path / "broken").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    assert [t["task_id"] for t in s.list()] == ["good"]


def test_a_disk_upload_killed_midway_leaves_the_previous_version(tmp_path):
    """A child process is killed (SIGKILL) while writing version 2: version 1
    stays whole and served, and the store keeps working."""
    import signal
    import subprocess
    import sys

    store = DiskStore(tmp_path)
    store.put("t", filled_artifact(1.0))
    child = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from prompt_store.disk_store import DiskStore
from tests.helpers import filled_artifact
os.fsync = lambda fd: (print("writing", flush=True), time.sleep(60))  # stall with the new file half-done
DiskStore({str(tmp_path)!r}).put("t", filled_artifact(2.0))
"""], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    got = store.get("t")
    assert got.version == 1 and fill_of(got) == 1.0
    assert [s["version"] for s in store.list()] == [1]
    # the killed write never reached a version number: the next put is version 2
    assert store.put("t", filled_artifact(3.0))["version"] == 2 and fill_of(store.get("t")) == 3.0


def lose_everything(store, tmp_path):
    """What a restarted, empty Redis or a re-created task folder looks like."""
    import shutil

    if isinstance(store, DiskStore):
        shutil.rmtree(store.root / "t")
    else:
        for key in store._redis.scan_iter(f"{store.prefix}:*"):
            store._redis.delete(key)


def test_a_store_that_lost_its_data_gives_a_new_identity(store, tmp_path):
    """Versions restart at 1 after the data is lost: (version, digest), never the
    version alone, tells two prompts apart."""
    store.put("t", filled_artifact(1.0))
    before = store.identity("t")
    assert before.version == 1 and store.get("t").digest == before.digest
    lose_everything(store, tmp_path)
    assert store.identity("t") is None
    assert store.put("t", filled_artifact(2.0))["version"] == 1
    after = store.identity("t")
    assert after.version == 1 and after != before
    got = store.get("t")
    assert (got.version, got.digest) == (after.version, after.digest) and fill_of(got) == 2.0


def test_the_same_bytes_again_make_no_new_version(store):
    """Re-uploading the current version's exact bytes is a no-op (a retry after an
    unknown outcome is safe); other bytes, or older ones, make a new version."""
    assert store.put("t", filled_artifact(1.0))["version"] == 1
    assert store.put("t", filled_artifact(1.0))["version"] == 1
    assert store.put("t", filled_artifact(2.0))["version"] == 2
    assert store.put("t", filled_artifact(1.0))["version"] == 3
    assert store.version("t") == 3 and fill_of(store.get("t")) == 1.0
