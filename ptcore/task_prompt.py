"""Task prompts on the device, and the LRU cache that keeps them fresh.

A `TaskPrompt` is one version of one task, ready to run: its template, its
prompt rows already on the model's device and dtype, and its tokenized
verbalizers. Objects are immutable; a request holds the one it was resolved
to, so a newer upload or an eviction never changes a request in flight.
A stored prompt is identified by (version, digest of its bytes), never by the
version alone: a store that lost its data gives version 1 again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from prompt_store.artifact import PromptArtifact, check_fits_model
from prompt_store.errors import ArtifactError
from prompt_store.store import PromptIdentity
from prompt_store.template import Template, own_length, render, static_prefix, tokenize_literals, tokenize_text
from ptcore.errors import InvalidRequest
from ptcore.model import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TaskPrompt:
    task_id: str
    version: int
    digest: str  # of the artifact bytes: with the version, what caches key on
    task_type: str  # "generate" | "classify"
    template: Template
    rows: torch.Tensor  # [m, H] on the model's device and dtype
    labels: tuple[str, ...] = ()
    label_ids: tuple[tuple[int, ...], ...] = ()  # verbalizer tokens, one tuple per label
    generation: dict = field(default_factory=dict)  # the artifact's default sampling parameters
    head: tuple[torch.Tensor, torch.Tensor] | None = None  # encoder models: weight [L, H], bias [L]
    head_pooling: str = "mask"  # what the head reads: the state at [MASK] or the mean over the sequence
    prefix_len: int = 0  # tokens before the template's first field: the same in every request
    literals: tuple[tuple[int, ...] | None, ...] | None = None  # the template's literal text, tokenized once

    def render(self, tokenizer, fields: dict[str, str], vocab_size: int) -> list[int]:
        """A request's input ids: the template rendered with `fields`."""
        return render(self.template, tokenizer, fields, vocab_size, self.literals)

    @property
    def identity(self) -> PromptIdentity:
        return PromptIdentity(self.version, self.digest)

    @property
    def key(self) -> tuple[str, int, str]:
        """What a cache of anything computed from this prompt keys on."""
        return (self.task_id, self.version, self.digest)


def check_limits(rows: int, labels: int, max_rows: int, max_labels: int) -> None:
    """A prompt within a server's limits (PTSERVE_MAX_VIRTUAL_TOKENS, PTSERVE_MAX_LABELS):
    checked before its verbalizers are tokenized or its rows placed."""
    if rows > max_rows:
        raise InvalidRequest(f"{rows} prompt rows; this server allows at most {max_rows}")
    if labels > max_labels:
        raise InvalidRequest(f"{labels} labels; this server allows at most {max_labels}")


def task_prompt(
    task_id: str, version: int, artifact: PromptArtifact, loaded: LoadedModel, digest: str = ""
) -> TaskPrompt:
    """Check `artifact` against the served model and place its rows on the device."""
    check_fits_model(artifact, loaded.info["hidden_size"], loaded.vocab_size, loaded.info["fingerprint"],
                     loaded.dtype, loaded.embedding_norm)  # fmt: skip
    labels = artifact.labels or {}
    label_ids = []
    for name, verbalizer in labels.items():
        ids = tokenize_text(loaded.tokenizer, verbalizer)
        if not ids:
            raise ArtifactError(f"label {name!r}: verbalizer {verbalizer!r} tokenizes to no tokens")
        if loaded.family == "masked" and len(ids) != 1:
            raise ArtifactError(
                f"label {name!r}: a masked LM scores one token at [MASK], "
                f"but verbalizer {verbalizer!r} is {len(ids)} tokens"
            )
        label_ids.append(tuple(ids))
    _check_verbalizers_fit(dict(zip(labels, label_ids)), artifact, loaded)
    _check_family(artifact, loaded)
    head = None if artifact.head is None else tuple(t.to(loaded.device, loaded.dtype) for t in artifact.head)
    return TaskPrompt(
        task_id=task_id,
        version=version,
        digest=digest,
        task_type=artifact.task_type,
        template=artifact.template,
        rows=artifact.embeddings.to(loaded.device, loaded.dtype),
        labels=tuple(labels),
        label_ids=tuple(label_ids),
        generation=dict(artifact.meta.get("generation") or {}),
        head=head,
        head_pooling=artifact.head_pooling,
        prefix_len=len(render(static_prefix(artifact.template), loaded.tokenizer, {}, loaded.vocab_size)),
        literals=tokenize_literals(artifact.template, loaded.tokenizer, loaded.vocab_size),
    )


def _check_verbalizers_fit(label_ids: dict[str, tuple[int, ...]], artifact: PromptArtifact, loaded: LoadedModel):
    """A causal LM reads each verbalizer after the input: if the longest does not fit
    in the model's positions even after empty fields, no input could ever be classified."""
    limit = loaded.max_positions
    if loaded.family != "causal" or limit is None or not label_ids:
        return
    name, ids = max(label_ids.items(), key=lambda item: len(item[1]))
    fixed = own_length(artifact.template, loaded.tokenizer, loaded.vocab_size)
    if fixed + len(ids) > limit:
        raise ArtifactError(
            f"label {name!r}: verbalizer is {len(ids)} tokens; after the template's own {fixed} tokens the "
            f"model's {limit} positions leave no room for it, so no input could be classified"
        )


def check_classify_input(prompt: TaskPrompt, ids: list[int], loaded: LoadedModel) -> None:
    """What a rendered classify input must satisfy, for the server and the trainer alike."""
    if loaded.family != "causal" and ids.count(loaded.mask_token_id) != 1:
        raise InvalidRequest(f"the input must not contain the {loaded.tokenizer.mask_token} token")
    longest = max(len(v) for v in prompt.label_ids) if loaded.family == "causal" else 0
    limit = loaded.max_positions
    if limit is not None and len(ids) + longest > limit:
        raise InvalidRequest(f"input plus verbalizer is {len(ids) + longest} tokens; the model has {limit} positions")


def _check_family(artifact: PromptArtifact, loaded: LoadedModel) -> None:
    """What each model family can serve (see ptcore/scoring.py)."""
    if loaded.family == "causal":
        if artifact.head is not None:
            raise ArtifactError("head tensors are for encoder models; the served model is a causal LM")
        return
    if artifact.task_type != "classify":
        raise ArtifactError(f"the served model is a {loaded.family} model: it can only serve classify tasks")
    if loaded.family == "encoder" and artifact.head is None:
        raise ArtifactError("the served model is an encoder without an LM head: a classify task needs head tensors")
    if loaded.family == "masked" and artifact.head is not None:
        raise ArtifactError("head tensors are for encoder models; the served model is a masked LM")
    empty = {name: "" for name in artifact.template.fields}
    ids = render(artifact.template, loaded.tokenizer, empty, loaded.vocab_size)
    if ids.count(loaded.mask_token_id) != 1:
        raise ArtifactError(
            f"template {artifact.template.source!r} must contain exactly one {loaded.tokenizer.mask_token} token "
            f"for a {loaded.family} model"
        )
