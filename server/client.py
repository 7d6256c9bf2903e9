"""A minimal client for a running ptserve (standard library only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid


class ClientError(RuntimeError):
    """An error answer (status >= 400) or no answer at all (status 0)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail


def _call(method: str, url: str, data: bytes | None = None, content_type: str | None = None, timeout: float = 120):
    req = urllib.request.Request(url, data=data, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
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


def push_artifact(base_url: str, task_id: str, data: bytes) -> dict:
    """Upload artifact bytes as a new version of `task_id`; returns the task summary."""
    return _call("PUT", f"{base_url.rstrip('/')}/v1/tasks/{task_id}", data, "application/octet-stream")


def push_peft(base_url: str, task_id: str, directory) -> dict:
    """Upload a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    from pathlib import Path

    from prompt_store.peft import CONFIG_FILE, WEIGHTS_FILE

    directory = Path(directory)
    boundary = uuid.uuid4().hex
    parts = []
    for field, name in (("adapter_config", CONFIG_FILE), ("adapter_model", WEIGHTS_FILE)):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + (directory / name).read_bytes()
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    url = f"{base_url.rstrip('/')}/v1/tasks/{task_id}/peft"
    return _call("PUT", url, body, f"multipart/form-data; boundary={boundary}")


def classify(base_url: str, task_id: str, fields: dict[str, str]) -> dict:
    body = json.dumps({"inputs": fields}).encode()
    return _call("POST", f"{base_url.rstrip('/')}/v1/tasks/{task_id}/classify", body, "application/json")
