"""Classification in bounded forward passes (its equality with the request
computed alone is in tests/server/test_oracle.py)."""

from server.engine.classify import Classifier
from tests.helpers import LABEL_SETS, TEMPLATES, make_classify


def test_classification_is_split_into_bounded_forward_passes(loaded):
    works = [make_classify(loaded, i, LABEL_SETS[i % 3], *TEMPLATES[i % len(TEMPLATES)]) for i in range(5)]
    whole = Classifier(loaded).run(works)
    small = Classifier(loaded, max_rows=3)
    assert [len(c) for c in small._chunks(works)] == [1, 1, 1, 1, 1]
    for a, b in zip(whole, small.run(works)):
        assert a.label == b.label
        assert max(abs(x - y) for x, y in zip(a.logprobs.values(), b.logprobs.values())) < 1e-4
