"""The slot backend: rows join and leave mid-generation, prefixes are reused,
and every answer equals the request computed alone (the oracle)."""

import pytest
import torch

from prompt_store.template import render
from ptcore.model import load_model
from ptcore.task_prompt import task_prompt
from server.engine.models import slot_model_for
from server.engine.outputs import Collected
from server.engine.request import Request, SamplingParams
from tests.helpers import drive, generate_requests, make_scheduler, oracle_tokens, random_prompt, submit_from_threads


def fresh(requests):
    """The same requests again, unanswered (a request is answered once)."""
    return [Request.generate(r.prompt, r.input_ids, r.params) for r in requests]


def test_packing_llama_projections_changes_nothing_the_model_computes(tiny_model_dirs):
    """The decoder packs q/k/v and gate/up weights into one matrix each; the
    model's own forward and memory stay as they were, and packing twice copies nothing."""
    loaded = load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32")
    ids = torch.tensor([[5, 17, 33, 2, 9]])
    before = loaded.model(ids).logits
    params = sum(p.numel() for p in loaded.model.parameters())
    first, second = slot_model_for(loaded.model), slot_model_for(loaded.model)
    # exact: the same forward on the same shapes and weight values (packing only
    # moves the weights into one storage), so the same kernels on the same numbers
    assert torch.equal(loaded.model(ids).logits, before)
    assert sum(p.numel() for p in loaded.model.parameters()) == params
    attn = loaded.model.model.layers[0].self_attn
    assert first.qkv[0].weight.data_ptr() == second.qkv[0].weight.data_ptr() == attn.q_proj.weight.data_ptr()
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.nbytes


def test_joins_and_leaves_mid_generation_equal_alone(loaded):
    s = make_scheduler(loaded, max_running=3)
    works = generate_requests(loaded, 9)
    results, log = drive(s, works, arrivals=[0, 0, 1, 2, 3, 5, 8, 8, 13])
    for w, r in zip(works, results):
        assert r.token_ids == oracle_tokens(loaded, w)
    joins = {i: s for s, e, i in log if e == "join"}
    leaves = {i: s for s, e, i in log if e == "leave"}
    # someone joined while others were mid-generation, and someone left while others went on
    assert any(joins[i] > min(joins.values()) and joins[i] < max(leaves.values()) for i in joins)
    assert any(leaves[i] < max(leaves.values()) for i in leaves)
    assert s.running() == 0


def test_prefix_reuse_on_and_off_give_identical_tokens(loaded):
    with_reuse, without = make_scheduler(loaded), make_scheduler(loaded, prefix_cache_size=0)
    works = generate_requests(loaded, 12)
    a, _ = drive(with_reuse, works)
    c, _ = drive(without, fresh(works))
    assert [r.token_ids for r in a] == [r.token_ids for r in c]
    # 12 requests of 5 tasks; 10 of them of the 4 tasks whose template has a prefix: 4 misses, 6 hits
    assert prefixes(with_reuse)["hits"] == 6
    assert prefixes(without) == {"size": 0, "capacity": 0, "hits": 0, "misses": 0, "evictions": 0}  # never asked
    for w, r in zip(works, a):
        assert r.token_ids == oracle_tokens(loaded, w)


def test_an_admission_is_one_forward_and_a_missed_prefix_is_exported_by_its_first_row(loaded):
    """Newcomers whose prefix is not cached prefill everything in the same pass
    as the rest; the first of each task leaves its prefix in the cache, equal to
    the keys and values its slot holds, and the next admission loads it."""
    s = make_scheduler(loaded, max_running=8)
    backend = s.batch.backend
    passes, lengths = [], []
    hidden = backend.model.hidden
    backend.model.hidden = lambda x, attention: (
        passes.append(x.shape[:2]) or lengths.append(attention.length) or hidden(x, attention)
    )
    works = generate_requests(loaded, 8, tasks=2, max_new=lambda i: 3)  # t0, t1 alternate; both have a prefix
    s.batch.prefill(works[:6])
    assert len(passes) == 1 and passes[0][0] == 6
    assert prefixes(s) == {"size": 2, "capacity": 8, "hits": 0, "misses": 2, "evictions": 0}
    for slot, w in ((0, works[0]), (1, works[1])):  # the first newcomer of t0, of t1
        keys, values = backend.prefixes.get(w.prompt.key)
        n = w.prompt.prefix_len
        # exact: the cached prefix is a copy of what the prefill wrote in the slot
        assert keys.shape[2] == n and torch.equal(keys, backend.cache.all_keys[:, slot, :, :n])
        assert torch.equal(values, backend.cache.all_values[:, slot, :, :n])
    s.batch.prefill(works[6:])  # both prefixes cached now: each newcomer prefills past its prefix
    assert len(passes) == 2 and passes[1] == (2, max(len(w.input_ids) - w.prompt.prefix_len for w in works[6:]))
    # one cached (t0), one not (a new task): each row reads the keys up to the furthest end, no more
    mixed = [generate_requests(loaded, 3, tasks=3)[2], works[0]]
    mixed[1] = Request.generate(mixed[1].prompt, mixed[1].input_ids, mixed[1].params)
    while s.batch.running:
        s.batch.decode()
    s.batch.prefill(mixed)
    assert lengths[-1] == max(len(w.input_ids) for w in mixed) < mixed[1].prompt.prefix_len + len(mixed[0].input_ids)
    while s.batch.running:
        s.batch.decode()
    for w in works + mixed:
        assert w.result().token_ids == oracle_tokens(loaded, w)


