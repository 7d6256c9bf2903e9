"""sample(): one vectorised pass over a batch, with each seeded row drawn from
its own generator so its tokens never depend on its batch-mates."""

import math

import pytest
import torch

from server.engine.request import SamplingParams
from server.engine.sampling import make_generator, sample

V = 1000


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def draw(logits: torch.Tensor, params: list[SamplingParams], steps: int = 5) -> list[list[int]]:
    """Tokens of each row over `steps` calls with the same logits (each row's generator moves on)."""
    generators = [make_generator(p, "cpu") for p in params]
    out = [[] for _ in params]
    for _ in range(steps):
        tokens, finite = sample(logits, params, generators)
        assert all(finite)
        for row, t in zip(out, tokens):
            row.append(t)
    return out


def from_probs(probs: list[float]) -> torch.Tensor:
    """One row of logits whose softmax is `probs` (the rest of the vocabulary: zero probability)."""
    row = torch.full((V,), -math.inf)
    row[: len(probs)] = torch.log(torch.tensor(probs))
    return row


def drawn_set(row: torch.Tensor, seeds: range, **params) -> set[int]:
    params_list = [SamplingParams(max_new_tokens=1, seed=s, **params) for s in seeds]
    tokens, _ = sample(row.expand(len(params_list), -1), params_list, [make_generator(p, "cpu") for p in params_list])
    return set(tokens)


def test_greedy_is_argmax():
    logits = logits_rows(8)
    tokens, finite = sample(logits, [SamplingParams(max_new_tokens=1)] * 8, [None] * 8)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert finite == [True] * 8
    assert make_generator(SamplingParams(max_new_tokens=1, seed=3), "cpu") is None


MIXED = [
    SamplingParams(max_new_tokens=1),
    SamplingParams(max_new_tokens=1, temperature=0.7, seed=11),
    SamplingParams(max_new_tokens=1, temperature=1.3, top_k=20, seed=12),
    SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.8, seed=13),
    SamplingParams(max_new_tokens=1, temperature=0.9, top_k=50, top_p=0.9, seed=14),
    SamplingParams(max_new_tokens=1, temperature=2.0, top_k=20, top_p=0.5, seed=15),
    SamplingParams(max_new_tokens=1, temperature=1.0, top_k=5),
    SamplingParams(max_new_tokens=1, temperature=0.5, top_p=0.95),
]


@pytest.mark.parametrize(
    "seeded", [p for p in MIXED if p.seed is not None], ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}"
)
def test_seeded_row_ignores_its_batch(seeded):
    logits = logits_rows(8, seed=1)
    row = logits[3]
    alone = draw(row.unsqueeze(0), [seeded])[0]
    for position in (0, 5):
        for reseed in (0, 100):
            params = [SamplingParams(**{**vars(p), "seed": None if p.seed is None else p.seed + reseed}) for p in MIXED]
            params[position] = seeded
            batch = logits.clone()
            batch[position] = row
            assert draw(batch, params)[position] == alone
    assert len(set(alone)) > 1 or seeded.top_p < 0.6, "the row should not be stuck on one token"


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = logits_rows(6, seed=2)
    params = [SamplingParams(max_new_tokens=1, temperature=1.5, top_k=1, seed=s) for s in range(3)]
    params += [
        SamplingParams(max_new_tokens=1, temperature=1.5, top_p=p, seed=s) for s, p in enumerate([1e-6, 1e-46, 1e-300])
    ]
    tokens, _ = sample(logits, params, [make_generator(p, "cpu") for p in params])
    assert tokens == logits.argmax(dim=-1).tolist()


def test_top_k_draws_only_the_k_best():
    row = logits_rows(1, seed=3)[0]
    for k in (1, 3, 10):
        best = set(row.topk(k).indices.tolist())
        drawn = drawn_set(row, range(300), temperature=5.0, top_k=k)  # hot: the tail would be drawn if allowed
        assert drawn == best


