"""Access tokens, back-pressure, deadlines, disconnects and size limits, over real HTTP."""

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import prompt_store.template
import server.engine.batch
from prompt_store.artifact import artifact_bytes
from tests.helpers import live_server, random_prompt, wait_until

DEADLINE_S = 60.0  # for every wait: far beyond what it should take; reached only when something is wrong


def serve(loaded, tmp_path, **settings):
    return live_server(loaded, str(tmp_path / "store"), **settings)


@pytest.fixture
def slow_steps(monkeypatch):
    """Every decode step takes 50 ms more, so requests last long enough to interrupt."""
    real = server.engine.batch.sample

    def slow(*args):
        time.sleep(0.05)
        return real(*args)

    monkeypatch.setattr(server.engine.batch, "sample", slow)


def test_write_routes_need_the_token_and_inference_optionally(gpt2, tmp_path, caplog):
    data = artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))
    with (
        serve(gpt2, tmp_path, api_token="w-secret", inference_token="i-secret") as live,
        httpx.Client(base_url=live.url, timeout=60) as c,
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic w-secret"}):
            r = c.put("/v1/tasks/t", content=data, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "Bearer" in r.text
        write = {"Authorization": "Bearer w-secret"}
        assert c.put("/v1/tasks/t", content=data, headers=write).status_code == 201
        assert c.get("/v1/tasks/t").status_code == 200  # reading summaries stays open
        assert c.post("/v1/tasks/t/generate", json={"input": "x"}).status_code == 401
        assert c.post("/v1/tasks/t/generate", json={"input": "x"}, headers=write).status_code == 401
        ok = c.post("/v1/tasks/t/generate", json={"input": "x"}, headers={"Authorization": "Bearer i-secret"})
        assert ok.status_code == 200
        assert c.delete("/v1/tasks/t").status_code == 401
        assert c.delete("/v1/tasks/t", headers=write).status_code == 204
    with caplog.at_level(logging.WARNING), serve(gpt2, tmp_path / "open"):
        pass
    assert any("ANYONE" in r.getMessage() for r in caplog.records)


def test_a_full_queue_answers_429_with_retry_after(gpt2, tmp_path, slow_steps):
    with serve(gpt2, tmp_path, max_queue=1, max_running=1) as live:
        httpx.put(f"{live.url}/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))

        async def fire():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
                body = {"input": "x", "max_new_tokens": 10}
                return await asyncio.gather(*(c.post("/v1/tasks/t/generate", json=body) for _ in range(8)))

        responses = asyncio.run(fire())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and "waiting" in refused.json()["detail"]


def wait_until_idle(client):
    def idle():
        stats = client.get("/v1/stats").json()
        return stats if stats["running"] == 0 and stats["queue_depth"] == 0 else None

    return wait_until(idle, "the engine to have nothing running or queued", DEADLINE_S)


def decode_steps(stats) -> int:
    return sum(1 for b in stats["batches"]["recent"] if b["kind"] == "decode")


def test_a_request_past_its_deadline_is_504_and_frees_its_slot(gpt2, tmp_path, slow_steps):
    with serve(gpt2, tmp_path, request_timeout_s=0.5) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        r = c.post("/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 200})  # ~10 s of steps
        assert r.status_code == 504 and r.json()["detail"] == "the request did not finish within 0.5 s"
        at_504 = decode_steps(c.get("/v1/stats").json())
        # the request was aborted before the 504 went out: the step then running
        # may still finish, and no other after it
        assert decode_steps(wait_until_idle(c)) - at_504 <= 1


def test_a_stream_past_its_deadline_ends_with_an_error_event_in_each_routes_shape(gpt2, tmp_path, slow_steps):
    """The 200 is already sent: the error goes in the stream. The OpenAI route
    uses OpenAI's shape, so its client raises with the server's message."""
    from openai import APIError, OpenAI

    with serve(gpt2, tmp_path, request_timeout_s=0.5) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        body = {"input": "x", "max_new_tokens": 200, "stream": True}
        with c.stream("POST", "/v1/tasks/t/generate", json=body) as r:
            last = [line for line in r.iter_lines() if line.startswith("data: ")][-1]
        assert last == 'data: {"error": "the request did not finish within 0.5 s"}'
        client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(APIError, match=r"^the request did not finish within 0\.5 s$"):
            for _ in client.completions.create(model="t", prompt="x", max_tokens=200, stream=True):
                pass
        wait_until_idle(c)


def test_a_client_that_disconnects_has_its_work_cancelled(gpt2, tmp_path, slow_steps):
    with serve(gpt2, tmp_path) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 200}, timeout=0.4)
        stats = wait_until_idle(c)  # its slot is back within the poll interval and a step
        decode_steps = sum(1 for b in stats["batches"]["recent"] if b["kind"] == "decode")
        assert 1 <= decode_steps < 100  # it was generating, and stopped far short of its 200 tokens


def test_size_limits(gpt2, tmp_path):
    with (
        serve(gpt2, tmp_path, max_json_bytes=2048, max_virtual_tokens=4) as live,
        httpx.Client(base_url=live.url, timeout=60) as c,
    ):
        r = c.put("/v1/tasks/big", content=artifact_bytes(random_prompt(gpt2, "[P:3]{input}[P:3]")))
        assert r.status_code == 422 and "at most 4" in r.json()["detail"]
        assert c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))).status_code == 201
        r = c.post("/v1/tasks/t/generate", json={"input": "x" * 5000})
        assert r.status_code == 413 and "2048" in r.json()["detail"]
        r = c.post("/v1/tasks/t/generate", content=b'{"input": "x"}', headers={"content-type": "text/plain"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]  # not read as JSON
        assert c.post("/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 2}).status_code == 200


def test_the_static_engine_also_stops_work_for_a_departed_client(gpt2, tmp_path, slow_steps):
    with serve(gpt2, tmp_path, engine="static") as live, httpx.Client(base_url=live.url, timeout=60) as c:
        c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 200}, timeout=0.4)
        deadline = time.monotonic() + 5
        while c.get("/v1/stats").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = c.get("/v1/stats").json()
        steps = [b for b in stats["batches"]["recent"] if b["kind"] == "decode"]
        # the client left after 0.4 s and is noticed within a 0.2 s poll; at 50 ms a step,
        # 2 s would be 40 steps, and the whole answer 199
        assert stats["running"] == 0 and len(steps) < 40, steps


