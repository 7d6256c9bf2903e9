"""Fine-tuning on the served model (server/fine_tuning/), through a real server
on loopback and the real `openai` client: files, jobs, events, cancel, the
limits, and a job whose server stopped."""

import json
import time
from types import SimpleNamespace

import httpx
import pytest
from openai import OpenAI, UnprocessableEntityError

from prompt_store.factory import open_fine_tuning_store
from prompt_store.template import parse_template, render
from ptcore.model import load_model
from server.api.app import create_app
from server.fine_tuning.jobs import Jobs
from server.settings import Settings
from tests.helpers import LiveServer, wait_until

TERMINAL = ("succeeded", "failed", "cancelled")


def jsonl(rows) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


GENERATE = jsonl({"input": f"word {i}", "output": f" answer {i % 3}"} for i in range(16))
CLASSIFY = jsonl({"prompt": f"a {'good' if i % 2 else 'bad'} day {i}", "completion": "pos" if i % 2 else "neg"}
                 for i in range(16))  # fmt: skip


@pytest.fixture(scope="module")
def live(tiny_model_dirs, tmp_path_factory):
    model = str(tiny_model_dirs["llama"])
    loaded = load_model(model, device="cpu", dtype="float32")
    settings = Settings(model=model, store=str(tmp_path_factory.mktemp("store")), max_job_example_passes=20_000)
    with LiveServer(create_app(settings, loaded)) as server:
        server.base_model = loaded.info["name_or_path"]
        server.loaded = loaded
        server.client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        yield server


def finished(client, job_id):
    return wait_until(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in TERMINAL and j,
                      f"job {job_id} to end")  # fmt: skip


def test_the_openai_client_uploads_trains_and_gets_the_new_tasks_answer(live):
    client = live.client
    uploaded = client.files.create(file=("train.jsonl", GENERATE), purpose="fine-tune")
    assert (uploaded.object, uploaded.bytes, uploaded.purpose) == ("file", len(GENERATE), "fine-tune")
    assert client.files.content(uploaded.id).content == GENERATE
    assert uploaded.id in [f.id for f in client.files.list().data]
    job = client.fine_tuning.jobs.create(model=live.base_model, training_file=uploaded.id, suffix="echo",
                                         hyperparameters={"n_epochs": 2}, extra_body={"encoder": "mlp"})  # fmt: skip
    assert job.status == "queued" and job.hyperparameters.n_epochs == 2
    done = finished(client, job.id)
    assert (done.status, done.fine_tuned_model, done.error) == ("succeeded", "echo", None)
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data]
    assert messages[0] == "Stored as version 1 of task 'echo'"  # newest first
    assert [m.split(":")[0] for m in messages if m.startswith("epoch")] == ["epoch 2", "epoch 1", "epoch 0"]
    figures = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data if e.type == "metrics"]
    assert [sorted(d) for d in figures] == [  # newest first; each trained epoch: its speed and the job's ETA
        ["dev_loss", "epoch", "estimated_finish", "examples_per_s", "seconds", "train_loss"]] * 2 + [
        ["dev_loss", "epoch", "seconds"]]  # fmt: skip
    assert all(d["examples_per_s"] > 0 and d["estimated_finish"] >= job.created_at for d in figures[:2])
    assert job.id in [j.id for j in client.fine_tuning.jobs.list().data]
    stats = httpx.get(f"{live.url}/v1/stats").json()["fine_tuning"]
    assert stats["running"] is None and stats["training_passes"] > 0 and stats["training_seconds"] > 0
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'ptserve_fine_tuning_jobs{status="running"} 0.0' in metrics
    assert f"ptserve_training_passes_total {float(stats['training_passes'])}" in metrics
    answer = client.completions.create(model="echo", prompt="word 1", max_tokens=4)
    plain = httpx.post(f"{live.url}/v1/tasks/echo/generate", json={"input": "word 1", "max_new_tokens": 4}).json()
    assert answer.choices[0].text == plain["text"] and plain["version"] == 1