def test_top_p_keeps_the_nucleus():
    row = from_probs([0.05, 0.4, 0.25, 0.2, 0.1])  # sorted: 1 (0.4), 2 (0.25), 3 (0.2), 4 (0.1), 0 (0.05)
    for top_p, nucleus in [(0.3, {1}), (0.5, {1, 2}), (0.7, {1, 2, 3}), (0.9, {1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})]:
        assert drawn_set(row, range(300), temperature=1.0, top_p=top_p) == nucleus, top_p


def test_top_k_then_top_p():
    """top-p cuts the distribution renormalised over the top k, as the old path did."""
    row = from_probs([0.4, 0.2, 0.2, 0.1, 0.1])
    # top 3 renormalised: 0.5, 0.25, 0.25, so 0.45 of it is token 0 alone (of the full distribution it
    # would take tokens 0 and 1)
    drawn = drawn_set(row, range(300), temperature=1.0, top_k=3, top_p=0.45)
    assert drawn == {0}
    drawn = drawn_set(row, range(300), temperature=1.0, top_k=3, top_p=0.8)
    assert drawn == {0, 1, 2}


def test_temperature_sharpens_and_flattens():
    row = from_probs([0.6, 0.3, 0.1])
    assert drawn_set(row, range(300), temperature=0.05) == {0}  # p(1) = (0.5)^20 / ...: never
    assert drawn_set(row, range(300), temperature=1.0) == {0, 1, 2}


def test_temperature_is_the_exponential_race_on_softmax():
    """The draw is exactly argmax(softmax(x / T) / q), q ~ Exp(1) from the row's generator."""
    logits = logits_rows(4, seed=4)
    temps = [0.3, 0.8, 1.0, 2.5]
    params = [SamplingParams(max_new_tokens=1, temperature=t, seed=20 + i) for i, t in enumerate(temps)]
    tokens, _ = sample(logits, params, [make_generator(p, "cpu") for p in params])
    for i, t in enumerate(temps):
        q = torch.empty(V).exponential_(generator=torch.Generator().manual_seed(20 + i))
        assert tokens[i] == int((torch.softmax(logits[i] / t, dim=-1) / q).argmax())


def test_non_finite_rows_flagged_others_unaffected():
    logits = logits_rows(4, seed=5)
    params = [
        SamplingParams(max_new_tokens=1),
        SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.9, seed=1),
        SamplingParams(max_new_tokens=1, temperature=1.0, top_k=7, seed=2),
        SamplingParams(max_new_tokens=1, temperature=1.0, seed=3),
    ]
    clean = draw(logits, params, steps=1)
    for bad in (math.nan, math.inf, -math.inf):
        for row in range(4):
            broken = logits.clone()
            broken[row, 17] = bad
            generators = [make_generator(p, "cpu") for p in params]
            tokens, finite = sample(broken, params, generators)
            assert finite == [i != row for i in range(4)]
            assert [t for i, t in enumerate(tokens) if i != row] == [c[0] for i, c in enumerate(clean) if i != row]


def test_bfloat16_logits():
    logits = logits_rows(4, seed=6).bfloat16()
    params = [SamplingParams(max_new_tokens=1)] * 2 + [
        SamplingParams(max_new_tokens=1, temperature=0.8, top_k=50, top_p=0.9, seed=s) for s in (1, 2)
    ]
    tokens, finite = sample(logits, params, [make_generator(p, "cpu") for p in params])
    assert finite == [True] * 4
    assert tokens[:2] == logits[:2].float().argmax(dim=-1).tolist()
    assert tokens[2:] == sample(logits.float(), params, [make_generator(p, "cpu") for p in params])[0][2:]
    assert all(t in set(logits[i].float().topk(50).indices.tolist()) for i, t in enumerate(tokens))


def test_empty_batch():
    assert sample(torch.empty(0, V), [], []) == ([], [])


def test_logits_left_unchanged():
    for params in (MIXED, [MIXED[3]] * 8, [MIXED[1]] * 8):
        logits = logits_rows(8, seed=7)
        before = logits.clone()
        draw(logits, params, steps=1)
        assert torch.equal(logits, before)  # exact: the tensor against its own copy
