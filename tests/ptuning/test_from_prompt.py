"""Starting from a manual prompt (`--from-prompt`), family default templates,
and anchor words between pseudo tokens, end to end through the server's path."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from prompt_store.artifact import load_artifact, make_artifact
from prompt_store.template import parse_template, render, tokenize_text
from ptcore.model import load_model
from ptcore.task_prompt import task_prompt
from ptcore.tiny_model import write_tiny_model
from ptuning.data import Example
from ptuning.encoder import PromptEncoder
from ptuning.synthetic import LABELS, keyword_examples, write_jsonl
from ptuning.train import PromptTrainer, TrainConfig, default_template, prompt_from_text
from server.engine.classify import Classifier
from server.engine.request import Request, SamplingParams
from tests.helpers import assert_same_accuracy, label_near_tie, make_scheduler

MANUAL = "The official language of {input} is"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("from-prompt-models")
    archs = {"causal": "gpt2", "masked": "bert", "encoder": "bert-encoder"}
    return {f: load_model(str(write_tiny_model(root / f, a, init_std=0.1)), "cpu", "float32") for f, a in archs.items()}


def examples(n, seed, flip=False):
    rows = keyword_examples(n, seed)
    other = {"yes": "no", "no": "yes"}
    return [Example({"input": r["input"]}, other[r["label"]] if flip else r["label"], i) for i, r in enumerate(rows)]


def manual_view(prompt, manual: str, loaded):
    """The same task with the plain text template: no pseudo tokens, so its rows are never read."""
    template = parse_template(manual)
    return dataclasses.replace(prompt, template=template, rows=torch.zeros_like(prompt.rows[:1]), prefix_len=0)


def test_words_become_pseudo_tokens_at_their_own_embeddings(models):
    tok = models["causal"].tokenizer
    template, start = prompt_from_text(MANUAL, tok)
    before, after = tokenize_text(tok, "The official language of "), tokenize_text(tok, " is")
    assert template == f"[P:{len(before)}]{{input}}[P:{len(after)}]"
    assert start == before + after
    # [P:n] holes already in the text stay and start at random tokens
    assert prompt_from_text("[P:2]{input} is", tok) == ("[P:2]{input}[P:1]", [None, None, *after])
    # special tokens stay real tokens: a masked LM still finds its [MASK]
    bert = models["masked"].tokenizer
    template, start = prompt_from_text("[CLS] {input} is about [MASK] . [SEP]", bert)
    words = tokenize_text(bert, " is about ")
    assert template == f"[CLS]{{input}}[P:{len(words)}][MASK][P:1][SEP]"
    assert start == words + tokenize_text(bert, " . ")
    with pytest.raises(ValueError, match="no words"):
        prompt_from_text("[CLS]{input}[MASK]", bert)


@pytest.mark.parametrize("kind", ["lstm", "mlp", "none"])
def test_every_encoder_starts_at_its_init(kind):
    init = torch.randn(5, 32)
    # exact: the encoders add a residual whose last layer starts at zero weights and bias
    assert torch.equal(PromptEncoder(kind, init)(), init)


@pytest.mark.parametrize("encoder", ["lstm", "mlp", "none"])
def test_epoch_0_is_token_exact_the_manual_prompt(models, encoder):
    """The starting table, rendered by the server's path, gives the same label
    log-probabilities and the same greedy tokens as the plain text template."""
    loaded = models["causal"]
    trainer = PromptTrainer(loaded, TrainConfig(from_prompt=MANUAL, labels=LABELS, encoder=encoder, progress=False))
    rows = trainer._rows().detach()
    artifact = make_artifact(rows, template=trainer.template_source, task_type="classify", labels=LABELS,
                             base_model=loaded.info)  # fmt: skip
    prompt = task_prompt("t", 1, artifact, loaded)
    manual = manual_view(prompt, MANUAL, loaded)
    runner = make_scheduler(loaded)
    inputs = ["France", "the json parse list", "a"]
    for text in inputs:
        ids = render(prompt.template, loaded.tokenizer, {"input": text}, loaded.vocab_size)
        plain = render(manual.template, loaded.tokenizer, {"input": text}, loaded.vocab_size)
        assert len(ids) == len(plain) and max(plain) < loaded.vocab_size <= max(ids)
        soft, hard = runner.run_to_completion([Request.classify(prompt, ids), Request.classify(manual, plain)])
        # exact: rows of one forward pass with bit-identical inputs (the rows are the
        # token embeddings themselves), the same length and so the same padding;
        # every op computes each row the same way, whichever rows are beside it
        assert soft.logprobs == hard.logprobs
        params = SamplingParams(max_new_tokens=8)
        soft, hard = runner.run_to_completion([Request.generate(prompt, ids, params),
                                               Request.generate(manual, plain, params)])  # fmt: skip
        assert soft.token_ids == hard.token_ids and len(soft.token_ids) > 0


@pytest.mark.parametrize("progress", [True, False])
def test_a_note_reaches_the_user_once(models, progress, capsys, caplog):
    """With progress output it is printed and not logged (the CLI's log also goes
    to the terminal); without, it is logged."""
    trainer = PromptTrainer(models["causal"], TrainConfig(labels=LABELS, progress=progress))
    with caplog.at_level("WARNING", logger="ptuning.train"):
        trainer._say("a note")
    printed = capsys.readouterr().out.splitlines()
    logged = [r.getMessage() for r in caplog.records]
    assert (printed, logged) == ((["a note"], []) if progress else ([], ["a note"]))


@pytest.mark.parametrize("min_dev_examples", [50, 100])  # dev picks the best epoch / the last epoch is kept
def test_the_manual_prompt_is_reported_and_kept_unless_beaten(models, min_dev_examples):
    loaded = models["causal"]
    config = TrainConfig(from_prompt=MANUAL, labels=LABELS, encoder="mlp", epochs=4, patience=4,
                         min_dev_examples=min_dev_examples, progress=False)  # fmt: skip
    trainer = PromptTrainer(loaded, config)
    start_rows = trainer._rows().detach().clone()
    # trained on flipped labels, no epoch beats the manual prompt on the true dev labels
    result = trainer.fit(examples(200, 0, flip=True), examples(60, 1))
    m = result.artifact.meta["metrics"]
    assert result.history[0]["epoch"] == 0 and m["start_dev_accuracy"] == result.history[0]["dev_accuracy"]
    assert all(h["dev_accuracy"] < m["start_dev_accuracy"] for h in result.history[1:])
    assert m["best_epoch"] == 0 and m["from_prompt"] == MANUAL and m["dev_accuracy"] == m["start_dev_accuracy"]
    assert torch.equal(result.artifact.embeddings, start_rows)  # exact: the starting rows, kept
    # trained on the true labels, a better epoch replaces it
    trainer = PromptTrainer(loaded, dataclasses.replace(config, epochs=6, patience=6))
    m = trainer.fit(examples(200, 0), examples(100, 1)).artifact.meta["metrics"]
    assert m["best_epoch"] > 0 and m["dev_accuracy"] > m["start_dev_accuracy"]


def test_a_small_dev_set_does_not_pick_the_epoch(models):
    loaded = models["causal"]
    config = TrainConfig(labels=LABELS, encoder="mlp", epochs=3, patience=1, progress=False)
    result = PromptTrainer(loaded, config).fit(examples(48, 0), examples(49, 1))
    m = result.artifact.meta["metrics"]
    assert m["best_epoch"] == 3 and m["epochs_run"] == 3 and m["selection"] == "last epoch (dev < 50 examples)"
    assert m["dev_accuracy"] == result.history[3]["dev_accuracy"]
    result = PromptTrainer(loaded, config).fit(examples(48, 0), examples(50, 1))
    assert result.artifact.meta["metrics"]["selection"] == "best dev epoch"


def test_family_default_templates(models):
    assert default_template(models["causal"]) == "[P:3]{input}[P:3]"
    for family in ("masked", "encoder"):
        assert default_template(models[family]) == "[CLS][P:3]{input}[P:3][MASK][SEP]"


@pytest.mark.parametrize(
    "family, template, labels",
    [
        ("causal", "[P:2]{input}[P:2] language [P:2]", LABELS),
        ("masked", "[CLS][P:2]{input}[P:1] language [P:1][MASK][SEP]", {"yes": "true", "no": "no"}),
        ("encoder", "[CLS][P:2]{input}[P:1] language [P:1][MASK][SEP]", {"yes": "yes", "no": "no"}),
    ],
)
def test_anchor_words_between_pseudo_tokens_train_and_serve(models, family, template, labels):
    """Literal words between [P:n] holes stay real tokens; the served accuracy is the trainer's."""
    loaded = models[family]
    config = TrainConfig(template=template, labels=labels, encoder="mlp", epochs=2, progress=False)
    trainer = PromptTrainer(loaded, config)
    dev = examples(24, 1)
    artifact = trainer.fit(examples(48, 0), dev).artifact
    prompt = task_prompt("t", 1, artifact, loaded)
    anchor = tokenize_text(loaded.tokenizer, "language")
    works = []
    for e in dev:
        ids = render(prompt.template, loaded.tokenizer, e.fields, loaded.vocab_size)
        assert any(ids[i : i + len(anchor)] == anchor for i in range(len(ids)))
        works.append(Request.classify(prompt, ids))
    results = Classifier(loaded).run(works)
    accuracy = sum(r.label == e.target for r, e in zip(results, dev)) / len(dev)
    # labels picked in other batch shapes: equal up to near ties (rule 3 in tests/helpers.py)
    ties = sum(label_near_tie(r.logprobs.values()) for r in results)
    assert_same_accuracy(artifact.meta["metrics"]["dev_accuracy"], accuracy, ties, len(dev))


def test_cli_from_prompt_on_an_encoder_without_template(models, tmp_path):
    """`ptserve train --from-prompt` with an encoder: the template keeps the special tokens."""
    loaded = models["encoder"]
    data = write_jsonl(keyword_examples(40, 0), tmp_path / "d.jsonl")
    out = tmp_path / "t.safetensors"
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", "train", "--model", loaded.info["name_or_path"], "--data", str(data),
         "--labels", json.dumps({"yes": "yes", "no": "no"}), "--epochs", "1", "-o", str(out),
         "--from-prompt", "[CLS] {input} is about [MASK] [SEP]"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    artifact = load_artifact(out)
    words = len(tokenize_text(loaded.tokenizer, " is about "))
    assert artifact.meta["template"] == f"[CLS]{{input}}[P:{words}][MASK][SEP]"
    assert "epoch 0:" in r.stdout and "(manual prompt)" in r.stdout
    both = subprocess.run(
        [sys.executable, "-m", "server.cli", "train", "--model", loaded.info["name_or_path"], "--data", str(data),
         "-o", str(out), "--from-prompt", MANUAL, "--template", "[P:2]{input}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert both.returncode == 2 and "not allowed with argument" in both.stderr  # argparse's usage error