def test_a_table_that_does_not_beat_the_current_version_is_not_stored(live):
    f = live.client.files.create(file=("train.jsonl", GENERATE), purpose="fine-tune").id
    jobs = live.client.fine_tuning.jobs

    def job(**hyper):
        return finished(live.client, jobs.create(model=live.base_model, training_file=f, suffix="twice",
                                                 hyperparameters=hyper).id)  # fmt: skip

    first = job(n_epochs=2)
    assert first.fine_tuned_model == "twice" and first.model_extra["ptserve_result"]["beats_current_version"] is None
    second = job(n_epochs=1, learning_rate_multiplier=1e-9)  # the starting table, all but untrained
    result = second.model_extra["ptserve_result"]
    assert (second.status, second.fine_tuned_model) == ("succeeded", None)
    assert (result["promoted"], result["beats_current_version"], result["current_version"]["version"]) == (
        False, False, 1)  # fmt: skip
    assert result["current_version"]["dev_loss"] < result["dev_loss"]
    assert httpx.get(f"{live.url}/v1/tasks/twice").json()["version"] == 1
    assert jobs.list_events(second.id, limit=1).data[0].message == (
        "The new table did not beat version 1 of task 'twice' on the validation data: nothing was stored"
    )


def test_a_job_on_a_task_goes_on_from_its_current_version(live):
    """model = a task id: the table starts at that version's rows (epoch 0 scores
    exactly what the version scored on the same data), with its template and
    labels; the result must beat it, and becomes the next version."""
    f = live.client.files.create(file=("cls.jsonl", CLASSIFY), purpose="fine-tune").id
    jobs = live.client.fine_tuning.jobs
    first = finished(live.client, jobs.create(
        model=live.base_model, training_file=f, validation_file=f, suffix="onward", hyperparameters={"n_epochs": 2},
        extra_body={"labels": {"pos": " good", "neg": " bad"}, "template": "[P:2]{input}[P:1]",
                    "promote": "always"}).id)  # fmt: skip
    assert first.fine_tuned_model == "onward"
    loaded = live.loaded  # trained_tokens: 2 epochs of the 16 rendered inputs
    template = parse_template("[P:2]{input}[P:1]")
    inputs = [json.loads(line)["prompt"] for line in CLASSIFY.decode().splitlines()]
    assert first.trained_tokens == 2 * sum(len(render(template, loaded.tokenizer, {"input": x}, loaded.vocab_size))
                                           for x in inputs)  # fmt: skip
    for key in ("labels", "template", "from_prompt", "task_type"):  # the version fixes them
        r = httpx.post(f"{live.url}/v1/fine_tuning/jobs", json={"model": "onward", "training_file": f, key: "x"})
        assert (r.status_code, r.json()["param"]) == (422, key) and "leave out " + key in r.json()["detail"]
    job = jobs.create(model="onward", training_file=f, validation_file=f, hyperparameters={"n_epochs": 1},
                      extra_body={"promote": "always"})  # no suffix: the task itself  # fmt: skip
    second = finished(live.client, job.id)
    assert (second.status, second.model, second.fine_tuned_model) == ("succeeded", "onward", "onward")
    start = {k[len("start_") :]: v for k, v in second.model_extra["ptserve_result"].items() if k.startswith("start_")}
    best = {k: v for k, v in first.model_extra["ptserve_result"].items() if k in ("dev_loss", "dev_accuracy")}
    assert start == pytest.approx(best, rel=1e-5)  # epoch 0 is version 1
    events = [e.message for e in jobs.list_events(job.id, limit=50).data]
    assert "Going on from version 1 of task 'onward'" in events
    note = "16 dev examples are fewer than 50: too few to pick an epoch; all 1 epochs run and the last is kept"
    assert note in events  # the trainer's note, as an event
    summary = httpx.get(f"{live.url}/v1/tasks/onward").json()
    assert (summary["version"], summary["template"], summary["labels"]) == (
        2, "[P:2]{input}[P:1]", {"pos": " good", "neg": " bad"})  # fmt: skip


