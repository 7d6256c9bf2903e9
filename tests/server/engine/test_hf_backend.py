"""The Hugging Face backend: rows that finish at different steps leave the
batch, and the others still get the oracle's tokens, whether the cache can
drop rows (attention layers) or not (a convolution layer's state)."""

import pytest
import torch
from transformers import Lfm2Config, Lfm2ForCausalLM

from ptcore.model import LoadedModel, describe_model
from tests.helpers import drive, generate_requests, make_scheduler, oracle_tokens


@pytest.fixture(scope="module")
def lfm2(gpt2):
    """A tiny random LFM2: one short-convolution layer, whose cache state cannot select rows."""
    tok = gpt2.tokenizer
    config = Lfm2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
                        max_position_embeddings=512, eos_token_id=tok.eos_token_id, pad_token_id=0,
                        bos_token_id=tok.bos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = Lfm2ForCausalLM(config).eval().requires_grad_(False)
    return LoadedModel(model, tok, torch.device("cpu"), torch.float32, describe_model(model, "lfm2-tiny"), 512)


def test_rows_leave_at_different_steps_on_a_cache_that_drops_rows(loaded):
    s = make_scheduler(loaded, "static", max_running=8)
    requests = generate_requests(loaded, 5, max_new=lambda i: 2 + 3 * i)
    results, log = drive(s, requests)
    assert [r.token_ids for r in results] == [oracle_tokens(loaded, r) for r in requests]
    assert s.batch.backend._selectable and s.batch.backend.rows == 0


def test_rows_leave_at_different_steps_on_a_cache_that_cannot_drop_rows(lfm2):
    s = make_scheduler(lfm2, "auto", max_running=8)
    requests = generate_requests(lfm2, 4, max_new=lambda i: 2 + 3 * i)
    results, _ = drive(s, requests)
    assert not s.batch.backend._selectable  # finished rows rode along, unread
    assert [r.token_ids for r in results] == [oracle_tokens(lfm2, r) for r in requests]
    assert s.batch.backend.rows == 0
