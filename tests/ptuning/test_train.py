import hashlib
import itertools
import json
import subprocess
import sys

import pytest
import torch

import ptuning.train
from prompt_store.artifact import load_artifact
from prompt_store.template import parse_template, render
from ptclient.client import PtserveClient
from ptcore.errors import InvalidRequest
from ptcore.model import load_model
from ptcore.scoring import LabelQuery, LabelScorer
from ptcore.task_prompt import task_prompt
from ptcore.tiny_model import write_tiny_model
from ptuning.data import DataError, Example, load_examples, split_dev
from ptuning.synthetic import LABELS, keyword_examples, write_jsonl
from ptuning.train import Done, EpochEnd, PromptTrainer, Scored, Step, TrainConfig
from server.api.app import create_app
from server.settings import Settings
from tests.helpers import LiveServer, assert_same_accuracy, float_mismatch, label_near_tie, visible_padding

# per family: tiny arch, template, labels (masked LMs need single-token verbalizers)
FAMILIES = {
    "causal": ("gpt2", "[P:3]{input}[P:3]", LABELS),
    "masked": ("bert", "[CLS][P:3]{input}[P:3][MASK][SEP]", {"yes": "true", "no": "no"}),
    "encoder": ("bert-encoder", "[CLS][P:3]{input}[P:3][MASK][SEP]", {"yes": "yes", "no": "no"}),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-models")
    # a gentler scale than the serving tests' models: easier to train
    return {f: write_tiny_model(root / f, arch, init_std=0.1) for f, (arch, _, _) in FAMILIES.items()}


def examples(n, seed):
    return [Example({"input": r["input"]}, r["label"], i + 1) for i, r in enumerate(keyword_examples(n, seed))]


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def served_accuracy(loaded, artifact, dev) -> tuple[float, int]:
    """The artifact's dev accuracy recomputed as the server scores it: each example
    alone through ptcore.scoring, the label with the highest score; and how many
    examples' labels nearly tie (label_near_tie in tests/helpers.py)."""
    prompt = task_prompt("t", 1, artifact, loaded)
    scorer = LabelScorer(loaded)
    correct = ties = 0
    with torch.no_grad():
        for ex in dev:
            ids = render(prompt.template, loaded.tokenizer, ex.fields, loaded.vocab_size)
            (scores,) = scorer([LabelQuery(ids, prompt.rows, prompt.label_ids, prompt.head, prompt.head_pooling)])
            correct += prompt.labels[int(scores.argmax())] == ex.target
            ties += label_near_tie(scores.tolist())
    return correct / len(dev), ties


@pytest.mark.parametrize("family, encoder", [("causal", "lstm"), ("causal", "mlp"), ("causal", "none"),
                                             ("masked", "lstm"), ("encoder", "mlp")])  # fmt: skip
def test_only_the_encoder_learns_and_the_lm_is_byte_identical(model_dirs, family, encoder):
    _, template, labels = FAMILIES[family]
    loaded = load_model(str(model_dirs[family]), device="cpu", dtype="float32")
    before = weights_digest(loaded.model)
    config = TrainConfig(labels=labels, template=template, encoder=encoder, epochs=2, progress=False)
    trainer = PromptTrainer(loaded, config)
    start = [p.detach().clone() for p in trainer.encoder.parameters()]
    result = trainer.fit(examples(48, 0), examples(16, 1))
    assert weights_digest(loaded.model) == before
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(start, trainer.encoder.parameters()))
    a = result.artifact
    assert a.embeddings.shape == (6, loaded.info["hidden_size"])
    assert (a.head is not None) == (family == "encoder")
    assert a.meta["metrics"]["encoder"] == encoder
    # the trainer picked its labels in padded batches: equal up to near ties (rule 3 in tests/helpers.py)
    assert_same_accuracy(a.meta["metrics"]["dev_accuracy"], *served_accuracy(loaded, a, examples(16, 1)), 16)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]  # epoch 0: the starting prompt


