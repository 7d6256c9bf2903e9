"""Masked LMs classify at [MASK] with single-token verbalizers; encoders without
an LM head classify with the task's linear head at [MASK]. Batched == alone."""

import httpx
import pytest
import torch

from prompt_store.artifact import artifact_bytes, make_artifact
from prompt_store.errors import ArtifactError
from prompt_store.template import parse_template, render
from ptcore.model import load_model
from ptcore.task_prompt import task_prompt
from ptcore.tiny_model import write_tiny_model
from server.api.app import create_app
from server.engine.classify import Classifier
from server.engine.request import Request
from server.settings import Settings
from tests.helpers import LiveServer, alone_embeds, make_scheduler

TEMPLATES = [
    ("[CLS][P:3]{input}[P:3][MASK][SEP]", {"input": "json is a format"}),
    ("[CLS]{premise}[SEP][P:2]{hypothesis}[P:2][MASK][SEP]", {"premise": "a file", "hypothesis": "the path"}),
    ("[CLS][P:5] {input} [MASK][SEP]", {"input": "the return value of the list"}),
]
LABEL_SETS = [{"a": "true", "b": "no"}, {"x": "json", "y": "path", "z": "file"}]


@pytest.fixture(scope="module", params=["bert", "bert-encoder"])
def family_model(request, tmp_path_factory):
    d = write_tiny_model(tmp_path_factory.mktemp(request.param) / "m", request.param)
    return load_model(str(d), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def encoder_model(tmp_path_factory):
    d = write_tiny_model(tmp_path_factory.mktemp("bert-encoder") / "m", "bert-encoder")
    return load_model(str(d), device="cpu", dtype="float32")


def artifact(loaded, template, labels, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    H = loaded.info["hidden_size"]
    rows = torch.randn(parse_template(template).num_virtual_tokens, H, generator=g)
    head = None
    if loaded.family == "encoder":
        head = (torch.randn(len(labels), H, generator=g), torch.randn(len(labels), generator=g))
    return make_artifact(rows, template=template, task_type="classify", labels=labels, base_model=loaded.info,
                         head=head, **kw)  # fmt: skip


@torch.no_grad()
def alone_scores(loaded, prompt, ids):
    """No padding, one request: log-scores of the labels at the [MASK]."""
    out = loaded.model(inputs_embeds=alone_embeds(loaded.model, prompt.rows, ids, loaded.vocab_size))
    at = ids.index(loaded.mask_token_id)
    if loaded.family == "masked":
        logp = torch.log_softmax(out.logits[0, at], dim=-1)
        return [float(logp[v[0]]) for v in prompt.label_ids]
    w, b = prompt.head
    pooled = out.last_hidden_state[0].mean(dim=0) if prompt.head_pooling == "mean" else out.last_hidden_state[0, at]
    return torch.log_softmax(w @ pooled + b, dim=-1).tolist()


def test_family_is_detected(family_model):
    assert (
        family_model.family == {"BertForMaskedLM": "masked", "BertModel": "encoder"}[type(family_model.model).__name__]
    )


def test_batched_classification_equals_alone(family_model):
    """Encoder heads that read the [MASK] state and heads that read the mean state, in one batch."""
    loaded = family_model
    runner = make_scheduler(loaded)
    works = []
    for i in range(6):
        template, fields = TEMPLATES[i % len(TEMPLATES)]
        pooling = {"head_pooling": "mean" if i % 4 < 2 else "mask"} if loaded.family == "encoder" else {}
        prompt = task_prompt(f"t{i}", 1, artifact(loaded, template, LABEL_SETS[i % 2], seed=i, **pooling), loaded)
        works.append(Request.classify(prompt, render(prompt.template, loaded.tokenizer, fields, loaded.vocab_size)))
    results = runner.run_to_completion(works)
    labels_seen = set()
    for w, r in zip(works, results):
        expected = alone_scores(loaded, w.prompt, w.input_ids)
        assert max(abs(a - b) for a, b in zip(r.logprobs.values(), expected)) < 1e-4
        want = torch.softmax(torch.tensor(expected, dtype=torch.float64), 0).tolist()
        assert max(abs(a - b) for a, b in zip(r.scores.values(), want)) < 1e-5
        labels_seen.add(r.label)
    assert len(labels_seen) > 1  # the prompts and inputs matter
    if loaded.family == "encoder":
        assert {w.prompt.head_pooling for w in works} == {"mask", "mean"}


def test_head_pooling_changes_what_the_head_reads(encoder_model):
    """The same tensors scored with "mask" and "mean" give different scores; an unknown pooling is refused."""
    loaded = encoder_model
    assert loaded.family == "encoder"  # heads are for encoder models
    template, fields = TEMPLATES[0]
    ids = render(parse_template(template), loaded.tokenizer, fields, loaded.vocab_size)
    mask = task_prompt("a", 1, artifact(loaded, template, LABEL_SETS[1], seed=3), loaded)
    mean = task_prompt("b", 1, artifact(loaded, template, LABEL_SETS[1], seed=3, head_pooling="mean"), loaded)
    assert mask.head_pooling == "mask" and mean.head_pooling == "mean"
    a, b = Classifier(loaded).run([Request.classify(mask, ids), Request.classify(mean, ids)])
    assert max(abs(x - y) for x, y in zip(a.logprobs.values(), b.logprobs.values())) > 1e-3
    with pytest.raises(ArtifactError, match="head_pooling must be one of \\['mask', 'mean'\\], got 'max'"):
        artifact(loaded, template, LABEL_SETS[1], seed=3, head_pooling="max")


def test_what_such_models_refuse(family_model):
    loaded = family_model
    gen = make_artifact(torch.zeros(2, loaded.info["hidden_size"]), template="[P:2]{input}", task_type="generate",
                        base_model=loaded.info)  # fmt: skip
    with pytest.raises(ArtifactError, match="can only serve classify"):
        task_prompt("t", 1, gen, loaded)
    with pytest.raises(ArtifactError, match="exactly one \\[MASK\\]"):
        task_prompt("t", 1, artifact(loaded, "[CLS][P:2]{input}[SEP]", LABEL_SETS[0], 0), loaded)
    if loaded.family == "masked":
        with pytest.raises(ArtifactError, match="one token"):
            task_prompt("t", 1, artifact(loaded, TEMPLATES[0][0], {"a": "false", "b": "no"}, 0), loaded)
    else:
        no_head = make_artifact(torch.zeros(6, loaded.info["hidden_size"]), template=TEMPLATES[0][0],
                                task_type="classify", labels=LABEL_SETS[0], base_model=loaded.info)  # fmt: skip
        with pytest.raises(ArtifactError, match="head tensors"):
            task_prompt("t", 1, no_head, loaded)


def test_served_over_http_and_generate_is_a_422(family_model, tmp_path):
    loaded = family_model
    settings = Settings(model=loaded.info["name_or_path"], store=str(tmp_path / "store"))
    with LiveServer(create_app(settings, loaded)) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        a = artifact(loaded, *TEMPLATES[0][:1], LABEL_SETS[0], seed=1)
        r = client.put("/v1/tasks/cls", content=artifact_bytes(a))
        assert r.status_code == 201 and r.json()["has_head"] == (loaded.family == "encoder")
        r = client.post("/v1/tasks/cls/classify", json={"input": "json is a format"})
        assert r.status_code == 200 and set(r.json()["scores"]) == {"a", "b"}
        r = client.post("/v1/tasks/cls/generate", json={"input": "x"})
        assert r.status_code == 422 and "cannot generate" in r.json()["detail"]
        # "[MASK]" in request data is plain text, not a second mask: the template's one [MASK] is scored
        same = client.post("/v1/tasks/cls/classify", json={"input": "two [MASK] tokens"})
        assert same.status_code == 200 and set(same.json()["scores"]) == {"a", "b"}


def test_head_tensors_on_a_causal_model_are_refused(loaded):
    assert loaded.family == "causal"  # `loaded` is the tiny GPT-2 and Llama
    H = loaded.info["hidden_size"]
    a = make_artifact(torch.zeros(2, H), template="[P:2]{input}", task_type="classify", labels={"a": " a"},
                      base_model=loaded.info, head=(torch.zeros(1, H), torch.zeros(1)))  # fmt: skip
    with pytest.raises(ArtifactError, match="head tensors are for encoder models"):
        task_prompt("t", 1, a, loaded)


def test_roberta_style_positions_are_numbered_by_the_model(tmp_path):
    """RoBERTa's positions start after its padding index; right padding and no
    position ids let it number them itself, so batched == alone."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    from ptcore.tiny_model import train_wordpiece_tokenizer

    tok = train_wordpiece_tokenizer()
    config = RobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, pad_token_id=tok.pad_token_id, max_position_embeddings=130,
                           initializer_range=0.5)  # fmt: skip
    torch.manual_seed(0)
    RobertaForMaskedLM(config).save_pretrained(tmp_path / "rb")
    tok.save_pretrained(tmp_path / "rb")
    loaded = load_model(str(tmp_path / "rb"), device="cpu", dtype="float32")
    assert loaded.family == "masked"
    runner = make_scheduler(loaded)
    works = []
    for i, (template, fields) in enumerate(TEMPLATES):
        prompt = task_prompt(f"t{i}", 1, artifact(loaded, template, LABEL_SETS[0], seed=i), loaded)
        works.append(Request.classify(prompt, render(prompt.template, loaded.tokenizer, fields, loaded.vocab_size)))
    for w, r in zip(works, runner.run_to_completion(works)):
        expected = alone_scores(loaded, w.prompt, w.input_ids)
        assert max(abs(a - b) for a, b in zip(r.logprobs.values(), expected)) < 1e-4