def test_a_failed_prefill_leaves_its_slots_zeroed_and_free(loaded):
    """A pass that raised part-way (out of memory, say) may have written its
    slots, with values that overflowed: they are zeroed, and stay free."""
    s = make_scheduler(loaded, max_running=4)
    running = generate_requests(loaded, 1, tasks=1, max_new=lambda i: 30)
    s.batch.prefill(running)
    backend, cache = s.batch.backend, s.batch.backend.cache
    real = backend._forward

    def overflow_then_fail(first, *args):
        real(first, *args)
        cache.all_keys[:, first:].fill_(float("nan"))
        raise RuntimeError("out of memory")

    backend._forward = overflow_then_fail
    newcomers = generate_requests(loaded, 2, tasks=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        s.batch.prefill(newcomers)
    assert backend.rows == 1 and s.batch.running == 1
    assert torch.count_nonzero(cache.all_keys[:, 1:3]) == 0 and torch.count_nonzero(cache.all_values[:, 1:3]) == 0
    assert not cache.all_keys[:, 0].isnan().any()  # the running row's slot is its own
    backend._forward = real
    while s.batch.running:
        s.batch.decode()
    assert running[0].result().token_ids == oracle_tokens(loaded, running[0])


def test_eviction_with_a_prefix_cache_smaller_than_the_task_count(loaded):
    s = make_scheduler(loaded, prefix_cache_size=2)
    works = generate_requests(loaded, 15, tasks=5)
    results, _ = drive(s, works)
    stats = prefixes(s)
    assert stats["evictions"] == stats["misses"] - 2 and stats["size"] == 2
    for w, r in zip(works, results):
        assert r.token_ids == oracle_tokens(loaded, w)


def test_a_new_version_never_gets_the_old_prefix(loaded):
    s = make_scheduler(loaded)
    v1 = generate_requests(loaded, 1, tasks=1, version=1)
    v2 = generate_requests(loaded, 1, tasks=1, version=2)  # same task id, other rows
    (r1,), _ = drive(s, v1)
    (r2,), _ = drive(s, v2)
    assert r2.token_ids == oracle_tokens(loaded, v2[0])
    assert r1.token_ids != r2.token_ids


def test_token_budget_bounds_admission(loaded):
    works = generate_requests(loaded, 6, tasks=1, max_new=lambda i: 20)  # all of one size
    need = works[0].need
    s = make_scheduler(loaded, max_running=8, max_tokens=2 * need + 1)
    results, log = drive(s, works)
    running, peak = 0, 0
    for _, event, _ in log:
        running += 1 if event == "join" else -1
        peak = max(peak, running)
    assert peak == 2
    for w, r in zip(works, results):
        assert r.token_ids == oracle_tokens(loaded, w)


def test_scheduler_serves_concurrent_submissions(loaded):
    s = make_scheduler(loaded, max_running=4, max_batch_size=8, max_wait_s=0.05)
    collected = Collected()
    s.start(collected)
    works = generate_requests(loaded, 14)
    results = submit_from_threads(s, works, collected)
    s.stop()
    for w, r in zip(works, results):
        assert r.token_ids == oracle_tokens(loaded, w)
    snap = s.stats.snapshot()
    assert snap["requests"] == len(works)
    assert any(x["kind"] == "decode" and x["size"] > 1 and x["tasks"] > 1 for x in snap["recent"])


def test_a_request_no_longer_than_the_prefix_does_not_poison_it(loaded):
    """`[P:3]{input}` with an empty input renders only the prefix: it must neither
    use nor store a short prefix under the task's key."""
    s = make_scheduler(loaded)
    prompt = task_prompt("p", 1, random_prompt(loaded, "[P:3]{input}", seed=4), loaded)

    def work(text):
        return Request.generate(prompt, render(prompt.template, loaded.tokenizer, {"input": text}, loaded.vocab_size),
                                SamplingParams(max_new_tokens=6))  # fmt: skip

    short, normal, again = work(""), work("json parse"), work("a path")
    assert len(short.input_ids) == prompt.prefix_len == 3
    for w in (short, normal, again):  # one after another: the cache state carries over
        (r,), _ = drive(s, [w])
        assert r.token_ids == oracle_tokens(loaded, w)
    assert prefixes(s)["hits"] == 1  # `again` reused what `normal` stored


def test_each_task_prefix_is_computed_once_per_batch(loaded):
    s = make_scheduler(loaded, max_running=12)
    works = generate_requests(loaded, 12, tasks=3)  # 4 requests each of 3 tasks, admitted together
    results, _ = drive(s, works)
    with_prefix = {(w.prompt.task_id, w.prompt.version) for w in works if w.prompt.prefix_len}
    assert prefixes(s)["misses"] == len(with_prefix) and prefixes(s)["size"] == len(with_prefix)
    for w, r in zip(works, results):
        assert r.token_ids == oracle_tokens(loaded, w)


def prefixes(scheduler) -> dict:
    return scheduler.batch.backend.prefixes.stats()
