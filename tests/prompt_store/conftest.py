"""The `store` fixture: each store test runs on a directory on disk and on a real redis-server."""

import pytest

from prompt_store.disk_store import DiskStore
from prompt_store.redis_store import RedisStore


@pytest.fixture(params=["disk", "redis"])
def open_store(request, tmp_path):
    """-> a function opening the store (another handle on the same data each call)."""
    opened = []

    def open_one(**options):
        if request.param == "disk":
            s = DiskStore(tmp_path / "prompts", **options)
        else:
            url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
            s = RedisStore(url, prefix=prefix, **options)
        opened.append(s)
        return s

    yield open_one
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store):
    return open_store()
