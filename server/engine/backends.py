"""Choosing the backend a model's generate requests run on."""

from __future__ import annotations

import logging

from ptcore.model import LoadedModel
from server.engine.batch import GenerateBatch
from server.engine.hf_backend import HFBackend
from server.engine.models import slot_model_for
from server.engine.slot_backend import SlotBackend

log = logging.getLogger(__name__)


def make_batch(loaded: LoadedModel, engine: str = "auto", spread: bool = False, max_running: int = 32,
               max_seq_len: int = 1024, max_tokens: int = 0, prefix_cache_size: int = 64, cuda_graphs: bool = True,
               compile: bool = False, pad_steps: bool | None = None,
               cpu_packed_weights: bool = True) -> GenerateBatch | None:  # fmt: skip
    """The generate batch for `loaded`, or None for a model that cannot generate.

    engine "continuous" (the slot backend: requests join between any two decode
    steps), "static" (the Hugging Face backend: requests join an empty batch),
    or "auto": continuous where the architecture is covered and the model is
    not spread over devices by device_map (`spread`). max_tokens 0 means
    max_running * max_len. cpu_packed_weights: see server/engine/models/cpu_linear.py;
    not with compile (inductor cannot lower oneDNN's product over a packed weight
    that is not a constant of the graph)."""
    if loaded.family != "causal":
        return None
    packed = cpu_packed_weights and not compile
    model = None if engine == "static" or spread else slot_model_for(loaded.model, packed, max_running)
    if model is None:
        if engine == "continuous":
            why = "a model spread by device_map" if spread else f"model_type {loaded.model.config.model_type!r}"
            raise ValueError(f"engine=continuous does not cover {why}; use engine=static or auto")
        log.info("engine: static (Hugging Face forward)")
        return GenerateBatch(HFBackend(loaded, max_running), loaded)
    max_len = min(max_seq_len, loaded.max_positions or max_seq_len)
    backend = SlotBackend(loaded, model, max_running=max_running, max_len=max_len,
                          max_tokens=max_tokens or max_running * max_len, prefix_cache_size=prefix_cache_size,
                          cuda_graphs=cuda_graphs, compile=compile, pad_steps=pad_steps,
                          packed=packed)  # fmt: skip
    log.info("engine: continuous (slot KV cache, %d rows of %d positions)", max_running, max_len)
    return GenerateBatch(backend, loaded)
