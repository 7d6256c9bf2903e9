"""Operations per decode step, per admission and per row removal: how many
kernels each launches, by operator, for a model shape. On a GPU at small batch
their time is mostly launches, so these counts are what CUDA graphs replay (the
step) or what runs eagerly (admission: the prefill of --rows newcomers over two
tasks, with their prompts' prefixes computed or already cached; removal: a
finished row's slot taken by the last row), and what torch.compile fusion
shrinks. On CPU it counts the aten operators that compute (not views or
allocations; each is about one kernel on a GPU); on CUDA it counts the CUDA
kernels.

    python -m bench.step_ops --shape llama-1b-thin        # 22 Llama layers, tiny widths: fast on CPU
    python -m bench.step_ops --shape llama-1b --device cuda --dtype bfloat16 [--compile]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from bench.engine import SHAPES, admit, build, make_requests
from server.engine.batch import GenerateBatch
from server.engine.models import slot_model_for
from server.engine.slot_backend import SlotBackend

SHAPES = {
    **SHAPES,
    # the layer structure of llama-1b at tiny widths: the same operators per step
    "llama-1b-thin": lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, head_dim=16,
        intermediate_size=128, vocab_size=512, max_position_embeddings=512)),
}  # fmt: skip


NO_KERNEL = set(
    "empty empty_strided detach lift_fresh result_type resolve_conj resolve_neg alias _local_scalar_dense "
    "scalar_tensor sym_size sym_stride sym_numel is_same_size".split()
)


class CountOps(TorchDispatchMode):
    """Counts aten operators that compute (views and allocations are free)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="llama-1b-thin")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="count the torch.compile'd step's kernels (CUDA)")
    args = ap.parse_args()
    if args.compile and args.device == "cpu":  # compiled code runs its own kernels, past the dispatcher
        ap.error("--compile: the fused step's kernels are counted on CUDA only")
    import engine

    engine.SHAPES.update(SHAPES)
    loaded = build(args.shape, args.device, getattr(torch, args.dtype))
    requests = make_requests(loaded, 2, args.rows, prompt_len=4, input_len=16, new=8)
    model = slot_model_for(loaded.model, max_rows=args.rows)
    backend = SlotBackend(loaded, model, max_running=args.rows, max_len=64, max_tokens=10**6, prefix_cache_size=8,
                          cuda_graphs=False, compile=args.compile)  # fmt: skip
    batch = GenerateBatch(backend, loaded)

    admit(batch, requests, fresh_prefixes=True)
    for _ in range(3):  # warm-up (and compilation)
        batch.decode()
    layers = loaded.model.config.num_hidden_layers
    phases = [("decode step", batch.decode), ("admission, prefixes computed", lambda: admit(batch, requests, True)),
              ("admission, prefixes cached", lambda: admit(batch, requests, False)),
              ("row removal (the last row moves)", lambda: batch.remove(batch.requests[:1]))]  # fmt: skip
    for name, run in phases:
        run()  # warm-up
        counts, what = count(run, loaded.device)
        total = sum(counts.values())
        print(f"\n{args.shape} {args.device} rows={args.rows} compile={args.compile}: {total} {what} per {name} "
              f"({total / layers:.1f} per layer, {layers} layers)")  # fmt: skip
        for op, n in counts.most_common(25):
            print(f"{n:6d}  {op}")


def count(run, device: torch.device) -> tuple[Counter, str]:
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
        return Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), "CUDA kernels"
    with CountOps() as counter:
        run()
    return counter.counts, "computing aten operators"


if __name__ == "__main__":
    main()