def test_a_classify_job_from_openai_prompt_completion_lines(live):
    f = live.client.files.create(file=("cls.jsonl", CLASSIFY), purpose="fine-tune")
    job = live.client.fine_tuning.jobs.create(
        model=live.base_model, training_file=f.id, suffix="mood", hyperparameters={"n_epochs": 1},
        extra_body={"labels": {"pos": " good", "neg": " bad"}, "promote": "always"})  # fmt: skip
    assert finished(live.client, job.id).status == "succeeded"
    summary = httpx.get(f"{live.url}/v1/tasks/mood").json()
    assert (summary["task_type"], summary["labels"]) == ("classify", {"pos": " good", "neg": " bad"})
    scores = httpx.post(f"{live.url}/v1/tasks/mood/classify", json={"input": "a good day"}).json()["scores"]
    assert sorted(scores) == ["neg", "pos"]


def test_a_cancelled_job_stores_nothing(live):
    f = live.client.files.create(file=("train.jsonl", GENERATE), purpose="fine-tune")
    job = live.client.fine_tuning.jobs.create(model=live.base_model, training_file=f.id, suffix="never",
                                              hyperparameters={"n_epochs": 1000})  # fmt: skip
    wait_until(lambda: live.client.fine_tuning.jobs.retrieve(job.id).status == "running", "the job to run")
    assert live.client.fine_tuning.jobs.cancel(job.id).id == job.id
    assert finished(live.client, job.id).status == "cancelled"
    assert httpx.get(f"{live.url}/v1/tasks/never").status_code == 404


@pytest.mark.parametrize(
    "data, purpose, param, message",
    [
        (GENERATE, "assistants", "purpose", "purpose must be 'fine-tune'"),
        (b'{"input": "a", "output": "b"}\n{not json', "fine-tune", "file", "line 2: not valid JSON"),
        (b'{"input": "a", "output": "b"}\n[1, 2]', "fine-tune", "file", "line 2: expected a JSON object"),
        (b'{"input": "a"}', "fine-tune", "file", "line 1: an example needs an input"),
        (b"\n\n", "fine-tune", "file", "the file holds no examples"),
        (b"\xff\xfe", "fine-tune", "file", "the file is not UTF-8 text"),
    ],
)
def test_a_bad_file_is_refused_naming_the_line_and_nothing_is_kept(live, data, purpose, param, message):
    before = httpx.get(f"{live.url}/v1/files").json()["data"]
    r = httpx.post(f"{live.url}/v1/files", files={"file": ("x.jsonl", data)}, data={"purpose": purpose})
    assert r.status_code == 422 and r.json()["param"] == param and r.json()["detail"].startswith(message)
    assert httpx.get(f"{live.url}/v1/files").json()["data"] == before


