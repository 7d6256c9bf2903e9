"""A damaged stored prompt over HTTP: the store's fault (503, logged with task and
version), not the client's 422; uploading the same artifact again repairs it."""

import logging
from pathlib import Path

import httpx
import pytest
import redis

from prompt_store.artifact import artifact_bytes
from ptcore.model import load_model
from server.api.app import create_app
from server.settings import Settings
from tests.helpers import LiveServer, random_prompt


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_model(str(gpt2_dir), device="cpu", dtype="float32")


@pytest.fixture(params=["disk", "redis"])
def where(request, tmp_path):
    """-> (the store setting, a function that damages task t's latest version)."""
    if request.param == "disk":
        root = tmp_path / "store"

        def truncate():
            path = next((root / "t").glob("*.safetensors"))
            path.write_bytes(path.read_bytes()[:-7])

        return str(root), truncate
    url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/6"  # a logical database of its own
    redis.Redis.from_url(url).flushdb()

    def garbage():
        redis.Redis.from_url(url).hset("ptserve:task:t", "artifact", b"garbage")

    return url, garbage


def test_a_damaged_prompt_is_a_503_and_the_same_upload_repairs_it(gpt2, where, caplog):
    store, damage = where
    settings = Settings(model=gpt2.info["name_or_path"], store=store, max_wait_ms=5)
    original = artifact_bytes(random_prompt(gpt2, "[P:2]{input}", seed=1))
    body = {"input": "hello", "max_new_tokens": 4}
    with LiveServer(create_app(settings, gpt2)) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        assert c.put("/v1/tasks/t", content=original).status_code == 201
        version = c.get("/v1/tasks/t").json()["version"]
        live.app.state.engine.prompts.drop("t")  # the next request reads the store
        damage()
        with caplog.at_level(logging.ERROR, logger="prompt_store.check"):
            r = c.post("/v1/tasks/t/generate", json=body)
        assert r.status_code == 503
        assert r.json()["detail"].startswith(f"the stored prompt of task 't' version {version} is damaged (its ")
        assert r.json()["detail"].endswith("upload the artifact again, or run `ptserve store check --repair`")
        assert f"task t version {version} is damaged" in caplog.text
        download = c.get("/v1/tasks/t/artifact")  # never handed out, to be uploaded again as whole
        assert download.status_code == 503 and download.json() == r.json()
        again = c.put("/v1/tasks/t", content=original)
        assert again.status_code == 201 and again.json()["version"] == version + 1
        r = c.post("/v1/tasks/t/generate", json=body)
        assert r.status_code == 200 and r.json()["version"] == version + 1
        assert c.delete("/v1/tasks/t").status_code == 204


def test_a_stored_file_that_does_not_parse_is_a_503_for_its_summary_too(gpt2, tmp_path):
    settings = Settings(model=gpt2.info["name_or_path"], store=str(tmp_path / "store"))
    with LiveServer(create_app(settings, gpt2)) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        assert c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))).status_code == 201
        path = next(Path(tmp_path / "store" / "t").glob("*.safetensors"))
        path.write_bytes(b"garbage")
        r = c.get("/v1/tasks/t")
        assert r.status_code == 503
        assert r.json()["detail"] == (
            "the stored prompt of task 't' version 1 is damaged (it is not a valid artifact: not a safetensors file: "
            "fewer than 8 bytes); upload the artifact again, or run `ptserve store check --repair`"
        )
        assert c.get("/v1/tasks").json() == []  # the list skips it, and shows the others
