"""SlotAttention's mask: which keys each query row sees, laid out for CUDA's kernel.
(The attention itself is checked against Hugging Face's forward in test_models.py.)"""

import torch

from server.engine.kv_cache import SlotKVCache
from server.engine.models.slot_attention import MASK_ALIGN, SlotAttention


def test_the_mask_shows_each_query_its_own_rows_keys_up_to_its_position():
    positions = torch.tensor([[3, 4, 5], [0, 1, 2]])  # a row continuing a prefix, a row from the start
    length, group = 6, 2
    cache = SlotKVCache(1, 2, 1, 8, 4, torch.float32, "cpu")
    mask = SlotAttention(cache, 0, positions, length)._mask(group, torch.float32)
    assert mask.shape == (2, 1, group * 3, length)
    for b in range(2):
        for g in range(group):  # the query heads sharing a key head are extra query rows, in order
            for t in range(3):
                row = mask[b, 0, g * 3 + t]
                seen = [0.0 if k <= positions[b, t] else float("-inf") for k in range(length)]
                assert row.tolist() == seen
    assert all(s % MASK_ALIGN == 0 for s in mask.stride()[:-1]) and mask.stride(-1) == 1


def test_the_mask_is_made_once_per_pass():
    cache = SlotKVCache(1, 1, 1, 8, 4, torch.float32, "cpu")
    attention = SlotAttention(cache, 0, torch.tensor([[2]]), 3)
    assert attention._mask(4, torch.float32) is attention._mask(4, torch.float32)
