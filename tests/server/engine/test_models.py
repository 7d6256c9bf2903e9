"""The slot-cache forwards of server/engine/models against the Hugging Face
model's own forward on the same input embeddings, float32 on the CPU.

None of it is compared bit for bit (rule 1 in tests/helpers.py): even a whole
sequence prefilled alone runs other matrix shapes than Hugging Face's forward
(Llama's q, k and v in one product, its gate and up projections in another;
grouped query heads as extra query rows; an additive mask), and padded
batches and decode steps change shapes again (a one-token query, a longer key
axis). Sums are blocked differently, and differently on another CPU (the
prefill of the tiny Llama is not bit-identical under MKL's AVX2 path): over
36 decode steps the largest difference seen was 9e-6 of the tensor's largest
value (about 50 float32 ulps, through every layer and the LM head). All are
held to FLOAT_RTOL (1e-4) of that scale; a wrong position, mask or slot moves
values by about the scale itself, and the last test shows the tolerance fails
a prefill whose queries see one key ahead."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from ptcore.model import load_model
from server.engine.kv_cache import SlotKVCache
from server.engine.models import slot_model_for
from server.engine.models.gpt2 import GPT2SlotModel
from server.engine.models.llama import LlamaSlotModel
from server.engine.models.slot_attention import SlotAttention
from tests.helpers import float_mismatch


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def causal(request, tiny_model_dirs):
    """Each tiny causal model in float32 on the CPU (whatever PTSERVE_TEST_DEVICE says)."""
    return load_model(str(tiny_model_dirs[request.param]), device="cpu", dtype="float32")


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor):
    """Within FLOAT_RTOL of the tensor's largest value (float_mismatch in tests/helpers.py)."""
    mismatch = float_mismatch(got, want)
    assert mismatch is None, mismatch


def sequences(loaded, lengths, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, loaded.vocab_size, (n,), generator=g) for n in lengths]


@torch.no_grad()
def reference(loaded, ids: torch.Tensor):
    """Hugging Face's forward on one sequence: final hidden states [T, H] (after
    the last norm) and logits [T, V]."""
    embeds = loaded.model.get_input_embeddings()(ids)[None]
    out = loaded.model(inputs_embeds=embeds, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][0], out.logits[0]


def parts(loaded):
    """The slot-cache decoder, and the model's own input embedding and LM head."""
    return slot_model_for(loaded.model), loaded.model.get_input_embeddings(), loaded.model.get_output_embeddings()


def new_cache(decoder, slots=4, max_len=64) -> SlotKVCache:
    return SlotKVCache(decoder.num_layers, slots, decoder.kv_heads, max_len, decoder.head_dim, torch.float32, "cpu")


def test_slot_model_for_picks_the_decoder_of_each_covered_architecture(causal):
    want = {"gpt2": GPT2SlotModel, "llama": LlamaSlotModel}[causal.model.config.model_type]
    assert type(slot_model_for(causal.model)) is want


@torch.no_grad()
def test_a_sequence_prefilled_alone_equals_hugging_face(causal):
    decoder, embed, head = parts(causal)
    for ids in sequences(causal, [9, 23]):
        T = len(ids)
        attention = SlotAttention(new_cache(decoder), 2, torch.arange(T)[None], T)
        hidden = decoder.hidden(embed(ids)[None], attention)[0]
        want_hidden, want_logits = reference(causal, ids)
        assert_close_to_scale(hidden, want_hidden)
        assert_close_to_scale(head(hidden), want_logits)


@torch.no_grad()
def test_a_right_padded_batch_in_later_slots_equals_each_sequence_alone(causal):
    """As the slot backend prefills: rows of different lengths, right-padded, in the slots after the running rows."""
    decoder, embed, head = parts(causal)
    seqs = sequences(causal, [12, 5, 9], seed=1)
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
    attention = SlotAttention(new_cache(decoder), 1, torch.arange(T).expand(len(seqs), T), T)
    hidden = decoder.hidden(embed(ids), attention)  # [B, T, H]
    for b, s in enumerate(seqs):
        want_hidden, want_logits = reference(causal, s)
        assert_close_to_scale(hidden[b, : len(s)], want_hidden)
        assert_close_to_scale(head(hidden[b, : len(s)]), want_logits)


