"""`ptserve serve` as a subprocess on a free loopback port, for the benchmarks."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, store: str, *flags: str, log=None) -> tuple[subprocess.Popen, str]:
    """Start the server with extra `flags`; wait until /ready; -> (process, base URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--store", store, "--port", str(port), *flags]
    out = log or subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")
