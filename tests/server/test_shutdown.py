"""SIGTERM with a deadline (server/api/shutdown.py), on a real `ptserve serve`
process: /ready and new requests get 503 at once, and after the grace every
client holds a complete answer or an error it can read; none gets EOF instead."""

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from prompt_store.artifact import artifact_bytes
from tests.helpers import free_port, random_prompt, wait_until

ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 1
SHUTTING_DOWN = {"detail": "server is shutting down"}


def stream(url: str) -> tuple[int, list[str]]:
    """A long streamed generate: (status, its data lines)."""
    body = {"input": "x", "max_new_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/tasks/t/generate", json=body, timeout=120) as r:
        return r.status_code, [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def plain(url: str) -> tuple[int, dict]:
    body = {"input": "x", "max_new_tokens": 480, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/tasks/t/generate", json=body, timeout=120)
    return r.status_code, r.json()  # a body cut short would not parse


def test_sigterm_answers_every_client_within_the_grace(gpt2, gpt2_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PTSERVE_SHUTDOWN_GRACE_S": str(GRACE_S), "PTSERVE_MAX_RUNNING": "2"}
    command = [sys.executable, "-m", "server.cli", "serve", "--model", str(gpt2_dir), "--store",
               str(tmp_path / "store"), "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _ready(url) or proc.poll() is not None, "the server to start", 120)
        assert proc.poll() is None, proc.stderr.read()
        assert httpx.put(f"{url}/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))).is_success
        with ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(stream, url) for _ in range(4)]
            plains = [pool.submit(plain, url) for _ in range(4)]  # 2 rows run at once: most of these wait
            wait_until(lambda: _running(url) == 2, "two requests to be running")
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: _ready_status(url) == 503, "/ready to answer 503 once SIGTERM arrived")
            late = httpx.post(f"{url}/v1/tasks/t/generate", json={"input": "x"}, timeout=30)
            assert (late.status_code, late.json()) == (503, SHUTTING_DOWN)
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
            try:
                proc.wait(timeout=GRACE_S + 30)
            except subprocess.TimeoutExpired:  # as the platform would after its own grace
                proc.kill()
                raise AssertionError("the server was still running long after its grace") from None
            results = [s.result() for s in streams], [p.result() for p in plains]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    cut = 0
    for status, events in results[0]:  # a stream ends with its answer and [DONE], or with its error event
        assert status == 200
        if events[-1] == "[DONE]":
            last = json.loads(events[-2])
            assert last["done"] is True and len(last["token_ids"]) == 480
        else:
            assert json.loads(events[-1]) == {"error": "server is shutting down"}, events[-3:]
            cut += 1
    for status, body in results[1]:
        if status == 503:
            assert body == SHUTTING_DOWN
            cut += 1
        else:
            assert status == 200 and len(body["token_ids"]) == 480
    assert cut > 0, "every request finished within the grace: the test did not reach the deadline"


def _ready_status(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code
    except httpx.HTTPError:
        return None


def _ready(url: str) -> bool:
    return _ready_status(url) == 200


def _running(url: str) -> int:
    return httpx.get(f"{url}/v1/stats", timeout=5).json()["running"]


def test_a_request_being_prepared_keeps_the_engine_busy(gpt2, tmp_path, monkeypatch):
    """The drain waits for requests that are not queued yet (a long input being
    tokenized), not only for queued and running ones."""
    from server.input_lanes import LONG_INPUT_CHARS
    from tests.helpers import live_server
    from tests.server.test_limits import HeldTokenizer

    held = HeldTokenizer(gpt2, monkeypatch)
    with live_server(gpt2, str(tmp_path / "store"), max_input_tokens=512) as live, ThreadPoolExecutor(1) as pool:
        httpx.put(f"{live.url}/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        engine = live.app.state.engine
        assert not engine.busy()
        try:
            answer = pool.submit(httpx.post, f"{live.url}/v1/tasks/t/generate",
                                 json={"input": "x" * (LONG_INPUT_CHARS + 1)}, timeout=60)  # fmt: skip
            wait_until(lambda: held.holding == 1, "the long input to be tokenized")
            assert engine.busy() and engine.scheduler.queue_depth() == 0
        finally:
            held.release.set()
        assert answer.result().status_code == 422  # over the 512-token limit
        wait_until(lambda: not engine.busy(), "the engine to be idle once the answer is read")


def test_the_drain_ends_in_an_exit_even_when_stopping_fails():
    import asyncio

    import uvicorn

    from prompt_store.errors import StoreUnavailable
    from server.api.shutdown import DrainingServer

    class Engine:
        draining = False

        def drain(self):
            self.draining = True

        def busy(self):
            return False

        def stop(self):
            raise StoreUnavailable("prompt store (Redis) is unreachable")

    server = DrainingServer(uvicorn.Config(app=None), grace_s=1)

    async def drain():
        server._loop = asyncio.get_running_loop()
        try:
            await server._drain_then_exit(Engine())
        except StoreUnavailable:
            pass

    asyncio.run(drain())
    assert server.should_exit
