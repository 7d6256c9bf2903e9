"""ptcore/model.py: what loading a model sets up besides the model."""

import pytest
import torch

from ptcore.model import avoid_cudnn_attention


@pytest.fixture
def cudnn_attention_flag():
    """The process-wide flag, put back as it was after the test."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_cudnn_attention_is_turned_off_for_a_cuda_model_only(cudnn_attention_flag):
    torch.backends.cuda.enable_cudnn_sdp(True)
    avoid_cudnn_attention(torch.device("cpu"))
    assert torch.backends.cuda.cudnn_sdp_enabled() is True  # a CPU server leaves the process's settings alone
    avoid_cudnn_attention(torch.device("cuda", 0))  # a device object needs no GPU: nothing runs on it
    assert torch.backends.cuda.cudnn_sdp_enabled() is False
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


def test_loading_a_model_applies_it_on_the_models_device(tiny_model_dirs, monkeypatch):
    import ptcore.model

    seen = []
    monkeypatch.setattr(ptcore.model, "avoid_cudnn_attention", seen.append)
    ptcore.model.load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32")
    assert seen == [torch.device("cpu")]