@pytest.mark.parametrize("family", ["causal", "encoder"])
def test_same_seed_same_artifact(model_dirs, family):
    """Same tensors and figures (the artifact also records created_at and seconds per epoch)."""
    _, template, labels = FAMILIES[family]
    loaded = load_model(str(model_dirs[family]), device="cpu", dtype="float32")

    def run(seed):
        config = TrainConfig(labels=labels, template=template, encoder="lstm", epochs=2, seed=seed, progress=False)
        return PromptTrainer(loaded, config).fit(examples(48, 0), examples(16, 1)).artifact

    a, b, c = run(0), run(0), run(1)
    # exact: the same run twice, the same ops on the same shapes and inputs in the
    # same order, with torch's deterministic algorithms on (PromptTrainer.fit)
    assert torch.equal(a.embeddings, b.embeddings)
    if family == "encoder":
        assert all(torch.equal(x, y) for x, y in zip(a.head, b.head))
    strip = lambda m: {k: v for k, v in m["metrics"].items() if k != "seconds_per_epoch"}  # noqa: E731
    assert strip(a.meta) == strip(b.meta)
    assert not torch.equal(a.embeddings, c.embeddings)


def test_stepping_one_step_at_a_time_is_fit(model_dirs):
    """steps() is the training fit() runs: the same events in order and, driven
    to the end, the same table bit for bit (deterministic kernels on, as fit has them)."""
    _, template, labels = FAMILIES["causal"]
    loaded = load_model(str(model_dirs["causal"]), device="cpu", dtype="float32")
    config = TrainConfig(labels=labels, template=template, epochs=2, batch_size=16, seed=3, progress=False)
    train, dev = examples(40, 0), examples(16, 1)
    fitted = PromptTrainer(loaded, config).fit(train, dev).artifact
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        events = list(PromptTrainer(loaded, config).steps(train, dev))
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    shape = [(type(e).__name__, e.epoch, e.batch, e.batches, e.done, e.examples) if isinstance(e, Step)
             else type(e).__name__ for e in events]  # fmt: skip
    steps = lambda epoch: [("Step", epoch, b, 3, n, n) for b, n in ((1, 16), (2, 16), (3, 8))]  # noqa: E731 (40 in 16s)
    end = ["Scored", "EpochEnd"]  # 16 dev examples: one scoring pass
    assert shape == [*end, "Note", *steps(1), *end, *steps(2), *end, "Done"]  # Note: 16 dev examples are too few
    ends = [e for e in events if isinstance(e, EpochEnd)]
    assert [e.metrics["epoch"] for e in ends] == [0, 1, 2]
    assert isinstance(events[-1], Done) and torch.equal(events[-1].result.artifact.embeddings, fitted.embeddings)


@pytest.mark.parametrize("task_type", ["classify", "generate"])
def test_micro_batches_add_up_to_the_batch(model_dirs, task_type):
    """Gradients of micro-batches, weighted by what the loss averages over, are
    the batch's gradient up to float rounding: the tables agree to 1e-5."""
    _, template, labels = FAMILIES["causal"]
    loaded = load_model(str(model_dirs["causal"]), device="cpu", dtype="float32")
    kind = {"labels": labels} if task_type == "classify" else {"task_type": "generate"}
    data = examples(24, 0)
    if task_type == "generate":  # the label as the text to generate
        data = [Example(e.fields, f" {e.target}", e.line) for e in data]

    def table(micro, batch_size=8, pass_size=None):
        config = TrainConfig(template=template, epochs=1, batch_size=batch_size, micro_batch_size=micro, seed=1,
                             progress=False, **kind)  # fmt: skip
        trainer = PromptTrainer(loaded, config)
        events = list(trainer.steps(data, data[:8], pass_size))
        return events, events[-1].result.artifact

    whole, a = table(0)
    split, b = table(3)  # 8 = 3 + 3 + 2
    assert sum(isinstance(e, Step) for e in whole) == 3 and sum(isinstance(e, Step) for e in split) == 9
    assert [(e.done, e.examples) for e in split if isinstance(e, Step)][:3] == [(3, 8), (6, 8), (8, 8)]
    torch.testing.assert_close(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-5)
    # passes sized as the driver asks, one by one (a server: small while requests run, whole batches when idle)
    sizes = itertools.cycle([1, None, 5])
    varied, c = table(3, pass_size=lambda: next(sizes))
    # asked in turn: scoring epoch 0 takes 1, then None (batch_size: the 7 left); the first batch 5, 1, None
    # (micro_batch_size 3: the 2 left); ...; scoring epoch 1 takes 5, 1, None (the 2 left)
    assert [(e.done, e.examples) for e in varied if isinstance(e, Step)][:4] == [(5, 8), (6, 8), (8, 8), (5, 8)]
    assert [e.done for e in varied if isinstance(e, Scored)] == [1, 8, 5, 6, 8]
    torch.testing.assert_close(a.embeddings, c.embeddings, rtol=1e-5, atol=1e-5)
    for key, value in a.meta["metrics"].items():
        if key.startswith(("dev_", "start_dev_")):
            assert c.meta["metrics"][key] == pytest.approx(value, rel=1e-5), key
    _, other = table(0, batch_size=4)  # other steps: the tolerance tells them apart
    assert (a.embeddings - other.embeddings).abs().max() > 1e-3


