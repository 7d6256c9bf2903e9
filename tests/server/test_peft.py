"""PEFT prompt-learning adapters in and out, with the real peft package.

The reference is the no-cache recomputation oracle for tokens and PeftModel's
own forward pass for the first-step logits (PeftModel.generate is not used:
it was seen to diverge from an exact recomputation after the first token)."""

import subprocess
import sys

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prompt_store.artifact import load_artifact, make_artifact
from prompt_store.errors import ArtifactError
from prompt_store.peft import export_peft
from prompt_store.template import render
from ptcore.model import default_bos_token
from ptcore.task_prompt import task_prompt
from server.api.app import create_app
from server.engine.hf_backend import HFBackend
from server.engine.request import Request, SamplingParams
from server.settings import Settings
from tests.helpers import LiveServer, alone_greedy, make_adapter

INPUT = "the quick brown fox"


def peft_last_logits(peft_model, tokenizer, text):
    enc = tokenizer(text, return_tensors="pt")  # as a PEFT user calls it: default special tokens
    with torch.no_grad():
        return peft_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0, -1]


def served_first_logits(loaded, prompt, text):
    """The logits of the first new token, as the Hugging Face backend computes them."""
    ids = render(prompt.template, loaded.tokenizer, {"input": text}, loaded.vocab_size)
    work = Request.generate(prompt, ids, SamplingParams(max_new_tokens=8))
    with torch.inference_mode():
        logits = HFBackend(loaded, max_running=1).prefill([work])
    return work, logits[0]


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "P_TUNING"])
def test_import_serve_and_match(loaded, tmp_path, kind):
    model_dir = loaded.info["name_or_path"]
    peft_model = make_adapter(model_dir, kind, tmp_path / "adapter")
    settings = Settings(model=model_dir, store=str(tmp_path / "store"))
    with LiveServer(create_app(settings, loaded)) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        folder = tmp_path / "adapter"
        files = {
            "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
            "adapter_model": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
        }
        r = client.put("/v1/tasks/from-peft/peft", files=files)
        assert r.status_code == 201, r.text
        m = peft_model.peft_config["default"].num_virtual_tokens
        bos = default_bos_token(loaded.tokenizer)
        assert r.json()["template"] == f"[P:{m}]{bos or ''}{{input}}"
        assert (bos is not None) == (loaded.model.config.model_type == "llama")  # the tiny Llama adds <s>
        served = client.post("/v1/tasks/from-peft/generate", json={"input": INPUT, "max_new_tokens": 10}).json()
        prompt = live_prompt(live, "from-peft")

    work, first = served_first_logits(loaded, prompt, INPUT)
    expected_first = peft_last_logits(peft_model, loaded.tokenizer, INPUT)
    assert torch.allclose(first, expected_first, atol=1e-5), float((first - expected_first).abs().max())
    assert served["token_ids"] == alone_greedy(
        loaded.model, prompt.rows, work.input_ids, loaded.vocab_size, 10, loaded.eos_token_ids
    )


def live_prompt(live, task_id):
    return live.app.state.engine.prompts.get(task_id)


def test_import_peft_cli_writes_or_pushes(loaded, tmp_path):
    model_dir = loaded.info["name_or_path"]
    make_adapter(model_dir, "PROMPT_TUNING", tmp_path / "adapter", seed=3)
    settings = Settings(model=model_dir, store=str(tmp_path / "store"))
    with LiveServer(create_app(settings, loaded)) as live:
        out = subprocess.run(
            [sys.executable, "-m", "server.cli", "import-peft", str(tmp_path / "adapter"), "--task-id", "cli",
             "--model", model_dir, "-o", str(tmp_path / "a.safetensors"), "--push", live.url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "version 1" in out
        pushed = live_prompt(live, "cli")
    local = load_artifact(tmp_path / "a.safetensors")
    # exact: the same rows, one through a file and one through the server's store
    assert torch.equal(local.embeddings, pushed.rows) and local.meta["template"] == pushed.template.source


def test_bad_peft_uploads_are_422(loaded, tmp_path):
    model_dir = loaded.info["name_or_path"]
    make_adapter(model_dir, "PROMPT_TUNING", tmp_path / "adapter")
    weights = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    settings = Settings(model=model_dir, store=str(tmp_path / "store"))
    cases = [
        (b"{not json", weights, "not valid JSON"),
        (b'{"peft_type": "LORA", "task_type": "CAUSAL_LM"}', weights, "peft_type 'LORA'"),
        (b'{"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 5}', weights, "CAUSAL_LM"),
        (b'{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 7}', weights, "num_virtual"),
        (b'{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5}', b"junk", "safetensors"),
        (
            b'{"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": "5"}',
            weights,
            "positive integer",
        ),
    ]
    with LiveServer(create_app(settings, loaded)) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        for config, model, message in cases:
            files = {"adapter_config": ("c.json", config), "adapter_model": ("m.safetensors", model)}
            r = client.put("/v1/tasks/bad/peft", files=files)
            assert r.status_code == 422 and message in r.json()["detail"], r.text
        r = client.put("/v1/tasks/bad/peft", files={"adapter_config": ("c.json", b"{}")})
        assert r.status_code == 422 and "adapter_model" in r.text  # a missing file
        assert client.get("/v1/tasks").json() == []


def test_export_loads_in_peft_and_gives_the_same_logits(loaded, tmp_path):
    bos = default_bos_token(loaded.tokenizer)
    H = loaded.info["hidden_size"]
    rows = torch.randn(6, H, generator=torch.Generator().manual_seed(1))
    artifact = make_artifact(rows, template=f"[P:6]{bos or ''}{{input}}", task_type="generate", base_model=loaded.info)
    export_peft(artifact, tmp_path / "out", bos)
    base = AutoModelForCausalLM.from_pretrained(loaded.info["name_or_path"])
    peft_model = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight.detach(), rows)  # a copy, via a file
    _, first = served_first_logits(loaded, task_prompt("x", 1, artifact, loaded), INPUT)
    assert torch.allclose(first, peft_last_logits(peft_model, loaded.tokenizer, INPUT), atol=1e-5)

    not_prefix = make_artifact(torch.zeros(4, H), template="[P:2]{input}[P:2]", task_type="generate",
                               base_model=loaded.info)  # fmt: skip
    with pytest.raises(ArtifactError, match="no PEFT equivalent"):
        export_peft(not_prefix, tmp_path / "nope", bos)
    # the BOS must match what the tokenizer adds, or PEFT would feed another sequence
    other_bos = make_artifact(rows, template="[P:6]<s>{input}" if bos is None else "[P:6]{input}",
                              task_type="generate", base_model=loaded.info)  # fmt: skip
    with pytest.raises(ArtifactError, match="no PEFT equivalent"):
        export_peft(other_bos, tmp_path / "nope2", bos)
