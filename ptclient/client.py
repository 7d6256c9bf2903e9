"""A small client for a running ptserve, standard library only.

from ptclient.client import PtserveClient
c = PtserveClient("http://127.0.0.1:8000", token="...")   # token: for uploads/deletes
c.push("review", open("review.safetensors", "rb").read())
c.generate("summarize", input="Hello", max_new_tokens=16)
c.classify("review", input="A fine film")
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path


class ClientError(RuntimeError):
    """An error answer (status >= 400) or no answer at all (status 0)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail


class PtserveClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 600):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None):
        url = f"{self.base_url}{path}"
        req = urllib.request.Request(url, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read().decode(errors="replace")
            try:
                detail = json.loads(raw).get("detail", raw)
            except (json.JSONDecodeError, AttributeError):
                detail = raw
            raise ClientError(e.code, str(detail)) from None
        except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out
            raise ClientError(0, f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
        return json.loads(body) if body else None

    def _json(self, path: str, body: dict):
        return self._call("POST", path, json.dumps(body).encode(), "application/json")

    @staticmethod
    def _inputs(input: str | None, inputs: dict[str, str] | None) -> dict:
        return {"input": input} if inputs is None else {"inputs": inputs}

    # -- tasks ---------------------------------------------------------------

    def push(self, task_id: str, artifact: bytes) -> dict:
        """Upload artifact bytes as a new version of `task_id`; returns the task summary."""
        return self._call("PUT", f"/v1/tasks/{task_id}", artifact, "application/octet-stream")

    def push_peft(self, task_id: str, directory: str | Path) -> dict:
        """Upload a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
        from prompt_store.peft import CONFIG_FILE, WEIGHTS_FILE

        boundary = uuid.uuid4().hex
        parts = []
        for field, name in (("adapter_config", CONFIG_FILE), ("adapter_model", WEIGHTS_FILE)):
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            )
            parts.append(head.encode() + (Path(directory) / name).read_bytes() + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self._call("PUT", f"/v1/tasks/{task_id}/peft", body, f"multipart/form-data; boundary={boundary}")

    def tasks(self) -> list[dict]:
        return self._call("GET", "/v1/tasks")

    def task(self, task_id: str) -> dict:
        return self._call("GET", f"/v1/tasks/{task_id}")

    def versions(self, task_id: str) -> list[dict]:
        """The summaries of the task's kept versions, newest first."""
        return self._call("GET", f"/v1/tasks/{task_id}/versions")

    def delete(self, task_id: str) -> None:
        self._call("DELETE", f"/v1/tasks/{task_id}")

    # -- fine-tuning jobs (OpenAI's API shape) ----------------------------------

    def base_model(self) -> str:
        """The served base model, which fine-tuning jobs start from."""
        return next(m["id"] for m in self._call("GET", "/v1/models")["data"] if m.get("ptserve_base_model"))

    def upload_file(self, path: str | Path) -> dict:
        """Upload a JSONL training file (purpose fine-tune); -> the file object."""
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{Path(path).name}"\r\n'
                "Content-Type: application/jsonl\r\n\r\n"
            ).encode()
            + Path(path).read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return self._call("POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}")

    def create_job(self, body: dict) -> dict:
        return self._json("/v1/fine_tuning/jobs", body)

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}")

    def jobs(self, limit: int = 20) -> dict:
        return self._call("GET", f"/v1/fine_tuning/jobs?limit={limit}")

    def job_events(self, job_id: str, limit: int = 100) -> list[dict]:
        """The job's events, oldest first."""
        return list(reversed(self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/events?limit={limit}")["data"]))

    def cancel_job(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")

    # -- inference -----------------------------------------------------------

    def generate(self, task_id: str, input: str | None = None, inputs: dict | None = None, **params) -> dict:
        """params: version (a kept one; default the latest), max_new_tokens, temperature, top_p, top_k, stop, seed."""
        return self._json(f"/v1/tasks/{task_id}/generate", {**self._inputs(input, inputs), **params})

    def classify(self, task_id: str, input: str | None = None, inputs: dict | None = None,
                 version: int | None = None) -> dict:  # fmt: skip
        """version: a kept one; default the latest."""
        pinned = {} if version is None else {"version": version}
        return self._json(f"/v1/tasks/{task_id}/classify", {**self._inputs(input, inputs), **pinned})