def test_a_bad_job_is_refused_naming_the_field(live):
    f = live.client.files.create(file=("train.jsonl", GENERATE), purpose="fine-tune").id
    c = live.client.files.create(file=("cls.jsonl", CLASSIFY), purpose="fine-tune").id
    base = {"model": live.base_model, "training_file": f, "suffix": "t"}
    cases = [
        ({**base, "model": "gpt-4o-mini"}, "model", "model 'gpt-4o-mini' is neither the served base model"),
        ({**base, "model": ["x"]}, "model", "model must be the served base model"),
        ({**base, "training_file": "file-000000000000000000000000"}, "training_file", "training_file: no file"),
        ({**base, "suffix": "bad id!"}, None, "invalid task id"),
        ({**base, "hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "hyperparameters.n_epochs must"),
        ({**base, "hyperparameters": {"n_epochs": 10_000}}, "hyperparameters.n_epochs", "in (0, 1000], got 10000"),
        (
            {**base, "hyperparameters": {"n_epochs": 1000}, "validation_file": f},
            "hyperparameters",
            "1000 epochs x 32 examples (training and validation) is more than this server's limit of 20000",
        ),
        (
            {**base, "hyperparameters": {"learning_rate_multiplier": 1e999}},
            "hyperparameters.learning_rate_multiplier",
            "in (0, 1000], got inf",
        ),
        (
            {**base, "hyperparameters": {"learning_rate_multiplier": 10**400}},
            "hyperparameters.learning_rate_multiplier",
            "must be 'auto' or a float in (0, 1000]",
        ),
        ({**base, "training_file": c, "labels": {"pos": " good"}}, "training_file", "unknown label 'neg'"),
        ({**base, "promote": "sometimes"}, "promote", "promote must be"),
        ({**base, "colour": "red"}, None, "unknown field(s) ['colour']"),
    ]
    for body, param, message in cases:  # json.dumps writes 1e999 as Infinity, which Python's JSON reads back
        r = httpx.post(f"{live.url}/v1/fine_tuning/jobs", content=json.dumps(body),
                       headers={"content-type": "application/json"})  # fmt: skip
        assert (r.status_code, r.json().get("param")) == (422, param), (body, r.json())
        assert message in r.json()["detail"], (body, r.json())
    assert httpx.post(f"{live.url}/v1/fine_tuning/jobs", content=b"[1]").status_code == 400
    assert httpx.get(f"{live.url}/v1/fine_tuning/jobs/ftjob-nothing").status_code == 404
    with pytest.raises(UnprocessableEntityError, match="only a queued or running job can be cancelled"):  # shown
        live.client.fine_tuning.jobs.cancel(finished(live.client, live.client.fine_tuning.jobs.create(
            model=live.base_model, training_file=f, suffix="once", hyperparameters={"n_epochs": 1}).id).id)  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        {"encoder": "bogus"},
        {"template": "[P:0]{nope}"},
        {"template": "[P:2]{other}[P:2]"},
        {"labels": ["a"]},
        {"labels": {"a": ""}},
        {"labels": {}},
        {"task_type": "regress"},
        {"template": "[P:2]{input}", "from_prompt": "x"},
        {"from_prompt": "no field here"},
        {"seed": "one"},
        {"hyperparameters": {"batch_size": 0}},
        {"hyperparameters": {"learning_rate_multiplier": -1}},
        {"hyperparameters": {"n_epochs": True}},
        {"hyperparameters": [1]},
        {"validation_file": 7},
        {"task_type": "classify"},
        {"template": 5},
        {"metadata": "x" * 100_000},
    ],
)
def test_any_job_body_gets_a_4xx_naming_what_is_wrong_never_a_5xx(live, extra):
    f = live.client.files.create(file=("train.jsonl", GENERATE), purpose="fine-tune").id
    body = {"model": live.base_model, "training_file": f, "suffix": "h", "hyperparameters": {"n_epochs": 1}, **extra}
    r = httpx.post(f"{live.url}/v1/fine_tuning/jobs", json=body)
    assert 400 <= r.status_code < 500 and r.json()["detail"], (extra, r.status_code, r.text[:300])


