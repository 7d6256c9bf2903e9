"""deploy/nginx.conf as shipped, run by the nginx on this machine in front of
three stub replicas that answer with their own port: a task's requests all go
to one replica, whether it is named in the path or in X-Ptserve-Task; requests
without a task take turns; a stopped replica's tasks move and no others do."""

import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

pytestmark = pytest.mark.skipif(
    not Path(NGINX).exists() or os.geteuid() != 0,
    reason="needs nginx, run as root (its compiled-in temporary folders)",
)


class Stub(http.server.BaseHTTPRequestHandler):
    def reply(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = str(self.server.server_port).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = reply

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def routed(tmp_path):
    """(router URL, {port: stub server})"""
    stubs = {}
    for _ in range(3):
        stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
        threading.Thread(target=stub.serve_forever, daemon=True).start()
        stubs[stub.server_port] = stub
    port = free_port()
    conf = (ROOT / "deploy" / "nginx.conf").read_text().replace("listen 8000;", f"listen 127.0.0.1:{port};")
    (tmp_path / "nginx.conf").write_text(conf)
    (tmp_path / "ptserve-upstreams.conf").write_text("".join(f"server 127.0.0.1:{p};\n" for p in stubs))
    nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e",
                              str(tmp_path / "error.log"), "-g", f"daemon off; pid {tmp_path}/nginx.pid;"])  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(f"{url}/health")
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield url, stubs
    nginx.terminate()
    nginx.wait()
    for stub in stubs.values():
        stub.shutdown()
        stub.server_close()


def served_by(url: str, path: str, method: str = "POST", **kwargs) -> int:
    r = httpx.request(method, url + path, timeout=10, **kwargs)
    assert r.status_code == 200, r.text
    return int(r.text)


def test_a_task_stays_on_one_replica(routed):
    url, stubs = routed
    tasks = [f"task-{i}" for i in range(30)]
    owner = {t: served_by(url, f"/v1/tasks/{t}/generate", json={"input": "x"}) for t in tasks}
    assert set(owner.values()) == set(stubs)  # 30 tasks use all three
    for t in tasks:
        assert served_by(url, f"/v1/tasks/{t}/classify", json={"input": "x"}) == owner[t]
        assert served_by(url, f"/v1/tasks/{t}", "PUT", content=b"artifact") == owner[t]
        assert served_by(url, f"/v1/tasks/{t}", "GET") == owner[t]
        # OpenAI: the task is in the body, so the client names it in the header
        headers = {"X-Ptserve-Task": t}
        assert served_by(url, "/v1/completions", json={"model": t, "prompt": "x"}, headers=headers) == owner[t]


def test_requests_without_a_task_take_turns(routed):
    url, stubs = routed
    assert {served_by(url, "/health", "GET") for _ in range(6)} == set(stubs)
    assert {served_by(url, "/v1/tasks", "GET") for _ in range(6)} == set(stubs)


def test_a_stopped_replica_moves_only_its_own_tasks(routed):
    url, stubs = routed
    tasks = [f"task-{i}" for i in range(60)]
    before = {t: served_by(url, f"/v1/tasks/{t}/generate") for t in tasks}
    gone = before["task-0"]
    stubs[gone].shutdown()
    stubs[gone].server_close()
    after = {t: served_by(url, f"/v1/tasks/{t}/generate") for t in tasks}
    assert gone not in after.values()
    assert {t for t in tasks if after[t] != before[t]} == {t for t in tasks if before[t] == gone}
