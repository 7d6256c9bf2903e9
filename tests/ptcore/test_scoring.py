"""LabelScorer per model family, against the Hugging Face model's own forward
on the same text, one request alone and without padding (the oracle, as
tests/helpers.py states it). A batch pads its rows (causal LMs on the left,
masked LMs and encoders on the right) and runs other matrix shapes than one
request alone, so scores are compared to FLOAT_RTOL of their scale (rule 1 in
tests/helpers.py), never bit for bit; the mutation checks at the end show that
tolerance fails a batch with a padding position left visible or its positions
counted from the padded start."""

import pytest
import torch

import ptcore.scoring
from prompt_store.template import parse_template, render
from ptcore.model import load_model
from ptcore.scoring import LabelQuery, LabelScorer
from ptcore.tiny_model import write_tiny_model
from tests.helpers import alone_embeds, alone_label_logprobs, float_mismatch, visible_padding

CAUSAL_TASKS = [  # template, input, verbalizers (some of several tokens)
    ("[P:3]{input}[P:3]", "hello world", [" good", " bad thing"]),
    ("[P:2] Review: {input} [P:2] Sentiment:", "the quick brown fox jumps over the lazy dog", ["yes", " maybe so"]),
    ("[P:9]{input}", "x", [" the return value of", " b", "no"]),
]
MASKED_TASKS = [  # single-token verbalizers at the template's one [MASK]
    ("[CLS][P:3]{input}[P:3][MASK][SEP]", "json is a format", ["true", "no"]),
    ("[CLS][P:5] {input} [MASK][SEP]", "the return value of the list", ["json", "path", "file"]),
    ("[CLS][P:2]{input}[MASK][SEP]", "x", ["file", "json"]),
]


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert", "bert-encoder"])
def family_model(request, tmp_path_factory):
    """Each tiny model family in float32 on the CPU (whatever PTSERVE_TEST_DEVICE says)."""
    d = write_tiny_model(tmp_path_factory.mktemp(request.param) / "m", arch=request.param)
    return load_model(str(d), device="cpu", dtype="float32")


def queries(loaded, poolings=("mask", "mean", "mask")) -> list[LabelQuery]:
    """One query per task of the family, with random prompt rows (and a random head for encoders)."""
    tasks = CAUSAL_TASKS if loaded.family == "causal" else MASKED_TASKS
    H, g = loaded.info["hidden_size"], torch.Generator().manual_seed(0)
    out = []
    for (template, text, verbalizers), pooling in zip(tasks, poolings):
        t = parse_template(template)
        ids = render(t, loaded.tokenizer, {"input": text}, loaded.vocab_size)
        label_ids = tuple(tuple(loaded.tokenizer.encode(v, add_special_tokens=False)) for v in verbalizers)
        rows = torch.randn(t.num_virtual_tokens, H, generator=g) * 0.5
        head = None
        if loaded.family == "encoder":
            head = (torch.randn(len(verbalizers), H, generator=g), torch.randn(len(verbalizers), generator=g))
        out.append(LabelQuery(ids, rows, label_ids, head, pooling))
    return out


@torch.no_grad()
def direct(loaded, q: LabelQuery) -> torch.Tensor:
    """The label scores from the Hugging Face model's forward on this one query's
    embeddings, no padding: causal LMs, a label's score is the summed
    log-probability of its verbalizer tokens following the rendered sequence;
    masked LMs, the log-probability of its single verbalizer token at the [MASK]
    position; encoders, the log-softmax of the head over the state at the [MASK]
    (or the mean state)."""
    if loaded.family == "causal":
        return torch.tensor(alone_label_logprobs(loaded.model, q.rows, q.input_ids, loaded.vocab_size, q.label_ids))
    out = loaded.model(inputs_embeds=alone_embeds(loaded.model, q.rows, q.input_ids, loaded.vocab_size))
    at = q.input_ids.index(loaded.mask_token_id)
    if loaded.family == "masked":
        return torch.log_softmax(out.logits[0, at], dim=-1)[[v[0] for v in q.label_ids]]
    states = out.last_hidden_state[0]  # [T, H]
    pooled = states.mean(dim=0) if q.pooling == "mean" else states[at]
    return torch.log_softmax(q.head[0] @ pooled + q.head[1], dim=-1)


def assert_same_scores(got: torch.Tensor, want: torch.Tensor):
    """The same scores up to float32 rounding: FLOAT_RTOL of their scale (rule 1
    in tests/helpers.py). Right padding leaves every real token of a masked LM
    where it was, but not the shapes of the matrix products, whose kernels (and
    so the last bits) differ by shape on some CPUs."""
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    mismatch = float_mismatch(got, want)
    assert mismatch is None, mismatch


def test_the_families_are_the_ones_meant(family_model):
    want = {"GPT2LMHeadModel": "causal", "LlamaForCausalLM": "causal", "BertForMaskedLM": "masked",
            "BertModel": "encoder"}  # fmt: skip
    assert family_model.family == want[type(family_model.model).__name__]


def test_each_query_alone_equals_the_models_own_forward(family_model):
    loaded = family_model
    scorer = LabelScorer(loaded)
    qs = queries(loaded)
    if loaded.family == "causal":
        assert [len(v) for v in qs[2].label_ids] == [4, 1, 2]  # multi-token verbalizers of different lengths
    else:
        assert all(len(v) == 1 for q in qs for v in q.label_ids)
    with torch.no_grad():
        for q in qs:
            assert_same_scores(scorer([q])[0], direct(loaded, q))


