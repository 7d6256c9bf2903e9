"""`ptserve serve --preload DIR`: a folder of artifacts becomes tasks at startup."""

import httpx
import pytest
from pydantic import ValidationError

from prompt_store.artifact import artifact_bytes, make_artifact
from ptcore.model import load_model
from server.api.app import create_app
from server.settings import Settings
from tests.helpers import LiveServer, random_prompt


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_model(str(gpt2_dir), device="cpu", dtype="float32")


def serve(loaded, store, folder):
    settings = Settings(model=loaded.info["name_or_path"], store=str(store), preload=str(folder))
    return LiveServer(create_app(settings, loaded))


def test_preloaded_tasks_are_served_and_a_restart_makes_no_new_version(gpt2, tmp_path):
    folder = tmp_path / "examples"
    folder.mkdir()
    (folder / "greet.safetensors").write_bytes(artifact_bytes(random_prompt(gpt2, "[P:2]{input}[P:2]")))
    theirs = random_prompt(gpt2, "[P:2]{input}")
    other = make_artifact(theirs.embeddings, template=theirs.meta["template"], task_type="generate",
                          base_model={**gpt2.info, "fingerprint": "0" * 64})  # fmt: skip
    (folder / "other-model.safetensors").write_bytes(artifact_bytes(other))
    (folder / "notes.txt").write_text("not an artifact")
    for _ in range(2):  # the second start finds the same bytes stored
        with serve(gpt2, tmp_path / "store", folder) as server, httpx.Client(base_url=server.url) as c:
            assert [t["task_id"] for t in c.get("/v1/tasks").json()] == ["greet"]
            assert c.get("/v1/tasks/greet").json()["version"] == 1
            r = c.post("/v1/tasks/greet/generate", json={"input": "hello", "max_new_tokens": 3})
            assert r.status_code == 200 and len(r.json()["token_ids"]) == 3
            assert c.get("/v1/tasks/other-model").status_code == 404  # refused: trained on other weights


def test_preload_must_name_a_folder(gpt2, tmp_path):
    with pytest.raises(ValidationError, match="not a directory"):
        Settings(model="m", preload=str(tmp_path / "missing"))
