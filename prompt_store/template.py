"""Templates: text with pseudo-token holes `[P:n]` and field holes `{name}`.

The rendering rule (DESIGN.md) is implemented once here and used by both the
server and the trainer:
1. whitespace directly next to a `[P:n]` hole is dropped;
2. every other literal segment, and every field value, is tokenized on its own,
   as written, without special tokens added;
3. the pieces are concatenated in order; nothing else is added.

Rendered sequences are lists of ints. Pseudo token i of a task (counted from 0
across the whole template) is written as the *virtual id* `vocab_size + i`, an id
the model's vocabulary does not have; the runner swaps those ids for the task's
prompt rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import TemplateError

_HOLE = re.compile(r"\[P:(\d+)\]|\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Pseudo:
    count: int  # number of consecutive pseudo tokens


@dataclass(frozen=True)
class Field:
    name: str


@dataclass(frozen=True)
class Literal:
    text: str


Segment = Pseudo | Field | Literal


@dataclass(frozen=True)
class Template:
    source: str
    segments: tuple[Segment, ...]

    @property
    def num_virtual_tokens(self) -> int:
        return sum(s.count for s in self.segments if isinstance(s, Pseudo))

    @property
    def fields(self) -> tuple[str, ...]:
        """Field names in order of first appearance."""
        names: list[str] = []
        for s in self.segments:
            if isinstance(s, Field) and s.name not in names:
                names.append(s.name)
        return tuple(names)


def static_prefix(template: Template) -> Template:
    """The segments before the first field: rendered the same for every request
    of a task (rule 2), so their keys and values can be computed once."""
    first_field = next((i for i, s in enumerate(template.segments) if isinstance(s, Field)), len(template.segments))
    return Template(source=template.source, segments=template.segments[:first_field])


def parse_template(source: str) -> Template:
    if not isinstance(source, str) or not source:
        raise TemplateError("template must be a non-empty string")
    raw: list[Segment] = []
    pos = 0
    for m in _HOLE.finditer(source):
        if m.start() > pos:
            raw.append(Literal(source[pos : m.start()]))
        if m.group(1) is not None:
            count = int(m.group(1))
            if count < 1:
                raise TemplateError(f"template {source!r}: [P:{m.group(1)}] must hold at least 1 pseudo token")
            raw.append(Pseudo(count))
        else:
            raw.append(Field(m.group(2)))
        pos = m.end()
    if pos < len(source):
        raw.append(Literal(source[pos:]))

    # Rule 1: whitespace touching a pseudo-token hole belongs to no segment.
    segments: list[Segment] = []
    for i, seg in enumerate(raw):
        if isinstance(seg, Literal):
            text = seg.text
            if i > 0 and isinstance(raw[i - 1], Pseudo):
                text = text.lstrip()
            if i + 1 < len(raw) and isinstance(raw[i + 1], Pseudo):
                text = text.rstrip()
            if text:
                segments.append(Literal(text))
        else:
            segments.append(seg)
    return Template(source=source, segments=tuple(segments))


def tokenize_text(tokenizer, text: str) -> list[int]:
    """Rule 2: one piece of text, as written, with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(template: Template, tokenizer, fields: dict[str, str], vocab_size: int) -> list[int]:
    """Token ids of the rendered template; pseudo token i becomes `vocab_size + i`."""
    missing = [name for name in template.fields if name not in fields]
    if missing:
        raise TemplateError(
            f"missing field(s) {missing} for template {template.source!r}; it needs {list(template.fields)}"
        )
    unknown = sorted(set(fields) - set(template.fields))
    if unknown:
        raise TemplateError(
            f"unknown field(s) {unknown} for template {template.source!r}; it takes {list(template.fields)}"
        )
    ids: list[int] = []
    next_virtual = 0
    for seg in template.segments:
        if isinstance(seg, Pseudo):
            ids.extend(range(vocab_size + next_virtual, vocab_size + next_virtual + seg.count))
            next_virtual += seg.count
            continue
        if isinstance(seg, Field):
            text = fields[seg.name]
            if not isinstance(text, str):
                raise TemplateError(f"field {seg.name!r} must be a string")
        else:
            text = seg.text
        tokens = tokenize_text(tokenizer, text)
        # an id past the embedding matrix would be read as a pseudo token
        if tokens and max(tokens) >= vocab_size:
            raise TemplateError(f"{text[:40]!r} tokenizes to id {max(tokens)}, outside the model's {vocab_size} rows")
        ids.extend(tokens)
    return ids
