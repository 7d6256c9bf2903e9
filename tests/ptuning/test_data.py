"""Splitting labelled examples into train and dev sets."""

from ptuning.data import Example, split_dev, split_for_training

EXAMPLES = [Example({"input": f"review {i}"}, "positive" if i % 2 else "negative", i + 1) for i in range(100)]


def test_a_split_large_enough_to_pick_an_epoch_is_held_out():
    train, dev, folded = split_for_training(EXAMPLES, 0.2, 0, min_dev_examples=20, dev_decides=False)
    assert (len(train), len(dev), folded) == (80, 20, False)
    assert (train, dev) == split_dev(EXAMPLES, 0.2, 0)


def test_a_split_too_small_to_pick_an_epoch_is_trained_on_too():
    train, dev, folded = split_for_training(EXAMPLES, 0.2, 0, min_dev_examples=50, dev_decides=False)
    assert (len(train), len(dev), folded) == (100, 20, True)
    assert sorted(e.line for e in train) == list(range(1, 101))  # every example once
    assert dev == split_dev(EXAMPLES, 0.2, 0)[1]


def test_a_small_split_that_still_decides_is_kept_out_of_training():
    """--from-prompt on a causal LM: the trained table must beat the manual prompt on dev."""
    train, dev, folded = split_for_training(EXAMPLES, 0.2, 0, min_dev_examples=50, dev_decides=True)
    assert (len(train), len(dev), folded) == (80, 20, False)
