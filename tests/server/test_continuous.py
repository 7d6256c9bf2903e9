"""Continuous batching: rows join and leave mid-generation, prefixes are reused,
and every answer equals the request computed alone (the oracle)."""

import os

import pytest
import torch

from prompt_store.template import render
from ptcore.model import load_model
from ptcore.task_prompt import task_prompt
from server.engine.batch import ContinuousBatcher
from server.engine.continuous_scheduler import ContinuousScheduler
from server.engine.kv_cache import SlotKVCache
from server.engine.models import decoder_for
from server.engine.request import GenerateWork, SamplingParams
from server.engine.runner import ModelRunner
from server.engine.scheduler import BatchStats
from tests.helpers import TEMPLATES, alone_greedy, random_prompt, submit_from_threads


def works_for(loaded, n, tasks=5, version=1, max_new=lambda i: 4 + 3 * (i % 4)):
    out = []
    for i in range(n):
        template, fields = TEMPLATES[i % tasks % len(TEMPLATES)]
        prompt = task_prompt(
            f"t{i % tasks}", version, random_prompt(loaded, template, seed=i % tasks + 10 * version), loaded
        )
        ids = render(prompt.template, loaded.tokenizer, fields, loaded.vocab_size)
        out.append(GenerateWork(prompt, ids, SamplingParams(max_new_tokens=max_new(i))))
    return out


def oracle(loaded, batcher, w):
    return alone_greedy(loaded.model, w.prompt.rows, w.input_ids, loaded.vocab_size, w.params.max_new_tokens,
                        batcher.eos_ids)  # fmt: skip


def batcher(loaded, **kw):
    """A batcher for the tests. PTSERVE_COMPILE=true (bench/gpu_check.sh) compiles
    every decode step; each one then starts from a clean torch.compile cache, so
    that no test falls back to eager after too many recompilations."""
    args = dict(max_running=4, max_len=128, max_tokens=10**6, prefix_cache_size=8,
                compile=os.environ.get("PTSERVE_COMPILE", "false").lower() == "true")  # fmt: skip
    args.update(kw)
    if args["compile"]:
        torch._dynamo.reset()
    return ContinuousBatcher(loaded, decoder_for(loaded.model), **args)


def drive(b, works, arrivals=None):
    """Feed works into the batcher, some arriving only after a number of steps;
    returns {id(work): result} and the log of (step, event, index)."""
    arrivals = arrivals or [0] * len(works)
    pending = sorted(range(len(works)), key=lambda i: arrivals[i])
    results, log, step = {}, [], 0

    def done(w, r):
        results[id(w)] = r
        log.append((step, "leave", works.index(w)))

    while pending or b.running:
        admitted = []
        while pending and arrivals[pending[0]] <= step and b.fits(works[pending[0]], admitted):
            admitted.append(works[pending.pop(0)])
        if admitted:
            log.extend((step, "join", works.index(w)) for w in admitted)
            b.admit(admitted, done)
        if b.running:
            b.step(done)
        step += 1
    return results, log


def test_the_decoders_cover_the_test_models(loaded):
    assert decoder_for(loaded.model) is not None


def test_packing_llama_projections_changes_nothing_the_model_computes(tiny_model_dirs):
    """The decoder packs q/k/v and gate/up weights into one matrix each; the
    model's own forward and memory stay as they were, and packing twice copies nothing."""
    loaded = load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32")
    ids = torch.tensor([[5, 17, 33, 2, 9]])
    before = loaded.model(ids).logits
    params = sum(p.numel() for p in loaded.model.parameters())
    first, second = decoder_for(loaded.model), decoder_for(loaded.model)
    assert torch.equal(loaded.model(ids).logits, before)
    assert sum(p.numel() for p in loaded.model.parameters()) == params
    attn = loaded.model.model.layers[0].self_attn
    assert first.qkv[0][0].data_ptr() == second.qkv[0][0].data_ptr() == attn.q_proj.weight.data_ptr()
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.nbytes


def test_joins_and_leaves_mid_generation_equal_alone(loaded):
    b = batcher(loaded, max_running=3)
    works = works_for(loaded, 9)
    results, log = drive(b, works, arrivals=[0, 0, 1, 2, 3, 5, 8, 8, 13])
    for w in works:
        assert results[id(w)].token_ids == oracle(loaded, b, w)
    joins = {i: s for s, e, i in log if e == "join"}
    leaves = {i: s for s, e, i in log if e == "leave"}
    # someone joined while others were mid-generation, and someone left while others went on
    assert any(joins[i] > min(joins.values()) and joins[i] < max(leaves.values()) for i in joins)
    assert any(leaves[i] < max(leaves.values()) for i in leaves)
    assert b.running == 0


def test_prefix_reuse_on_and_off_give_identical_tokens(loaded):
    with_reuse, without = batcher(loaded), batcher(loaded, prefix_cache_size=0)
    works = works_for(loaded, 12)
    a, _ = drive(with_reuse, works)
    c, _ = drive(without, works)
    assert [a[id(w)].token_ids for w in works] == [c[id(w)].token_ids for w in works]
    assert with_reuse.prefixes.stats()["hits"] > 0 and without.prefixes.stats()["size"] == 0
    for w in works:
        assert a[id(w)].token_ids == oracle(loaded, with_reuse, w)


def test_eviction_with_a_prefix_cache_smaller_than_the_task_count(loaded):
    b = batcher(loaded, prefix_cache_size=2)
    works = works_for(loaded, 15, tasks=5)
    results, _ = drive(b, works)
    stats = b.prefixes.stats()
    assert stats["evictions"] > 0 and stats["size"] <= 2
    for w in works:
        assert results[id(w)].token_ids == oracle(loaded, b, w)


