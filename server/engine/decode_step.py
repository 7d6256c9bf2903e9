"""One decode step for the running rows (slots 0..n-1 of the slot KV cache),
as a fixed-shape function that CUDA graphs can capture.

Its inputs (each row's last token and its position) live in one static
device buffer. A step for n rows whose longest row reads `length` cache positions
runs at a bucket (B >= n rows, L >= length positions): the B - n extra rows
feed token 0 at position 0 of free slots (slots >= n hold nothing a running
row reads; admission overwrites them before use), and positions beyond a
row's own are masked out, so the first n rows get exactly their own logits.

On CUDA (with `graphs`), every bucket is captured once at startup and a step
is one graph replay plus one small copy in: per-kernel launch cost, which
dominates a small-batch decode step, is paid once. Elsewhere the same function
runs eagerly at the exact (n, length), no padding. With `compile`, the function
is first fused by torch.compile, on any device, at startup: capturing compiles
it on CUDA, and elsewhere `warm_up` runs the shapes that make torch.compile
build every graph a step will use (one for the first shape, one with dynamic
rows and lengths, one for a single row), so that no request waits for a
compilation and a compiler that is missing fails the start, not the requests.

Graphs and compile need a step that never looks at values on the host; a
slot model says whether its architecture allows that (`capturable`: Llama's "dynamic"
rotary scaling reads the largest position), and otherwise the step runs eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from server.engine.kv_cache import SlotKVCache
from server.engine.models.slot_attention import SlotAttention

log = logging.getLogger(__name__)


def batch_buckets(slots: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to and including `slots`."""
    sizes = [b for b in (1, 2, 4, 8) if b < slots] + list(range(16, slots, 8))
    return sorted(set(sizes + [slots]))


def length_buckets(max_len: int, smallest: int = 64) -> list[int]:
    """Powers of two from `smallest`, up to and including `max_len`."""
    sizes, n = [], smallest
    while n < max_len:
        sizes.append(n)
        n *= 2
    return sizes + [max_len]


def smallest_at_least(sizes: list[int], n: int) -> int:
    return next(s for s in sizes if s >= n)


class DecodeStep:
    def __init__(self, model, embed_tokens, lm_head, cache: SlotKVCache, device: torch.device,
                 graphs: bool = True, compile: bool = False, pad: bool | None = None):  # fmt: skip
        """graphs: capture CUDA graphs (only on a CUDA device). pad: run at bucket
        sizes even without graphs (tests use it to check the padded path on CPU);
        default: pad exactly when graphs are used."""
        self.model = model
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        self.cache = cache
        self.device = device
        self.inputs = torch.zeros(2, cache.slots, dtype=torch.long, device=device)  # each row's token; position
        self.batch_sizes = batch_buckets(cache.slots)
        self.lengths = length_buckets(cache.max_len)
        graphs = graphs and device.type == "cuda"
        if (graphs or compile) and not model.capturable:
            log.warning("this model's decode step reads values on the host: no CUDA graphs, no torch.compile")
            graphs = compile = False
        self.forward = torch.compile(self._forward, fullgraph=True) if compile else self._forward
        self.use_graphs = graphs
        self.pad = self.use_graphs if pad is None else pad
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.use_graphs or compile:
            try:
                on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
                with on_device:  # capture streams and compiled kernels live on the current device
                    if self.use_graphs:
                        self.capture()
                    else:
                        self.warm_up()
            except Exception as e:
                how = ("torch.compile and CUDA graphs" if compile and self.use_graphs
                       else "CUDA graphs" if self.use_graphs else "torch.compile")  # fmt: skip
                fix = "PTSERVE_COMPILE=false" if compile else "PTSERVE_CUDA_GRAPHS=false"
                raise RuntimeError(f"preparing the decode step ({how}) failed ({e}); {fix} runs it without") from e

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """tokens, positions: [B] (row b is slot b) -> logits [B, V]."""
        attention = SlotAttention(self.cache, 0, positions[:, None], length)
        hidden = self.model.hidden(self.embed_tokens(tokens[:, None]), attention)  # [B, 1, H]
        return self.lm_head(hidden[:, 0])

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the step before serving (see the module's text). Like
        `capture`, it writes position 0 of slots that hold nothing yet."""
        start = time.monotonic()
        slots, longest = self.cache.slots, self.cache.max_len
        for n, length in ((min(2, slots), 2), (min(3, slots), 3), (1, 4)):
            self.forward(self.inputs[0, :n], self.inputs[1, :n], min(length, longest))
        log.info("compiled the decode step with torch.compile in %.1f s", time.monotonic() - start)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per (batch, length) bucket, largest first, all in
        one memory pool. The buffers hold zeros: warm-up and capture runs write
        position 0 of slots that hold nothing yet (this runs before any row)."""
        start = time.monotonic()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        for B in reversed(self.batch_sizes):
            for L in reversed(self.lengths):
                args = (self.inputs[0, :B], self.inputs[1, :B], L)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # warm up: lazy inits and compilation happen outside capture
                    for _ in range(2):
                        self.forward(*args)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=side):
                    logits = self.forward(*args)
                self.graphs[(B, L)] = (graph, logits)
        torch.cuda.synchronize(self.device)
        used = (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**20
        log.info("captured %d decode-step CUDA graphs (batch %s x length %s) in %.1f s, %.0f MiB",
                 len(self.graphs), self.batch_sizes, self.lengths, time.monotonic() - start, used)  # fmt: skip

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Feed tokens[i] at positions[i] of slot i, i < n; -> logits [n, V]."""
        n, length = len(tokens), max(positions) + 1
        B, L = n, length
        if self.pad:
            B, L = smallest_at_least(self.batch_sizes, n), smallest_at_least(self.lengths, length)
        fill = [0] * (B - n)
        self.inputs[:, :B].copy_(torch.tensor([tokens + fill, positions + fill]))  # one copy to the device
        if self.use_graphs:
            graph, logits = self.graphs[(B, L)]
            with torch.cuda.device(self.device):  # replay on this device's current stream
                graph.replay()
        else:
            logits = self.forward(self.inputs[0, :B], self.inputs[1, :B], L)
        return logits[:n]
