"""Damaged stored artifacts (a truncated file on disk, garbage written into Redis):
found by their recorded digest, a store fault and not the client's, repaired by
uploading the same bytes again, and found and removed by `store check`."""

import subprocess
import sys

import pytest

from prompt_store.check import check_store, load_stored
from prompt_store.disk_store import DiskStore
from prompt_store.errors import StoredPromptDamaged, StoreUnavailable
from tests.helpers import fill_of, filled_artifact

TRUNCATED = "its {n} bytes do not match the sha256 recorded when it was stored"


def damage(store, task_id: str, version: int) -> int:
    """Damage one stored version as a failing disk or a stray HSET would; -> its damaged length."""
    if isinstance(store, DiskStore):
        path = next((store.root / task_id).glob(f"{version}.*.safetensors"))
        data = path.read_bytes()[:-7]  # truncated: the header still parses
        path.write_bytes(data)
        return len(data)
    field = "artifact" if store.version(task_id) == version else f"v{version}:artifact"
    store._redis.hset(f"{store.prefix}:task:{task_id}", field, b"garbage")
    return len(b"garbage")


def test_a_damaged_version_is_found_by_its_digest(store):
    store.put("t", filled_artifact(1.0))
    n = damage(store, "t", 1)
    with pytest.raises(StoredPromptDamaged) as caught:
        load_stored(store.get("t"), 1 << 20)
    assert caught.value.why == TRUNCATED.format(n=n)
    assert str(caught.value) == (
        f"the stored prompt of task 't' version 1 is damaged ({TRUNCATED.format(n=n)}); upload the artifact again, "
        "or run `ptserve store check --repair`"
    )
    assert isinstance(caught.value, StoreUnavailable)  # a 503, as every store fault


def test_uploading_the_same_bytes_again_repairs_a_damaged_task(store):
    original = filled_artifact(1.0)
    assert store.put("t", original)["version"] == 1
    assert store.put("t", original)["version"] == 1  # whole: no new version
    damage(store, "t", 1)
    assert store.put("t", original)["version"] == 2  # damaged: stored again
    stored = store.get("t")
    assert stored.data == original and fill_of(stored) == 1.0
    assert load_stored(stored, 1 << 20).embeddings.shape == (2, 4)  # whole: it loads


def test_check_finds_the_damaged_versions_and_repair_removes_them(open_store):
    store = open_store(keep_versions=3)
    for fill in (1.0, 2.0, 3.0):
        store.put("a", filled_artifact(fill))
    store.put("b", filled_artifact(9.0))
    store.put("whole", filled_artifact(5.0))
    n3, n1, nb = damage(store, "a", 3), damage(store, "a", 1), damage(store, "b", 1)
    said = []
    found = check_store(store, say=said.append)
    assert [(d.task_id, d.version, d.why) for d in found] == [
        ("a", 3, TRUNCATED.format(n=n3)), ("a", 1, TRUNCATED.format(n=n1)), ("b", 1, TRUNCATED.format(n=nb))
    ]  # fmt: skip
    assert said[-1] == "checked 5 stored versions: 3 damaged"
    assert store.kept_versions("a") == [3, 2, 1]  # only reported

    said.clear()
    assert len(check_store(store, repair=True, say=said.append)) == 3
    assert said == [
        f"damaged: task a version 3: {TRUNCATED.format(n=n3)}",
        "removed task a version 3; it now serves version 2",
        f"damaged: task a version 1: {TRUNCATED.format(n=n1)}",
        "removed task a version 1; it now serves version 2",
        f"damaged: task b version 1: {TRUNCATED.format(n=nb)}",
        "removed task b version 1; no version is left: task gone",
        "checked 5 stored versions: 3 damaged, removed",
    ]
    assert store.kept_versions("a") == [2] and fill_of(store.get("a")) == 2.0
    assert store.get("b") is None and store.task_ids() == ["a", "whole"]
    assert store.put("a", filled_artifact(4.0))["version"] == 4  # numbers never repeat
    assert check_store(store, say=said.append) == [] and said[-1] == "checked 3 stored versions: 0 damaged"


def test_dropping_a_version_that_is_not_kept_changes_nothing(store):
    store.put("t", filled_artifact(1.0))
    assert store.drop_version("t", 7) is False and store.drop_version("nope", 1) is False
    assert store.kept_versions("t") == [1]


def test_the_store_check_command_reports_then_repairs(tmp_path):
    store = DiskStore(tmp_path / "store")
    store.put("t", filled_artifact(1.0))
    store.put("t", filled_artifact(2.0))
    n = damage(store, "t", 2)
    command = [sys.executable, "-m", "server.cli", "store", "check", "--store", str(tmp_path / "store")]
    found = subprocess.run(command, capture_output=True, text=True)
    assert found.returncode == 1, found.stderr
    assert found.stdout.splitlines() == [
        f"damaged: task t version 2: {TRUNCATED.format(n=n)}",
        "checked 2 stored versions: 1 damaged",
        "run again with --repair to remove them, or upload the damaged tasks' artifacts again",
    ]
    repaired = subprocess.run([*command, "--repair"], capture_output=True, text=True)
    assert repaired.returncode == 0, repaired.stderr
    assert repaired.stdout.splitlines()[1:] == [
        "removed task t version 2; it now serves version 1",
        "checked 2 stored versions: 1 damaged, removed",
    ]
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    assert fill_of(store.get("t")) == 1.0


def test_a_damaged_version_is_left_out_of_the_versions_and_a_missing_one_is_still_a_404(tmp_path):
    from ptcore.errors import TaskNotFound
    from server.prompt_cache import not_found

    store = DiskStore(tmp_path, keep_versions=3)
    for fill in (1.0, 2.0, 3.0):
        store.put("t", filled_artifact(fill))
    for version in (3, 1):
        path = next((tmp_path / "t").glob(f"{version}.*.safetensors"))
        path.write_bytes(b"garbage")
    assert [s["version"] for s in store.versions("t")] == [2]
    error = not_found(store, "t", 7)
    assert isinstance(error, TaskNotFound)
    assert str(error) == "task 't' has no version 7: the store keeps versions 3, 2, 1 (newest first)"