def test_any_oversized_body_is_413_even_chunked(gpt2, tmp_path):
    with serve(gpt2, tmp_path, max_json_bytes=2048) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        big = b'{"input": "' + b"x" * 40000 + b'"}'
        for headers in ({"content-type": "text/plain"}, {"content-type": "application/vnd.x+json"}, {}):
            assert c.post("/v1/tasks/t/generate", content=big, headers=headers).status_code == 413, headers
        chunked = c.post("/v1/tasks/t/generate", content=iter([big[:1000], big[1000:]]),
                         headers={"content-type": "application/json"})  # fmt: skip
        assert chunked.status_code == 413 and "2048" in chunked.json()["detail"]


def test_an_empty_token_setting_means_no_token(gpt2, tmp_path):
    with serve(gpt2, tmp_path, api_token="", inference_token="") as live:
        data = artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))
        assert httpx.put(f"{live.url}/v1/tasks/t", content=data).status_code == 201
        assert live.app.state.engine.settings.api_token is None


def test_failures_stay_with_their_own_requests(gpt2, tmp_path, monkeypatch):
    """A failing classify batch leaves running generations alone; a failing
    iteration does not kill the worker; a failing decode step ends streams
    with an error event instead of a cut connection."""
    from server.engine.batch import GenerateBatch
    from server.engine.classify import Classifier
    from server.engine.scheduler import Scheduler

    with serve(gpt2, tmp_path) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        c.put("/v1/tasks/g", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        labels = {"a": " a", "b": " b"}
        c.put("/v1/tasks/c", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}", "classify", labels)))

        scheduler = live.app.state.engine.scheduler
        running_at_classify = []

        def broken_classify(self, requests):
            running_at_classify.append(scheduler.running())
            raise RuntimeError("classify broke")

        # the generation's first decode step waits until the classify request is
        # queued, so that the classify batch runs while the generation is running
        generation_running, classify_queued = threading.Event(), threading.Event()
        real_decode, real_submit = GenerateBatch.decode, Scheduler.submit

        def held_decode(self):
            generation_running.set()
            if not classify_queued.wait(DEADLINE_S):
                raise RuntimeError(f"waited {DEADLINE_S:g} s for the classify request to be queued")
            return real_decode(self)

        def noting_submit(self, request):
            future = real_submit(self, request)
            if request.kind == "classify":
                classify_queued.set()
            return future

        monkeypatch.setattr(Classifier, "run", broken_classify)
        monkeypatch.setattr(GenerateBatch, "decode", held_decode)
        monkeypatch.setattr(Scheduler, "submit", noting_submit)

        async def both():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as ac:
                gen = asyncio.create_task(ac.post("/v1/tasks/g/generate", json={"input": "x", "max_new_tokens": 60}))
                if not await asyncio.to_thread(generation_running.wait, DEADLINE_S):
                    raise AssertionError(f"waited {DEADLINE_S:g} s for the generation to reach its first decode step")
                classified = await ac.post("/v1/tasks/c/classify", json={"input": "x"})
                return await gen, classified

        generated, classified = asyncio.run(both())
        assert generated.status_code == 200, generated.text
        assert running_at_classify == [1]  # the classify batch failed while the generation ran
        alone = c.post("/v1/tasks/g/generate", json={"input": "x", "max_new_tokens": 60})
        assert generated.json() == alone.json()  # the classify failure changed nothing in it
        assert len(alone.json()["token_ids"]) >= 3  # so a 3-token request runs over two iterations
        assert classified.status_code == 500 and "classify broke" in classified.json()["detail"]
        assert classified.headers["connection"] == "close"

        real_stream = Scheduler._stream
        failed = []

        def flaky_stream(self):  # the end of an iteration
            if self.running() and not failed:  # the first iteration that ends with a row running fails
                failed.append(True)
                raise RuntimeError("one bad iteration")
            return real_stream(self)

        monkeypatch.setattr(Scheduler, "_stream", flaky_stream)
        caught = c.post("/v1/tasks/g/generate", json={"input": "x", "max_new_tokens": 3})
        assert caught.status_code == 500 and "one bad iteration" in caught.json()["detail"]  # it was running
        assert c.post("/v1/tasks/g/generate", json={"input": "x", "max_new_tokens": 3}).status_code == 200
        assert c.get("/ready").status_code == 200  # the worker lives on

        def broken_decode(self):
            raise RuntimeError("decode broke")

        monkeypatch.setattr(GenerateBatch, "decode", broken_decode)
        with c.stream("POST", "/v1/tasks/g/generate", json={"input": "x", "max_new_tokens": 5, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and "decode broke" in lines[-1]


def test_input_far_over_the_token_limit_is_refused_before_tokenizing(gpt2, tmp_path, monkeypatch):
    from server.inference import CHARS_PER_TOKEN_BOUND

    calls = {"n": 0}
    tokenizer_class = type(gpt2.tokenizer)
    for name in ("__call__", "encode", "tokenize"):
        real = getattr(tokenizer_class, name)

        def counted(self, *args, real=real, **kwargs):
            calls["n"] += 1
            return real(self, *args, **kwargs)

        monkeypatch.setattr(tokenizer_class, name, counted)
    with serve(gpt2, tmp_path, max_input_tokens=64) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        cap = 64 * CHARS_PER_TOKEN_BOUND
        calls["n"] = 0
        r = c.post("/v1/tasks/t/generate", json={"input": "x" * (cap + 1)})
        assert r.status_code == 422
        assert r.json()["detail"].startswith(f"input is {cap + 1} characters; the limit is {cap} ")
        assert calls["n"] == 0
        r = c.post("/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 1})
        assert r.status_code == 200 and calls["n"] > 0  # a normal request is tokenized (and counted)


class HeldTokenizer:
    """The served tokenizer, with a long input's tokenization held, as a slow
    one would be, from inside the tokenizer call (where the real work is, under
    whatever lock the server takes around it) until `release` is set; and the
    tokenizer locks of prompt_store/template.py watched for threads that must
    wait for one."""

    def __init__(self, loaded, monkeypatch):
        from server.input_lanes import LONG_INPUT_CHARS

        self.release = threading.Event()
        self.holding = 0  # long inputs inside the tokenizer now
        self.most = 0
        self.lock_waited = threading.Event()  # a thread had to wait for the tokenizer lock

        def held(real):
            def call(tokenizer, text, *args, **kwargs):
                # the tests' long inputs are x's (the tokenizer process's own probes are not held)
                if isinstance(text, str) and len(text) > LONG_INPUT_CHARS and set(text) == {"x"}:
                    self.holding += 1
                    self.most = max(self.most, self.holding)
                    try:
                        if not self.release.wait(DEADLINE_S):
                            raise RuntimeError(f"the test did not release a long input in {DEADLINE_S:g} s")
                    finally:
                        self.holding -= 1
                return real(tokenizer, text, *args, **kwargs)

            return call

        # the served tokenizer, and the long lane's process (server/tokenizer_process.py)
        from server.tokenizer_process import TokenizerProcess

        for cls in (type(loaded.tokenizer), TokenizerProcess):
            monkeypatch.setattr(cls, "__call__", held(cls.__call__))
        real_lock = prompt_store.template.encoding_lock
        monkeypatch.setattr(prompt_store.template, "encoding_lock",
                            lambda tokenizer: WatchedLock(real_lock(tokenizer), self.lock_waited))  # fmt: skip


class WatchedLock:
    def __init__(self, lock, waited: threading.Event):
        self.lock = lock
        self.waited = waited

    def __enter__(self):
        if not self.lock.acquire(blocking=False):
            self.waited.set()
            self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()


LONG_REQUEST_TOKENS = 512  # long inputs (4097 characters, as many tokens here) are tokenized, then refused


def post_generate(live, text: str) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/tasks/t/generate", json={"input": text, "max_new_tokens": 1}, timeout=DEADLINE_S)


def test_long_inputs_are_prepared_one_at_a_time(gpt2, tmp_path, monkeypatch):
    from server.input_lanes import LONG_INPUT_CHARS

    held = HeldTokenizer(gpt2, monkeypatch)
    long = "x" * (LONG_INPUT_CHARS + 1)
    with serve(gpt2, tmp_path, max_input_tokens=LONG_REQUEST_TOKENS) as live, ThreadPoolExecutor(2) as pool:
        httpx.put(f"{live.url}/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        lane = live.app.state.engine.inference.lanes.long
        try:
            first = pool.submit(post_generate, live, long)
            wait_until(lambda: held.holding == 1, "the first long input to be tokenized", DEADLINE_S)
            second = pool.submit(post_generate, live, long)
            wait_until(lambda: lane.statistics().tasks_waiting == 1 or held.lock_waited.is_set() or held.holding > 1,
                       "the second long input to wait for the long lane", DEADLINE_S)  # fmt: skip
            assert lane.statistics().tasks_waiting == 1 and held.holding == 1 and not held.lock_waited.is_set(), (
                "the second long input was prepared alongside the first, not after it in the long lane"
            )
        finally:
            held.release.set()
        answers = [first.result(), second.result()]
    for r in answers:
        assert r.status_code == 422, r.text
        tokens = LONG_INPUT_CHARS + 1 + 2  # one per character, and the task's two pseudo tokens
        assert r.json()["detail"] == f"rendered input is {tokens} tokens; the limit is {LONG_REQUEST_TOKENS}"
    assert held.most == 1


def test_ordinary_requests_do_not_wait_behind_a_long_input_being_tokenized(gpt2, tmp_path, monkeypatch):
    """README, Access, limits and faults: ordinary requests never wait behind
    long inputs. A long input held inside its tokenization must not keep an
    ordinary request from being prepared and answered."""
    from server.input_lanes import LONG_INPUT_CHARS

    held = HeldTokenizer(gpt2, monkeypatch)
    with serve(gpt2, tmp_path, max_input_tokens=LONG_REQUEST_TOKENS) as live, ThreadPoolExecutor(2) as pool:
        httpx.put(f"{live.url}/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        lane = live.app.state.engine.inference.lanes.long
        try:
            long = pool.submit(post_generate, live, "x" * (LONG_INPUT_CHARS + 1))
            wait_until(lambda: held.holding == 1, "the long input to be tokenized", DEADLINE_S)
            short = pool.submit(post_generate, live, "x")
            # whichever comes first: its answer, or a sign that it waits behind the long input
            wait_until(lambda: short.done() or held.lock_waited.is_set() or lane.statistics().tasks_waiting,
                       "the ordinary request to be answered", DEADLINE_S)  # fmt: skip
            assert not held.lock_waited.is_set(), "the ordinary request waited for the tokenizer lock"
            assert not lane.statistics().tasks_waiting, "the ordinary request waited for the long lane"
            assert short.result().status_code == 200, short.result().text
            assert held.holding == 1 and not long.done()  # answered while the long input was still being tokenized
        finally:
            held.release.set()
        assert long.result().status_code == 422


def test_a_long_input_that_waits_too_long_for_its_lane_is_a_504():
    import anyio

    from ptcore.errors import DeadlineExceeded
    from server.input_lanes import LONG_INPUT_CHARS, InputLanes, input_chars

    lanes = InputLanes(wait_s=0.2)
    long_fields = {"input": "x" * (LONG_INPUT_CHARS + 1)}

    async def hold_the_lane(held, done):
        async with lanes.long:  # someone else's long input is being prepared
            held.set()
            await done.wait()

    async def main():
        held, done = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_the_lane, held, done)
            await held.wait()
            with pytest.raises(DeadlineExceeded, match="waited 0.2 s"):
                await lanes.prepare(lambda task, fields: "prepared", input_chars(long_fields), "t", long_fields)
            assert await lanes.prepare(lambda task, fields: "prepared", 5, "t", {"input": "short"}) == "prepared"
            done.set()
        assert await lanes.prepare(lambda task, fields: "prepared", input_chars(long_fields), "t", long_fields) == (
            "prepared")  # fmt: skip

    anyio.run(main)