def test_files_and_jobs_need_the_write_token(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["llama"])
    settings = Settings(model=model, store=str(tmp_path), api_token="w", inference_token="i")
    with LiveServer(create_app(settings, load_model(model, device="cpu", dtype="float32"))) as server:
        for method, path in (("GET", "/v1/files"), ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/fine_tuning/jobs")):
            refused = httpx.request(method, server.url + path)
            assert refused.status_code == 401 and refused.json()["error"]["message"] == refused.json()["detail"]
            r = httpx.request(method, server.url + path, headers={"Authorization": "Bearer i"})
            assert r.status_code == 403
        assert httpx.get(server.url + "/v1/files", headers={"Authorization": "Bearer w"}).status_code == 200


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_a_job_whose_server_stopped_reads_as_failed_on_any_replica(kind, tiny_model_dirs, tmp_path, redis_url):
    """A job left running by a server that died: once its lease has run out, any
    server that reads it marks it failed."""
    store_url = str(tmp_path) if kind == "disk" else redis_url
    store = open_fine_tuning_store(store_url)
    job_id = "ftjob-" + ("%024x" % time.monotonic_ns())[-24:]
    store.put_job({"id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "status": "running",
                   "error": None, "finished_at": None, "ptserve": {}})  # fmt: skip
    store.put_lease(job_id, time.time() - 1)
    model = str(tiny_model_dirs["llama"])
    settings = Settings(model=model, store=store_url)
    with LiveServer(create_app(settings, load_model(model, device="cpu", dtype="float32"))) as server:
        job = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}").json()
    assert (job["status"], job["error"]["code"]) == ("failed", "server_stopped")
    assert store.job(job_id)["status"] == "failed"  # written back, for every replica


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_renewing_a_lease_never_rewrites_the_job(kind, tmp_path, redis_url, monkeypatch):
    """The renewer runs beside the job's own writes (a new status, the ETA): it
    writes the lease alone. It once read the job, set its lease and wrote it
    back, which could put back a status changed in between."""
    store = open_fine_tuning_store(str(tmp_path) if kind == "disk" else redis_url)
    job_id = "ftjob-" + ("%024x" % time.monotonic_ns())[-24:]
    store.put_job({"id": job_id, "created_at": int(time.time()), "status": "running", "ptserve": {}})
    assert store.lease(job_id) is None
    jobs = Jobs(store, None, None, None, SimpleNamespace(info={"name_or_path": "m"}), Settings(job_lease_s=30))
    monkeypatch.setattr(store, "put_job", lambda job: pytest.fail(f"the renewer wrote the job: {job}"))
    before = time.time()
    jobs._renew_leases([job_id])
    assert before + 30 <= store.lease(job_id) <= time.time() + 30


def test_old_files_expire_but_never_one_a_job_still_reads(tiny_model_dirs, tmp_path):
    """PTSERVE_MAX_FILES: the oldest file goes when a new one comes, unless a
    queued or running job reads it; deleting such a file is refused."""
    model = str(tiny_model_dirs["llama"])
    settings = Settings(model=model, store=str(tmp_path), max_files=2)
    loaded = load_model(model, device="cpu", dtype="float32")
    with LiveServer(create_app(settings, loaded)) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        ids = lambda: {f.id for f in client.files.list().data}  # noqa: E731
        read = client.files.create(file=("a.jsonl", GENERATE), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model=loaded.info["name_or_path"], training_file=read, suffix="slow",
                                             hyperparameters={"n_epochs": 1000})  # fmt: skip
        second = client.files.create(file=("b.jsonl", GENERATE), purpose="fine-tune").id
        third = client.files.create(file=("c.jsonl", GENERATE), purpose="fine-tune").id
        assert ids() == {read, third}  # the second went: the first is the job's
        r = httpx.delete(f"{server.url}/v1/files/{read}")
        assert (r.status_code, r.json()["param"]) == (422, "file_id") and job.id in r.json()["detail"]
        assert read in ids() and second not in ids()
        client.fine_tuning.jobs.cancel(job.id)
        finished(client, job.id)
        assert client.files.delete(read).deleted and ids() == {third}


def test_an_example_longer_than_a_request_may_be_is_refused_naming_its_line(tiny_model_dirs, tmp_path):
    """PTSERVE_MAX_INPUT_TOKENS bounds a training example as it bounds a request."""
    model = str(tiny_model_dirs["llama"])
    settings = Settings(model=model, store=str(tmp_path), max_input_tokens=12)
    loaded = load_model(model, device="cpu", dtype="float32")
    rows = [{"input": "w", "output": " a"}, {"input": "w " * 30, "output": " a"}] * 4
    with LiveServer(create_app(settings, loaded)) as server:
        upload = {"file": ("t.jsonl", jsonl(rows))}
        f = httpx.post(f"{server.url}/v1/files", files=upload, data={"purpose": "fine-tune"})
        body = {"model": loaded.info["name_or_path"], "training_file": f.json()["id"], "suffix": "long"}
        r = httpx.post(f"{server.url}/v1/fine_tuning/jobs", json=body)
    assert (r.status_code, r.json()["param"]) == (422, "training_file")
    detail = r.json()["detail"]
    assert detail.startswith("line 2: ") and detail.endswith(" tokens (input and output, rendered); the limit is 12")