def test_it_learns_an_input_dependent_task(model_dirs):
    """Dev accuracy well above the best constant answer (the majority label's share)."""
    loaded = load_model(str(model_dirs["causal"]), device="cpu", dtype="float32")
    train, dev = examples(200, 0), examples(100, 1)
    majority = max(sum(e.target == lab for e in dev) for lab in LABELS) / len(dev)
    config = TrainConfig(labels=LABELS, encoder="mlp", epochs=12, patience=12, progress=False)
    acc = PromptTrainer(loaded, config).fit(train, dev).artifact.meta["metrics"]["dev_accuracy"]
    assert acc >= majority + 0.1, (acc, majority)


def test_generate_training_lowers_the_target_loss(model_dirs):
    loaded = load_model(str(model_dirs["causal"]), device="cpu", dtype="float32")
    data = [
        Example({"input": e.fields["input"]}, " json" if e.target == "yes" else " path", e.line)
        for e in examples(64, 0)
    ]
    config = TrainConfig(task_type="generate", encoder="mlp", epochs=6, patience=6, progress=False)
    result = PromptTrainer(loaded, config).fit(data[:48], data[48:])
    losses = [h["dev_loss"] for h in result.history]
    assert min(losses[1:]) < losses[0]
    assert result.artifact.task_type == "generate" and "dev_loss" in result.artifact.meta["metrics"]


