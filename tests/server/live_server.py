"""A real uvicorn server on 127.0.0.1 and a free port, run in a thread."""

import threading
import time

import uvicorn

from server.api.http_server import server_config
from tests.conftest import free_port


class LiveServer:
    """The app served as `ptserve serve` serves it (same protocol and socket limits)."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        where = {"host": "127.0.0.1", "port": self.port, "log_level": "warning"}
        settings = app.state.settings.model_copy(update=where)
        self._server = uvicorn.Server(server_config(app, settings))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(timeout=30)
