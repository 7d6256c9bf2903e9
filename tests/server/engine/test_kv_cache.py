"""SlotKVCache: every way in and out of the slots gives back exactly what went in,
and touches nothing else. Compared bit for bit: reads and writes are copies
of the same numbers, computed by nothing (rule 2 in tests/helpers.py)."""

import math

import torch

from server.engine.kv_cache import SlotKVCache

LAYERS, SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM = 2, 4, 2, 8, 3


def cache() -> SlotKVCache:
    return SlotKVCache(LAYERS, SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM, torch.float32, "cpu")


def numbered(*shape, start=1.0) -> torch.Tensor:
    """Distinct values, so that a misplaced element shows."""
    return torch.arange(start, start + math.prod(shape)).view(*shape)


def test_a_new_cache_is_zeros_of_the_asked_shape_with_each_layer_a_view_of_one_tensor():
    c = cache()
    assert len(c.keys) == len(c.values) == LAYERS and (c.slots, c.max_len) == (SLOTS, MAX_LEN)
    for t in (*c.keys, *c.values):
        assert torch.equal(t, torch.zeros(SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM))
    for layer in range(LAYERS):
        assert c.keys[layer].data_ptr() == c.all_keys[layer].data_ptr()
        assert c.values[layer].data_ptr() == c.all_values[layer].data_ptr()


def test_write_puts_each_row_at_its_own_slot_and_positions():
    c = cache()
    k = numbered(2, KV_HEADS, 3, HEAD_DIM)  # [B, kv_heads, T, head_dim]
    v = -k
    c.write(1, torch.tensor([3, 0]), torch.tensor([[0, 1, 2], [5, 6, 7]]), k, v)
    want_k = torch.zeros(SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM)
    want_k[3, :, 0:3] = k[0]
    want_k[0, :, 5:8] = k[1]
    assert torch.equal(c.keys[1], want_k) and torch.equal(c.values[1], -want_k)
    assert torch.equal(c.keys[0], torch.zeros_like(want_k))  # other layers untouched


def test_read_is_a_view_of_consecutive_slots():
    c = cache()
    k = numbered(SLOTS, KV_HEADS, 4, HEAD_DIM)
    c.write(0, torch.arange(SLOTS), torch.arange(4).expand(SLOTS, 4), k, k + 100)
    keys, values = c.read(0, first=0, rows=2, length=4)
    assert torch.equal(keys, k[:2]) and torch.equal(values, k[:2] + 100)
    assert keys.data_ptr() == c.keys[0].data_ptr()  # a view, no copy (the decode step reads it in place)
    keys, values = c.read(0, first=1, rows=3, length=2)
    assert torch.equal(keys, k[1:, :, :2]) and torch.equal(values, k[1:, :, :2] + 100)
    assert keys.data_ptr() == c.keys[0][1].data_ptr()


def test_move_copies_a_prefix_of_one_slot_into_another_in_every_layer():
    c = cache()
    for layer in range(LAYERS):
        k = numbered(1, KV_HEADS, 5, HEAD_DIM, start=1000.0 * layer)
        c.write(layer, torch.tensor([3]), torch.arange(5)[None], k, -k)
    before = [t.clone() for t in (*c.keys, *c.values)]
    c.move(src=3, dst=1, length=4)
    for t, old in zip((*c.keys, *c.values), before):
        want = old.clone()
        want[1, :, :4] = old[3, :, :4]  # position 4 of the source is not copied
        assert torch.equal(t, want)


def test_export_then_load_round_trips_prefixes_of_different_lengths():
    c = cache()
    for layer in range(LAYERS):
        k = numbered(SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM, start=1000.0 * layer)
        c.write(layer, torch.arange(SLOTS), torch.arange(MAX_LEN).expand(SLOTS, MAX_LEN), k, -k)
    long, short = c.export(0, 5), c.export(2, 2)
    assert long[0].shape == long[1].shape == (LAYERS, KV_HEADS, 5, HEAD_DIM)
    for layer in range(LAYERS):
        assert torch.equal(long[0][layer], c.keys[layer][0, :, :5])
        assert torch.equal(long[1][layer], c.values[layer][0, :, :5])
    assert long[0].data_ptr() != c.all_keys.data_ptr()  # a copy: the slot may be reused

    other = cache()
    other.load([1, 3, 0], [short, long, short])
    for layer in range(LAYERS):
        for slot, (keys, values) in ((1, short), (3, long), (0, short)):
            n = keys.shape[2]
            assert torch.equal(other.keys[layer][slot, :, :n], keys[layer])
            assert torch.equal(other.values[layer][slot, :, :n], values[layer])
            assert torch.equal(other.keys[layer][slot, :, n:], torch.zeros(KV_HEADS, MAX_LEN - n, HEAD_DIM))
        assert torch.equal(other.keys[layer][2], torch.zeros(KV_HEADS, MAX_LEN, HEAD_DIM))  # untouched


def test_an_exported_prefix_keeps_its_values_when_its_slot_is_overwritten():
    c = cache()
    k = numbered(1, KV_HEADS, 3, HEAD_DIM)
    c.write(0, torch.tensor([0]), torch.arange(3)[None], k, k)
    saved = c.export(0, 3)
    c.write(0, torch.tensor([0]), torch.arange(3)[None], torch.zeros_like(k), torch.zeros_like(k))
    assert torch.equal(saved[0][0], k[0]) and torch.equal(saved[1][0], k[0])


def test_clear_zeros_one_slot_in_every_layer_and_nothing_else():
    c = cache()
    for layer in range(LAYERS):
        k = numbered(SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM, start=1000.0 * layer)
        c.write(layer, torch.arange(SLOTS), torch.arange(MAX_LEN).expand(SLOTS, MAX_LEN), k, -k)
    before = [t.clone() for t in (*c.keys, *c.values)]
    c.clear(2)
    for t, old in zip((*c.keys, *c.values), before):
        want = old.clone()
        want[2] = 0
        assert torch.equal(t, want)