def test_bad_lines_are_errors_naming_the_line(tmp_path):
    t = parse_template("[P:2]{input}")
    path = tmp_path / "d.jsonl"
    cases = [
        ('{"input": "a", "label": "yes"}\n{"label": "no"}\n', "line 2: missing \\['input'\\]"),
        ('{"input": "a", "label": "maybe"}\n', "line 1: unknown label 'maybe'"),
        ('{"input": "a", "label": "yes"}\n\nnot json\n', "line 3: not valid JSON"),
        ('{"input": 5, "label": "yes"}\n', "line 1: \\['input'\\] must be strings"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            load_examples(path, t, "classify", LABELS)
    with pytest.raises(DataError, match="between 0 and 1"):
        split_dev(examples(10, 0), 1.5, 0)
    with pytest.raises(InvalidRequest, match="labels"):
        TrainConfig(task_type="classify", labels=None)
    with pytest.raises(ValueError, match="'gru'"):
        TrainConfig(labels=LABELS, encoder="gru")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainer_accuracy_equals_the_served_accuracy_after_push(model_dirs, family, tmp_path):
    """`ptserve train --push` to a running server, without --template (the family's
    default); the server's classify route on the dev set gives exactly the accuracy
    the trainer reported."""
    _, template, labels = FAMILIES[family]
    loaded = load_model(str(model_dirs[family]), device="cpu", dtype="float32")
    write_jsonl(keyword_examples(96, 0), tmp_path / "train.jsonl")
    dev = write_jsonl(keyword_examples(40, 1), tmp_path / "dev.jsonl")
    settings = Settings(model=str(model_dirs[family]), store=str(tmp_path / "store"))
    with LiveServer(create_app(settings, loaded)) as live:
        out = subprocess.run(
            [sys.executable, "-m", "server.cli", "train", "--model", str(model_dirs[family]),
             "--data", str(tmp_path / "train.jsonl"), "--dev", str(dev),
             "--labels", json.dumps(labels), "--encoder", "mlp", "--epochs", "3",
             "-o", str(tmp_path / "task.safetensors"), "--push", live.url, "--task-id", "kw"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "pushed to" in out and "version 1" in out
        artifact = load_artifact(tmp_path / "task.safetensors")
        assert artifact.meta["template"] == template and f"template {template!r}" in out
        assert (artifact.head is not None) == (family == "encoder")
        assert artifact.meta.get("head_pooling") == ("mean" if family == "encoder" else None)
        rows = [json.loads(line) for line in dev.read_text().splitlines()]
        client = PtserveClient(live.url)
        served = [client.classify("kw", input=r["input"])["label"] for r in rows]
    accuracy = sum(s == r["label"] for s, r in zip(served, rows)) / len(rows)
    # labels picked in other batch shapes: equal up to near ties (rule 3 in tests/helpers.py),
    # counted on the same examples scored alone (the response has probabilities only)
    scored = examples(40, 1)
    assert [e.fields["input"] for e in scored] == [r["input"] for r in rows]
    _, ties = served_accuracy(loaded, artifact, scored)
    assert_same_accuracy(artifact.meta["metrics"]["dev_accuracy"], accuracy, ties, len(rows))


def padded_batch_loss_mismatch(model_dirs, monkeypatch=None) -> str | None:
    """None when the generate loss of a left-padded batch is the token-weighted
    mean of each example's loss alone, to FLOAT_RTOL of its scale (rule 1 in
    tests/helpers.py: the batch runs other shapes); with `monkeypatch`, the
    batch is packed with a padding position left visible."""
    loaded = load_model(str(model_dirs["causal"]), device="cpu", dtype="float32")
    trainer = PromptTrainer(loaded, TrainConfig(task_type="generate", encoder="mlp", progress=False))
    pairs = [("a", " json parse"), ("the quick brown fox jumps", " path"), ("of to and", " file open write stat")]
    data = [Example({"input": t}, out, i) for i, (t, out) in enumerate(pairs)]
    items = trainer._items(data)
    rows = trainer._rows().detach()
    with torch.no_grad():
        alone = [(float(trainer._losses(rows, [it])[0]), len(it.target)) for it in items]
        if monkeypatch is not None:
            monkeypatch.setattr(ptuning.train, "pack", visible_padding(ptuning.train.pack))
        batch_loss, _ = trainer._losses(rows, items)
    expected = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
    return float_mismatch(float(batch_loss), expected)


def test_generate_loss_with_padding_equals_each_example_alone(model_dirs):
    """The target-token alignment in a left-padded batch: batch loss == token-weighted mean of alone losses."""
    mismatch = padded_batch_loss_mismatch(model_dirs)
    assert mismatch is None, mismatch


def test_the_loss_tolerance_fails_a_batch_with_a_visible_padding_position(model_dirs, monkeypatch):
    assert padded_batch_loss_mismatch(model_dirs, monkeypatch).startswith("max difference ")


@pytest.mark.parametrize(
    "family, config, message",
    [
        ("masked", dict(labels={"yes": "true", "no": "no"}, template="[CLS][P:3]{input}[SEP]"), "exactly one"),
        ("masked", dict(labels={"yes": "false", "no": "no"}, template=FAMILIES["masked"][1]), "one token"),
        ("causal", dict(labels=LABELS, template="{input} is it?"), "no \\[P:n\\] pseudo tokens"),
        ("causal", dict(task_type="generate", labels=LABELS), "labels are only for"),
        ("causal", dict(labels={"yes": ""}), "non-empty string"),
        ("causal", dict(labels=["yes", "no"]), "needs labels"),
    ],
)
def test_the_trainer_refuses_what_the_server_would(model_dirs, family, config, message):
    loaded = load_model(str(model_dirs[family]), device="cpu", dtype="float32")
    with pytest.raises(InvalidRequest, match=message):
        PromptTrainer(loaded, TrainConfig(progress=False, **config))


def test_lines_the_server_would_refuse_are_errors_naming_the_line(model_dirs):
    _, template, labels = FAMILIES["masked"]
    loaded = load_model(str(model_dirs["masked"]), device="cpu", dtype="float32")
    trainer = PromptTrainer(loaded, TrainConfig(labels=labels, template=template, progress=False))
    # "[MASK]" in a field is text, as the server tokenizes it: the template's [MASK] stays the only mask
    items = trainer._items([Example({"input": "fine"}, "yes", 1), Example({"input": "two [MASK] here"}, "no", 2)])
    assert [it.ids.count(loaded.mask_token_id) for it in items] == [1, 1]
    causal = load_model(str(model_dirs["causal"]), device="cpu", dtype="float32")
    trainer = PromptTrainer(causal, TrainConfig(labels=LABELS, progress=False))
    with pytest.raises(DataError, match="line 7: .*positions"):
        trainer._items([Example({"input": "json " * 600}, "yes", 7)])


def test_cli_errors_are_one_line(model_dirs, tmp_path):
    data = write_jsonl(keyword_examples(20, 0), tmp_path / "d.jsonl")
    base = [sys.executable, "-m", "server.cli", "train", "--model", str(model_dirs["causal"]), "--data", str(data),
            "-o", str(tmp_path / "t.safetensors"), "--epochs", "1"]  # fmt: skip
    cases = [
        (["--labels", "{yes"], "--labels is not valid JSON"),
        (["--labels", json.dumps(LABELS), "--push", "http://127.0.0.1:9", "--task-id", "a b"], "invalid task id"),
        (["--labels", json.dumps(LABELS), "--push", "http://127.0.0.1:9", "--task-id", "ok"], "cannot reach"),
    ]
    for extra, message in cases:
        r = subprocess.run(base + extra, capture_output=True, text=True)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("family", ["causal", "encoder"])
def test_training_goes_on_from_a_trained_prompt(model_dirs, family):
    """going_on: epoch 0 is the trained prompt itself (its rows and head, bit
    for bit, and its dev figures); a run that does not beat it keeps it."""
    _, template, labels = FAMILIES[family]
    loaded = load_model(str(model_dirs[family]), device="cpu", dtype="float32")
    config = TrainConfig(labels=labels, template=template, epochs=2, progress=False)
    train, dev = examples(32, 0), examples(16, 1)
    first = PromptTrainer(loaded, config).fit(train, dev).artifact
    first.meta.update(generation={"max_new_tokens": 8}, description="the first version")  # what it says of itself
    # a rate so small that no step changes a float32 value: the epoch scores exactly as epoch 0 (1e-9 moved the
    # dev loss by rounding, either way depending on the thread count)
    tiny = 1e-45
    onward = PromptTrainer(loaded, TrainConfig(labels=labels, template=template, epochs=1, lr=tiny, head_lr=tiny,
                                               progress=False), going_on=first)  # fmt: skip
    assert torch.equal(onward._rows().detach().cpu(), first.embeddings)
    kept = onward.fit(train, dev).artifact
    assert kept.meta["metrics"]["best_epoch"] == 0  # an epoch that only ties does not beat where it began
    assert kept.meta["metrics"]["start_dev_loss"] == pytest.approx(first.meta["metrics"]["dev_loss"], rel=1e-6)
    assert torch.equal(kept.embeddings, first.embeddings)
    assert (kept.meta["generation"], kept.meta["description"]) == ({"max_new_tokens": 8}, "the first version")
    assert (kept.head is None) == (family == "causal")
    if kept.head is not None:
        assert all(torch.equal(a, b) for a, b in zip(kept.head, first.head))
    with pytest.raises(InvalidRequest, match="keeps its template, task type and labels"):
        PromptTrainer(loaded, TrainConfig(labels=labels, template=template + "[P:1]", progress=False), going_on=first)