def test_a_new_version_never_gets_the_old_prefix(loaded):
    b = batcher(loaded)
    v1 = works_for(loaded, 1, tasks=1, version=1)
    v2 = works_for(loaded, 1, tasks=1, version=2)  # same task id, other rows
    r1, _ = drive(b, v1)
    r2, _ = drive(b, v2)
    assert r2[id(v2[0])].token_ids == oracle(loaded, b, v2[0])
    assert r1[id(v1[0])].token_ids != r2[id(v2[0])].token_ids


def test_token_budget_bounds_admission(loaded):
    works = works_for(loaded, 6, tasks=1, max_new=lambda i: 20)  # all of one size
    need = ContinuousBatcher.need(works[0])
    b = batcher(loaded, max_running=8, max_tokens=2 * need + 1)
    results, log = drive(b, works)
    running, peak = 0, 0
    for _, event, _ in log:
        running += 1 if event == "join" else -1
        peak = max(peak, running)
    assert peak == 2
    for w in works:
        assert results[id(w)].token_ids == oracle(loaded, b, w)


def test_slot_cache_write_read_move():
    cache = SlotKVCache(num_layers=1, slots=3, kv_heads=2, max_len=8, head_dim=4, dtype=torch.float32, device="cpu")
    k = torch.randn(2, 2, 3, 4)
    v = torch.randn(2, 2, 3, 4)
    cache.write(0, torch.tensor([2, 0]), torch.tensor([[0, 1, 2], [4, 5, 6]]), k, v)
    keys, values = cache.gather(0, torch.tensor([2]), 3)
    assert torch.equal(keys[0], k[0]) and torch.equal(values[0], v[0])
    assert torch.equal(cache.keys[0][0, :, 4:7], k[1])
    cache.move(2, 1, 3)
    assert torch.equal(cache.read(0, 2, 3)[0][1], k[0])


def test_slot_cache_loads_prefixes_of_different_lengths_into_their_slots():
    cache = SlotKVCache(num_layers=2, slots=4, kv_heads=2, max_len=8, head_dim=4, dtype=torch.float32, device="cpu")
    short = [(torch.randn(2, 2, 4), torch.randn(2, 2, 4)) for _ in range(2)]  # per layer: [kv_heads, 2, head_dim]
    long = [(torch.randn(2, 5, 4), torch.randn(2, 5, 4)) for _ in range(2)]
    cache.load([3, 0, 1], [short, long, short])
    for layer in range(2):
        for slot, kv in ((3, short), (0, long), (1, short)):
            n = kv[layer][0].shape[1]
            assert torch.equal(cache.keys[layer][slot, :, :n], kv[layer][0])
            assert torch.equal(cache.values[layer][slot, :, :n], kv[layer][1])
        assert torch.equal(cache.keys[layer][2], torch.zeros(2, 8, 4))  # untouched


def test_scheduler_serves_concurrent_submissions(loaded):
    b = batcher(loaded, max_running=4)
    stats = BatchStats()
    s = ContinuousScheduler(b, ModelRunner(loaded), max_batch_size=8, max_wait_s=0.05, stats=stats)
    s.start()
    works = works_for(loaded, 14)
    results = submit_from_threads(s, works)
    s.stop()
    for w, r in zip(works, results):
        assert r.token_ids == oracle(loaded, b, w)
    snap = stats.snapshot()
    assert snap["requests"] == len(works)
    assert any(x["kind"] == "decode" and x["size"] > 1 and x["tasks"] > 1 for x in snap["recent"])


@pytest.mark.parametrize("temperature", [0.8])
def test_seeded_sampling_matches_the_static_runner(loaded, temperature):
    """Same seed, same draws on both engines (one request, so no batch effects)."""
    w = works_for(loaded, 1)[0]
    params = SamplingParams(max_new_tokens=8, temperature=temperature, top_k=20, seed=42)
    sampled = GenerateWork(w.prompt, w.input_ids, params)
    continuous, _ = drive(batcher(loaded), [sampled])
    static = ModelRunner(loaded).generate([GenerateWork(w.prompt, w.input_ids, params)])[0]
    assert continuous[id(sampled)].token_ids == static.token_ids


def test_a_request_no_longer_than_the_prefix_does_not_poison_it(loaded):
    """`[P:3]{input}` with an empty input renders only the prefix: it must neither
    use nor store a short prefix under the task's key."""
    b = batcher(loaded)
    prompt = task_prompt("p", 1, random_prompt(loaded, "[P:3]{input}", seed=4), loaded)

    def work(text):
        return GenerateWork(prompt, render(prompt.template, loaded.tokenizer, {"input": text}, loaded.vocab_size),
                            SamplingParams(max_new_tokens=6))  # fmt: skip

    short, normal, again = work(""), work("json parse"), work("a path")
    assert len(short.input_ids) == prompt.prefix_len == 3
    results = {}
    for w in (short, normal, again):  # one after another: the cache state carries over
        r, _ = drive(b, [w])
        results.update(r)
    for w in (short, normal, again):
        assert results[id(w)].token_ids == oracle(loaded, b, w)
    assert b.prefixes.stats()["hits"] == 1  # `again` reused what `normal` stored


def test_each_task_prefix_is_computed_once_per_batch(loaded):
    b = batcher(loaded, max_running=12)
    works = works_for(loaded, 12, tasks=3)  # 4 requests each of 3 tasks, admitted together
    results, _ = drive(b, works)
    with_prefix = {(w.prompt.task_id, w.prompt.version) for w in works if w.prompt.prefix_len}
    assert b.prefixes.stats()["misses"] == len(with_prefix) and b.prefixes.stats()["size"] == len(with_prefix)
    for w in works:
        assert results[id(w)].token_ids == oracle(loaded, b, w)
