"""Templates: text with pseudo-token holes `[P:n]` and field holes `{name}`.

The rendering rule is implemented once here and used by both the
server and the trainer:
1. whitespace directly next to a `[P:n]` hole is dropped;
2. every other literal segment, and every field value, is tokenized on its own,
   as written, without special tokens added; special-token strings in the
   template's literals (`<s>`, `[MASK]`) become those tokens, in field values
   they are plain text (request data never becomes a control token);
3. the pieces are concatenated in order; nothing else is added.

Syntax: a field is `{name}`, name an identifier of ASCII letters, digits and
`_` (no attribute or index access); `{{` and `}}` are literal braces; any other
brace is refused. `[P:n]` holds 1 <= n <= MAX_PSEUDO_PER_HOLE pseudo tokens.

Rendered sequences are lists of ints. Pseudo token i of a task (counted from 0
across the whole template) is written as the *virtual id* `vocab_size + i`, an id
the model's vocabulary does not have; the engine swaps those ids for the task's
prompt rows.
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass

from .errors import TemplateError

# one piece of template syntax: a pseudo-token hole, an escaped brace, a field hole, a stray brace
_SYNTAX = re.compile(r"\[P:(\d+)\]|\{\{|\}\}|\{([^{}]*)\}|[{}]")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_PSEUDO_PER_HOLE = 10_000  # far above any server's max_virtual_tokens; bounds int() on the digits


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


def own_length(template: Template, tokenizer, vocab_size: int) -> int:
    """Tokens of the template with every field empty: what any request of the
    task costs at least."""
    return len(render(template, tokenizer, {name: "" for name in template.fields}, vocab_size))


def parse_template(source: str) -> Template:
    if not isinstance(source, str) or not source:
        raise TemplateError("template must be a non-empty string")
    raw: list[Segment] = []
    text = ""  # literal text since the last hole
    pos = 0
    for m in _SYNTAX.finditer(source):
        text += source[pos : m.start()]
        pos = m.end()
        piece = m.group(0)
        if piece in ("{{", "}}"):
            text += piece[0]
            continue
        if piece in ("{", "}"):
            raise TemplateError(
                f"template {source!r}: unbalanced {piece!r} at index {m.start()}; a field is written {{name}} "
                "and a literal brace {{ or }}"
            )
        if text:
            raw.append(Literal(text))
            text = ""
        if m.group(1) is not None:
            raw.append(Pseudo(_pseudo_count(m.group(1))))
        elif _FIELD_NAME.fullmatch(m.group(2)):
            raw.append(Field(m.group(2)))
        else:
            raise TemplateError(
                f"template {source!r}: bad field {{{m.group(2)}}}: a field name is letters, digits and _, "
                "not starting with a digit (no attribute or index access)"
            )
    text += source[pos:]
    if text:
        raw.append(Literal(text))

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


def _pseudo_count(digits: str) -> int:
    shown = digits if len(digits) <= 8 else digits[:8] + "..."
    if len(digits) > len(str(MAX_PSEUDO_PER_HOLE)) or not 1 <= int(digits) <= MAX_PSEUDO_PER_HOLE:
        raise TemplateError(f"[P:{shown}]: a hole holds at least 1 and at most {MAX_PSEUDO_PER_HOLE} pseudo tokens")
    return int(digits)


def lone_surrogate(text: str) -> tuple[int, str] | None:
    """(index, character) of the first lone surrogate in `text`, else None. JSON can
    escape one ("\\ud800"), but it is no character: neither UTF-8 nor a tokenizer takes it."""
    m = _SURROGATE.search(text)
    return None if m is None else (m.start(), m.group(0))


# A fast tokenizer applies `split_special_tokens` by setting a flag on its Rust
# tokenizer, then encoding: two threads that ask one tokenizer for different
# settings can each encode with the other's. So a tokenizer encodes for one
# thread at a time, under its own lock. The lock belongs to the tokenizer
# object, not to the process: another tokenizer object (a copy, or the
# long-input lane's tokenizer process, server/tokenizer_process.py) has its
# own, so a long input being tokenized never holds up an ordinary request's
# tokenizing.
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its lock
_LOCKS_GUARD = threading.Lock()


def encoding_lock(tokenizer) -> threading.Lock:
    """The lock that `tokenizer` encodes under."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(tokenizer)
        if lock is None:
            lock = _LOCKS[tokenizer] = threading.Lock()
        return lock


def tokenize_text(tokenizer, text: str, split_special_tokens: bool = False) -> list[int]:
    """Rule 2: one piece of text, as written, with no special tokens added.
    `split_special_tokens`: special-token strings in `text` are plain text (field values)."""
    with encoding_lock(tokenizer):
        encoded = tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens)
    return list(encoded["input_ids"])


def tokenize_literals(template: Template, tokenizer, vocab_size: int) -> tuple[tuple[int, ...] | None, ...]:
    """The tokens of each of the template's literal segments (None for the other
    segments): the same in every request, so a task tokenizes them once and
    hands them to `render`."""
    return tuple(_literal_tokens(seg.text, tokenizer, vocab_size) if isinstance(seg, Literal) else None
                 for seg in template.segments)  # fmt: skip


def _literal_tokens(text: str, tokenizer, vocab_size: int) -> tuple[int, ...]:
    tokens = tokenize_text(tokenizer, text)
    _check_in_vocab(text, tokens, vocab_size)
    return tuple(tokens)


def _check_in_vocab(text: str, tokens: list[int] | tuple[int, ...], vocab_size: int) -> None:
    # an id past the embedding matrix would be read as a pseudo token
    if tokens and max(tokens) >= vocab_size:
        raise TemplateError(f"{text[:40]!r} tokenizes to id {max(tokens)}, outside the model's {vocab_size} rows")


def render(template: Template, tokenizer, fields: dict[str, str], vocab_size: int,
           literals: tuple[tuple[int, ...] | None, ...] | None = None) -> list[int]:  # fmt: skip
    """Token ids of the rendered template; pseudo token i becomes `vocab_size + i`.
    `literals`: the template's literal segments already tokenized (tokenize_literals)."""
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
    for i, seg in enumerate(template.segments):
        if isinstance(seg, Pseudo):
            ids.extend(range(vocab_size + next_virtual, vocab_size + next_virtual + seg.count))
            next_virtual += seg.count
            continue
        if isinstance(seg, Field):
            text = fields[seg.name]
            if not isinstance(text, str):
                raise TemplateError(f"field {seg.name!r} must be a string")
            surrogate = lone_surrogate(text)
            if surrogate is not None:
                raise TemplateError(
                    f"field {seg.name!r} holds a lone surrogate {surrogate[1]!r} at index {surrogate[0]}: not text"
                )
            tokens = tokenize_text(tokenizer, text, split_special_tokens=True)  # request data: never control tokens
            _check_in_vocab(text, tokens, vocab_size)
        else:
            tokens = literals[i] if literals is not None else _literal_tokens(seg.text, tokenizer, vocab_size)
        ids.extend(tokens)
    return ids
