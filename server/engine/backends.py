"""Choosing the backend a model's generate requests run on."""

from __future__ import annotations

import logging
from functools import partial

from ptcore import cpu_threads
from ptcore.model import LoadedModel
from server.engine.batch import GenerateBatch
from server.engine.hf_backend import HFBackend
from server.engine.models import slot_model_for
from server.engine.slot_backend import SlotBackend

log = logging.getLogger(__name__)


def make_batch(loaded: LoadedModel, engine: str = "auto", spread: bool = False, max_running: int = 32,
               max_seq_len: int = 1024, max_tokens: int = 0, prefix_cache_size: int = 64, cuda_graphs: bool = True,
               compile: bool = False, pad_steps: bool | None = None, cpu_packed_weights: bool = True,
               threads: int = 0) -> GenerateBatch | None:  # fmt: skip
    """The generate batch for `loaded`, or None for a model that cannot generate.

    engine "continuous" (the slot backend: requests join between any two decode
    steps), "static" (the Hugging Face backend: requests join an empty batch),
    or "auto": continuous where the architecture is covered and the model is
    not spread over devices by device_map (`spread`). max_tokens 0 means
    max_running * max_len. cpu_packed_weights: see server/engine/models/cpu_linear.py;
    not with compile (inductor cannot lower oneDNN's product over a packed weight
    that is not a constant of the graph).

    threads: the CPU threads of the thread that will run the model (0: build
    here, as this thread is). Where the build depends on that count, it runs on
    a thread of its own with it (ptcore/cpu_threads.py): on the CPU, MKL packs
    a weight for the packing thread's count, and torch.compile without CUDA
    graphs compiles again for a thread with another count (a CUDA graph
    replays what was captured, whatever the thread)."""
    if threads and (loaded.device.type == "cpu" or (compile and not cuda_graphs)):
        return cpu_threads.on_thread(threads, partial(make_batch, loaded, engine, spread, max_running, max_seq_len,
                                                      max_tokens, prefix_cache_size, cuda_graphs, compile, pad_steps,
                                                      cpu_packed_weights))  # fmt: skip
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