def test_a_batch_of_mixed_tasks_equals_each_alone(family_model):
    """Different prompts, prompt lengths, label counts and (encoders) poolings in one batch."""
    loaded = family_model
    scorer = LabelScorer(loaded)
    qs = queries(loaded)
    with torch.no_grad():
        batch = scorer(qs)
        alone = [scorer([q])[0] for q in qs]
    assert [len(s) for s in batch] == [len(q.label_ids) for q in qs]
    for got, want, q in zip(batch, alone, qs):
        assert_same_scores(got, want)
        assert_same_scores(got, direct(loaded, q))


@pytest.mark.parametrize("family_model", ["gpt2", "llama"], indirect=True)
def test_a_multi_token_verbalizer_scores_the_sum_of_its_tokens(family_model):
    """The causal score of " the return value of" is the sum, token by token, of
    log p(token | everything before it), read off one forward of the whole text."""
    loaded = family_model
    q = queries(loaded)[2]
    verbalizer = q.label_ids[0]
    with torch.no_grad():
        score = LabelScorer(loaded)([q])[0][0]
        seq = q.input_ids + list(verbalizer)
        embeds = alone_embeds(loaded.model, q.rows, seq, loaded.vocab_size)
        logp = torch.log_softmax(loaded.model(inputs_embeds=embeds).logits[0], dim=-1)  # [T, V]
    n = len(q.input_ids)
    by_hand = sum(logp[n - 1 + j, t] for j, t in enumerate(verbalizer))
    assert len(verbalizer) == 4
    assert_same_scores(score, by_hand)


@pytest.mark.parametrize("family_model", ["bert-encoder"], indirect=True)
def test_the_encoder_head_reads_the_mask_state_or_the_mean_as_asked(family_model):
    """The same rows and head give the scores of their own pooling, and the two differ."""
    loaded = family_model
    q = queries(loaded)[0]
    as_mean = LabelQuery(q.input_ids, q.rows, q.label_ids, q.head, "mean")
    with torch.no_grad():
        at_mask, mean = LabelScorer(loaded)([q, as_mean])
    assert_same_scores(at_mask, direct(loaded, q))
    assert_same_scores(mean, direct(loaded, as_mean))
    assert float_mismatch(at_mask, mean).startswith("max difference ")  # same shape, values beyond the tolerance


def test_scores_are_differentiable_in_the_prompt_rows(family_model):
    """The trainer backpropagates through the same scorer into the rows (and head)."""
    loaded = family_model
    q = queries(loaded)[0]
    q.rows.requires_grad_(True)
    if q.head is not None:
        q.head[0].requires_grad_(True)
    LabelScorer(loaded)([q])[0][0].backward()
    assert q.rows.grad is not None and q.rows.grad.abs().sum() > 0
    if q.head is not None:
        assert q.head[0].grad.abs().sum() > 0


# --- mutation checks: the tolerance above fails the bugs these tests are for ---


def padded_queries(loaded, qs: list[LabelQuery]) -> list[bool]:
    """Per query: whether any of its rows is padded in a batch of all of them
    (causal LMs run one row per label, other families one per query)."""
    if loaded.family == "causal":
        lengths = [[len(q.input_ids) + len(v) for v in q.label_ids] for q in qs]
    else:
        lengths = [[len(q.input_ids)] for q in qs]
    T = max(max(n) for n in lengths)
    return [min(n) < T for n in lengths]


def assert_each_padded_query_fails(loaded, qs, broken_pack, monkeypatch):
    """Scored in one batch built by `broken_pack`, every query with a padded row
    fails assert_same_scores against itself scored alone (with the real pack)."""
    scorer = LabelScorer(loaded)
    padded = padded_queries(loaded, qs)
    assert sum(padded) >= 2
    with torch.no_grad():
        alone = [scorer([q])[0] for q in qs]
        monkeypatch.setattr(ptcore.scoring, "pack", broken_pack)
        batch = scorer(qs)
    for got, want, was_padded in zip(batch, alone, padded):
        if was_padded:
            with pytest.raises(AssertionError, match="max difference"):
                assert_same_scores(got, want)
        else:  # the longest rows have no padding to leak
            assert_same_scores(got, want)


def test_the_tolerance_fails_a_batch_with_a_visible_padding_position(family_model, monkeypatch):
    loaded = family_model
    assert_each_padded_query_fails(loaded, queries(loaded), visible_padding(ptcore.scoring.pack), monkeypatch)


@pytest.mark.parametrize("family_model", ["gpt2"], indirect=True)
def test_the_tolerance_fails_a_batch_with_positions_counted_from_the_padded_start(family_model, monkeypatch):
    """GPT-2's absolute positions: a left-padded row numbered from its first
    padding token instead of its first real one. (Llama's rotary positions are
    relative: the same shift of a whole row changes nothing there, rightly.)"""
    real = ptcore.scoring.pack

    def from_padded_start(seqs, offsets, vocab_size, device, left=True):
        ids, mask, positions = real(seqs, offsets, vocab_size, device, left)
        return ids, mask, torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    assert_each_padded_query_fails(family_model, queries(family_model), from_padded_start, monkeypatch)
