"""The join of ptcore/inputs.py on hand-made tensors: which rows the prompt
table holds, how sequences are padded and numbered, and what each id embeds to.

Every comparison here is exact, on any CPU: the results are integer ids, or
gathers, concatenations and casts of the same numbers, and the one gradient
sums a few ones (rule 2 in tests/helpers.py)."""

import torch
from torch import nn

from ptcore.inputs import embed, pack, prompt_table

V = 10  # vocab size: ids >= V are virtual
CPU = torch.device("cpu")


def test_prompt_table_stacks_each_distinct_tensor_once_by_identity():
    a = torch.arange(6.0).view(2, 3)
    b = torch.arange(6.0, 15.0).view(3, 3)
    same_values_as_a = a.clone()  # equal values, another tensor: its own rows
    table, offsets = prompt_table([a, b, a, same_values_as_a, b])
    assert torch.equal(table, torch.cat([a, b, same_values_as_a]))
    assert offsets == [0, 2, 0, 5, 2]


def test_pack_left_pads_and_numbers_real_tokens_only():
    seqs = [[1, 2, V + 0, 3], [V + 1, 4]]  # row 1's task starts at row 5 of the table
    ids, mask, positions = pack(seqs, [0, 5], V, CPU, left=True)
    assert ids.dtype == mask.dtype == positions.dtype == torch.long
    assert torch.equal(ids, torch.tensor([[1, 2, V + 0, 3], [0, 0, V + 6, 4]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    # padding's positions are never read (masked out); real tokens count from 0
    assert positions[mask.bool()].tolist() == [0, 1, 2, 3, 0, 1]


def test_pack_right_pads_for_masked_lms_and_encoders():
    seqs = [[V + 0, 7], [1, V + 2, 2, 3]]
    ids, mask, positions = pack(seqs, [3, 0], V, CPU, left=False)
    assert torch.equal(ids, torch.tensor([[V + 3, 7, 0, 0], [1, V + 2, 2, 3]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    assert positions[mask.bool()].tolist() == [0, 1, 0, 1, 2, 3]


def test_pack_shifts_only_virtual_ids():
    """Real ids, however large, stay as they are; the id V-1 is real, V is virtual."""
    ids, _, _ = pack([[V - 1, V, 0]], [4], V, CPU)
    assert ids.tolist() == [[V - 1, V + 4, 0]]


def embedding(dtype=torch.float32) -> nn.Embedding:
    e = nn.Embedding(V, 3).to(dtype)
    with torch.no_grad():
        e.weight.copy_(torch.arange(V * 3, dtype=dtype).view(V, 3))
    return e


def test_embed_reads_real_ids_from_the_matrix_and_virtual_ids_from_the_table():
    e = embedding()
    table = -torch.arange(1.0, 13.0).view(4, 3)  # 4 prompt rows, negative: unlike any embedding row
    ids = torch.tensor([[2, V + 0, V + 3], [V + 1, 0, 9]])
    out = embed(e, ids, table, V)
    want = torch.stack(
        [torch.stack([e.weight[2], table[0], table[3]]), torch.stack([table[1], e.weight[0], e.weight[9]])]
    )
    assert torch.equal(out, want)


def test_embed_without_virtual_ids_is_the_embedding():
    e = embedding()
    ids = torch.tensor([[3, 1, 4]])
    assert torch.equal(embed(e, ids, torch.zeros(0, 3), V), e(ids))


def test_embed_casts_table_rows_to_the_embedding_dtype():
    """A float32 prompt on a bfloat16 model is served in bfloat16."""
    e = embedding(torch.bfloat16)
    table = torch.tensor([[0.1, 0.2, 0.3]])  # not exact in bfloat16
    out = embed(e, torch.tensor([[1, V]]), table, V)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0, 0], e.weight[1].detach())
    assert torch.equal(out[0, 1], table[0].to(torch.bfloat16))


def test_gradients_reach_only_the_table_rows_used():
    """Training backpropagates into the prompt through the same join."""
    e = embedding()
    table = torch.zeros(3, 3, requires_grad=True)
    embed(e, torch.tensor([[V + 2, 5, V + 2, V + 0]]), table, V).sum().backward()
    assert torch.equal(table.grad, torch.tensor([[1.0] * 3, [0.0] * 3, [2.0] * 3]))
