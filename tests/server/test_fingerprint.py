"""The base-model fingerprint names the checkpoint, whatever dtype serves it."""

import pytest

from ptcore.model import embedding_fingerprint, load_model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_fingerprint_is_the_same_for_every_serving_dtype(tiny_model_dirs, arch):
    path = str(tiny_model_dirs[arch])
    loads = {dtype: load_model(path, device="cpu", dtype=dtype) for dtype in ("float32", "bfloat16", "float16")}
    fingerprints = {dtype: loaded.info["fingerprint"] for dtype, loaded in loads.items()}
    # artifacts made before keep matching: the float32 load's value is what it always was
    legacy = embedding_fingerprint(loads["float32"].model.get_input_embeddings().weight)
    assert fingerprints == dict.fromkeys(loads, legacy)