@torch.no_grad()
def test_a_prefix_then_a_chunk_then_single_tokens_equal_the_whole_sequence(causal):
    """The cache carries everything: a prefix prefilled once, the rest of the
    prompt from its start position, then decode steps (row b is slot b, the
    cache read as a view) give the hidden states of one forward over it all."""
    decoder, embed, head = parts(causal)
    (ids,) = sequences(causal, [40], seed=2)
    want_hidden, want_logits = reference(causal, ids)
    cache = new_cache(decoder, slots=1)
    prefix = decoder.hidden(embed(ids[:4])[None], SlotAttention(cache, 0, torch.arange(4)[None], 4))
    assert_close_to_scale(prefix[0], reference(causal, ids[:4])[0])
    chunk = decoder.hidden(embed(ids[4:10])[None], SlotAttention(cache, 0, torch.arange(4, 10)[None], 10))
    assert_close_to_scale(chunk[0], want_hidden[4:10])
    for p in range(10, len(ids)):
        step = decoder.hidden(embed(ids[p : p + 1])[None], SlotAttention(cache, 0, torch.tensor([[p]]), p + 1))
        assert_close_to_scale(step[0, 0], want_hidden[p])
        assert_close_to_scale(head(step[0, 0]), want_logits[p])


@torch.no_grad()
def test_rows_at_different_positions_decode_together(causal):
    """One decode step for two rows whose sequences have different lengths."""
    decoder, embed = slot_model_for(causal.model), causal.model.get_input_embeddings()
    seqs = sequences(causal, [7, 15], seed=3)
    cache = new_cache(decoder, slots=2)
    for slot, s in enumerate(seqs):  # prefill all but the last token of each, alone
        n = len(s) - 1
        decoder.hidden(embed(s[:n])[None], SlotAttention(cache, slot, torch.arange(n)[None], n))
    last = torch.stack([s[-1] for s in seqs])[:, None]  # [2, 1]
    positions = torch.tensor([[len(s) - 1] for s in seqs])
    step = decoder.hidden(embed(last), SlotAttention(cache, 0, positions, max(len(s) for s in seqs)))
    for b, s in enumerate(seqs):
        assert_close_to_scale(step[b, 0], reference(causal, s)[0][-1])


def test_slot_model_for_returns_none_for_an_uncovered_architecture():
    """The server then runs the Hugging Face backend."""
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=64))  # fmt: skip
    assert slot_model_for(neox) is None
    # a covered model type with an option its decoder does not implement
    upcast = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, reorder_and_upcast_attn=True))
    assert slot_model_for(upcast) is None


class OneKeyAhead(SlotAttention):
    """A broken mask for the mutation check: each query also sees the key one
    position after its own (a future token)."""

    def _mask(self, group, dtype):
        if self._bias is None:
            own, self.positions = self.positions, self.positions + 1
            try:
                super()._mask(group, dtype)
            finally:
                self.positions = own
        return self._bias


@torch.no_grad()
def test_the_tolerance_fails_a_prefill_that_sees_one_key_ahead(causal):
    """test_a_sequence_prefilled_alone_equals_hugging_face with a mask that
    leaks the next token: assert_close_to_scale fails it."""
    decoder, embed, head = parts(causal)
    (ids,) = sequences(causal, [9])
    T = len(ids)
    hidden = decoder.hidden(embed(ids)[None], OneKeyAhead(new_cache(decoder), 2, torch.arange(T)[None], T))[0]
    want_hidden, want_logits = reference(causal, ids)
    with pytest.raises(AssertionError, match="max difference"):
        assert_close_to_scale(hidden, want_hidden)
    with pytest.raises(AssertionError, match="max difference"):
        assert_close_to_scale(head(hidden), want_logits)
