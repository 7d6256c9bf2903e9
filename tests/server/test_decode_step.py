"""The decode step at bucket sizes (the shapes CUDA graphs are captured at)
and fused by torch.compile: both give the tokens of the request computed
alone. CUDA graphs themselves need a GPU (bench/engine.py checks them there,
against the eager step); on CPU the same function runs, padded to the same
buckets, so everything a graph would replay is checked here."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from server.engine.decode_step import DecodeStep, batch_buckets, length_buckets, smallest_at_least
from server.engine.kv_cache import SlotKVCache
from server.engine.models import slot_model_for
from tests.helpers import drive, float_mismatch, generate_requests, make_scheduler, oracle_tokens


def test_buckets_cover_every_size():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert length_buckets(212) == [64, 128, 212]
    assert length_buckets(64) == [64]
    want = [1, 2, 4, 4] + [8] * 4 + [16] * 8 + [24] * 8 + [32] * 8  # for n = 1..32
    assert [smallest_at_least(batch_buckets(32), n) for n in range(1, 33)] == want
    assert [smallest_at_least(length_buckets(212), n) for n in (1, 64, 65, 128, 129, 212)] == [
        64,
        64,
        128,
        128,
        212,
        212,
    ]


def test_padded_steps_equal_alone(loaded):
    """Rows padded to batch buckets (extra rows write free slots) and to
    length buckets (extra positions masked) get their own tokens exactly."""
    s = make_scheduler(loaded, max_running=5, pad_steps=True, cuda_graphs=False)
    backend = s.batch.backend
    backend.decode_step.lengths = [8, 16, 32, 64, 128]  # small buckets, so rows cross several while they grow
    works = generate_requests(loaded, 11)
    seen = []
    step = backend.decode_step
    backend.decode_step = lambda tokens, positions: (
        seen.append((len(tokens), max(positions))) or step(tokens, positions)
    )
    results, _ = drive(s, works, arrivals=[0, 0, 0, 1, 2, 4, 6, 6, 9, 12, 15])
    for w, r in zip(works, results):
        assert r.token_ids == oracle_tokens(loaded, w)
    assert {n for n, _ in seen} >= {3, 5}, "padded batch sizes were not exercised"


def test_compiled_step_equals_alone(loaded):
    """torch.compile traces the whole step as one graph (fullgraph: no host
    syncs, nothing data-dependent), and its tokens equal the oracle."""
    torch._dynamo.reset()
    s = make_scheduler(loaded, max_running=4, compile=True)
    works = generate_requests(loaded, 6)
    results, _ = drive(s, works, arrivals=[0, 0, 1, 3, 3, 7])
    for w, r in zip(works, results):
        assert r.token_ids == oracle_tokens(loaded, w)


def test_a_step_that_reads_values_on_the_host_is_neither_compiled_nor_captured():
    """Llama's "dynamic" rotary scaling compares positions with a cached length
    on the host: such a step cannot be captured or compiled whole, so it runs eagerly."""
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=64,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    decoder = slot_model_for(model)

    def step(**kw):
        cache = SlotKVCache(1, 2, 2, 16, 8, torch.float32, "cpu")
        return DecodeStep(decoder, model.get_input_embeddings(), model.get_output_embeddings(), cache,
                          torch.device("cpu"), **kw)  # fmt: skip

    asked = step(graphs=True, compile=True)
    assert not decoder.capturable and asked.forward == asked._forward and not asked.use_graphs
    eager = step(graphs=False, compile=False)
    with torch.no_grad():
        got, want = asked([3, 4], [0, 0]), eager([3, 4], [0, 0])
        # exact: both run the same eager function on the same shapes and inputs
        assert torch.equal(got, want)
        # and it is the model's own answer for each token alone at position 0, to
        # FLOAT_RTOL (rule 1 in tests/helpers.py: the step's packed q/k/v product
        # has other shapes than Hugging Face's three)
        own = model(torch.tensor([[3], [4]])).logits[:, 0]
        assert float_mismatch(got, own) is None, float_mismatch(got, own)
        # the tolerance fails the same tokens stepped at position 1 (a wrong
        # position: each then also attends to the empty cache entry at 0)
        assert float_mismatch(step(graphs=False, compile=False)([3, 4], [1, 1]), own).startswith("max difference ")


def test_compiling_happens_at_startup_so_no_request_waits_for_it(loaded):
    """Without CUDA graphs, DecodeStep compiles at construction the graphs that
    every later step uses: steps of any row count and length afterwards compile nothing."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    s = make_scheduler(loaded, max_running=4, compile=True, cuda_graphs=False)
    built = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert built == 3  # the first shape, dynamic rows and lengths, one row
    works = generate_requests(loaded, 6)
    results, _ = drive(s, works, arrivals=[0, 0, 1, 3, 3, 7])
    for w, r in zip(works, results):
        assert r.token_ids == oracle_tokens(loaded, w)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == built


def test_a_compiler_that_fails_fails_the_start_and_says_how_to_run_without(loaded, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    with pytest.raises(RuntimeError) as raised:
        make_scheduler(loaded, max_running=4, compile=True, cuda_graphs=False)
    assert str(raised.value) == ("preparing the decode step (torch.compile) failed (no working C++ compiler found); "
                                 "PTSERVE_COMPILE=false runs it without")  # fmt: skip


def test_compiling_at_startup_stays_within_a_short_cache():
    """The warm-up's lengths are cut to the cache's positions."""
    torch._dynamo.reset()
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=64)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    cache = SlotKVCache(1, 2, 2, 3, 8, torch.float32, "cpu")  # 3 positions
    step = DecodeStep(slot_model_for(model), model.get_input_embeddings(), model.get_output_embeddings(), cache,
                      torch.device("cpu"), graphs=False, compile=True)  # fmt: skip
    with torch.no_grad():
        assert step([3, 4], [2, 1]).shape == (2, 64)
