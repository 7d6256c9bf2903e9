"""A hand-written prompt run on the served model with no stored prompt: the
comparison P-tuning is about (POST /v1/handwritten/generate and /classify; the
playground's "hand-written prompt" side).

The text is a template of literal words and `{field}` holes (no `[P:n]`). It
runs as the trainer's `--from-prompt` starts: each run of words becomes as many
pseudo tokens as it has tokens, each row that token's own input embedding
(ptuning/starting_template.py), so the model sees exactly the hand-written
words, and the request takes the same path, limits and batching as any task.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from prompt_store.artifact import make_artifact
from prompt_store.template import parse_template
from ptcore.errors import InvalidRequest
from ptcore.model import LoadedModel
from ptcore.task_prompt import TaskPrompt, check_limits, task_prompt
from ptuning.starting_template import prompt_from_text

TASK_ID = "(hand-written)"  # what answers and records name it: no stored task can have this id


@dataclass(frozen=True)
class HandWritten:
    template: str
    task_type: str  # "generate" | "classify"
    labels: tuple[tuple[str, str], ...] = ()  # classify: (label, verbalizer) pairs


def handwritten_prompt(hand: HandWritten, loaded: LoadedModel, max_labels: int, max_rows: int) -> TaskPrompt:
    """The prompt of a hand-written template, checked as an upload is (the
    server's label and prompt-row limits too)."""
    try:
        template = parse_template(hand.template)
    except InvalidRequest as e:
        raise InvalidRequest(f"template: {e}", "template") from None
    if template.num_virtual_tokens:
        raise InvalidRequest("a hand-written template has words and {fields} only, no [P:n]", "template")
    if not template.fields:
        raise InvalidRequest("the template has no field such as {input} for the request's text", "template")
    if hand.task_type == "classify" and not hand.labels:
        raise InvalidRequest("a classify prompt needs labels: label -> verbalizer", "labels")
    try:
        source, start = prompt_from_text(hand.template, loaded.tokenizer)
    except InvalidRequest:
        raise InvalidRequest("the template has no words besides its fields", "template") from None
    check_limits(len(start), len(hand.labels), max_rows, max_labels)  # the words are its rows, as an upload's
    if max(start) >= loaded.vocab_size:  # a tokenizer with ids past the embedding rows
        raise InvalidRequest(f"the template tokenizes to id {max(start)}, outside the model's {loaded.vocab_size} "
                             "rows", "template")  # fmt: skip
    weight = loaded.model.get_input_embeddings().weight
    rows = weight[list(start)].detach().float().cpu()
    # checked as an upload is (labels and verbalizers, the model's limits): refusals are 422s
    artifact = make_artifact(rows, template=source, task_type=hand.task_type, labels=dict(hand.labels) or None,
                             base_model=loaded.info)  # fmt: skip
    digest = hashlib.sha256(json.dumps([hand.template, hand.task_type, hand.labels]).encode()).hexdigest()
    return task_prompt(TASK_ID, 0, artifact, loaded, digest)
