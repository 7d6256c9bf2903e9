"""Upload the prompt artifacts of a folder at startup (`ptserve serve --preload DIR`).

Each `NAME.safetensors` becomes task NAME, through the same checks as an
upload over HTTP. Uploading the bytes a task already holds makes no new
version, so a restart with the same folder changes nothing. An artifact the
served model refuses (another base model, a bad template) is skipped with a
warning naming the file and the reason; the server starts all the same.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ptcore.errors import PtserveError
from server.tasks import TaskManager

log = logging.getLogger(__name__)


def preload(tasks: TaskManager, folder: str) -> dict[str, int | str]:
    """-> {task id: its stored version, or the reason it was skipped}."""
    root = Path(folder)
    outcome: dict[str, int | str] = {}
    for path in sorted(root.glob("*.safetensors")):
        try:
            outcome[path.stem] = tasks.upload(path.stem, path.read_bytes())["version"]
        except (PtserveError, OSError) as e:
            outcome[path.stem] = str(e)
            log.warning("--preload: skipped %s: %s", path.name, e)
    loaded = sorted(task for task, v in outcome.items() if isinstance(v, int))
    log.info("--preload %s: %d task(s) ready: %s", folder, len(loaded), ", ".join(loaded) or "none")
    return outcome
