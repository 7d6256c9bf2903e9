"""Which backend a model's generate requests run on."""

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from ptcore.model import LoadedModel, describe_model
from server.engine.backends import make_batch
from server.engine.hf_backend import HFBackend
from server.engine.slot_backend import SlotBackend


def test_auto_picks_the_slot_backend_where_the_architecture_is_covered(loaded):
    assert type(make_batch(loaded, "auto", max_seq_len=64).backend) is SlotBackend
    assert type(make_batch(loaded, "continuous", max_seq_len=64).backend) is SlotBackend


def test_static_and_device_map_use_the_hugging_face_backend(loaded):
    assert type(make_batch(loaded, "static").backend) is HFBackend
    assert type(make_batch(loaded, "auto", spread=True).backend) is HFBackend


def test_the_slot_length_is_bounded_by_the_model(loaded):
    assert make_batch(loaded, "auto", max_seq_len=4096).backend.max_len == loaded.max_positions == 512


@pytest.fixture(scope="module")
def neox(gpt2):
    config = GPTNeoXConfig(vocab_size=len(gpt2.tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    model = GPTNeoXForCausalLM(config).eval()
    return LoadedModel(model, gpt2.tokenizer, torch.device("cpu"), torch.float32, describe_model(model, "neox"), 128)


def test_an_uncovered_architecture_runs_static_or_is_refused_when_continuous_is_asked(neox):
    assert type(make_batch(neox, "auto").backend) is HFBackend
    with pytest.raises(ValueError) as caught:
        make_batch(neox, "continuous")
    assert str(caught.value) == "engine=continuous does not cover model_type 'gpt_neox'; use engine=static or auto"
    with pytest.raises(ValueError) as caught:
        make_batch(neox, "continuous", spread=True)
    assert str(caught.value) == (
        "engine=continuous does not cover a model spread by device_map; use engine=static or auto"
    )


def test_a_model_that_only_classifies_has_no_generate_batch(tmp_path):
    from ptcore.model import load_model
    from ptcore.tiny_model import write_tiny_model

    masked = load_model(str(write_tiny_model(tmp_path / "bert", arch="bert")), device="cpu", dtype="float32")
    assert make_batch(masked, "auto") is None
