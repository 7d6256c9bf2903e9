"""Writes sentiment_train.jsonl and sentiment_heldout.jsonl next to this file.

A small English movie-review sentiment set written for ptserve (no outside
source). Sentences are "<subject> <opinion>."; the held-out set uses opinions
AND subjects that never occur in training, so a model can only score well on
it through what its pretrained weights know about the words.

    python tests/data/make_sentiment.py
"""

import json
from pathlib import Path

POSITIVE_TRAIN = [
    "was wonderful", "was a delight from start to finish", "is beautifully made", "left me smiling",
    "was brilliant", "is one of the best I have seen", "was moving and heartfelt", "was great fun",
    "deserves every award", "was superb", "felt fresh and original", "was a joy to watch", "is a masterpiece",
    "kept me hooked", "was charming", "was excellent", "was thoroughly enjoyable", "exceeded my expectations",
    "was gorgeous", "is worth every minute",
]  # fmt: skip
NEGATIVE_TRAIN = [
    "was terrible", "was a waste of time", "is poorly made", "left me bored", "was awful",
    "is one of the worst I have seen", "was dull and lifeless", "was painful to sit through",
    "deserves to be forgotten", "was dreadful", "felt stale and predictable", "was a chore to watch", "is a mess",
    "put me to sleep", "was irritating", "was horrible", "was thoroughly disappointing",
    "fell far below my expectations", "was ugly", "is not worth a minute",
]  # fmt: skip
POSITIVE_HELDOUT = [
    "was fantastic", "made my day", "was lovely", "is a triumph", "was amazing", "was uplifting",
    "is a real gem", "was hilarious in the best way", "won me over completely", "was outstanding",
]  # fmt: skip
NEGATIVE_HELDOUT = [
    "was boring", "ruined my evening", "was bad", "is a disaster", "was unbearable",
    "was depressing in the worst way", "is a total flop", "was stupid", "lost me completely", "was mediocre at best",
]  # fmt: skip
SUBJECTS_TRAIN = ["The movie", "This film", "The acting", "The story", "The soundtrack", "The ending"]
SUBJECTS_HELDOUT = ["The show", "The director's new picture", "The performance", "The script"]


def rows(subjects, positive, negative):
    out = []
    for subject in subjects:
        for p, n in zip(positive, negative):
            out.append({"input": f"{subject} {p}.", "label": "positive"})
            out.append({"input": f"{subject} {n}.", "label": "negative"})
    return out


def main():
    here = Path(__file__).resolve().parent
    for name, data in (
        ("sentiment_train.jsonl", rows(SUBJECTS_TRAIN, POSITIVE_TRAIN, NEGATIVE_TRAIN)),
        ("sentiment_heldout.jsonl", rows(SUBJECTS_HELDOUT, POSITIVE_HELDOUT, NEGATIVE_HELDOUT)),
    ):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"{name}: {len(data)} examples")


if __name__ == "__main__":
    main()
