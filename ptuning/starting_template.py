"""Where a P-tuning run's template comes from when the user gives none: the
model family's default layout (`default_template`), or a manual text prompt
whose words become pseudo tokens started at their own embeddings
(`prompt_from_text`), so that epoch 0 is exactly the manual prompt."""

from __future__ import annotations

from prompt_store.template import Field, Pseudo, parse_template, tokenize_text
from ptcore.errors import InvalidRequest
from ptcore.model import LoadedModel


def default_template(loaded: LoadedModel) -> str:
    """The paper's (3, x, 3) layout; masked LMs and encoders wrap it in the
    tokenizer's own CLS and SEP tokens and read the label at its MASK token."""
    if loaded.family == "causal":
        return "[P:3]{input}[P:3]"
    tok = loaded.tokenizer
    if tok.mask_token is None:
        raise InvalidRequest(f"the {loaded.family} model's tokenizer has no mask token: give a template")
    cls, mask, sep = (_escape(t or "") for t in (tok.cls_token, tok.mask_token, tok.sep_token))
    return f"{cls}[P:3]{{input}}[P:3]{mask}{sep}"


def _escape(text: str) -> str:
    """Literal text for a template: braces doubled."""
    return text.replace("{", "{{").replace("}", "}}")


def prompt_from_text(text: str, tokenizer) -> tuple[str, list[int | None]]:
    """A manual template -> (P-tuning template, starting token per pseudo token).

    Every run of literal words becomes `[P:k]`, k its number of tokens (rule 2:
    the run tokenized alone, as written), each pseudo token starting at its
    token's embedding; special tokens ([CLS], [MASK]...) stay real tokens.
    `[P:n]` holes already in `text` stay and start at random tokens (None).
    Rendered with those starting rows, the template gives exactly the token
    embeddings of the manual template: epoch 0 is the manual prompt."""
    special = set(tokenizer.all_special_ids)
    parts: list[str] = []
    start: list[int | None] = []
    for seg in parse_template(text).segments:
        if isinstance(seg, Field):
            parts.append("{" + seg.name + "}")
        elif isinstance(seg, Pseudo):
            parts.append(f"[P:{seg.count}]")
            start += [None] * seg.count
        else:
            run: list[int] = []  # words not yet written
            for token in tokenize_text(tokenizer, seg.text) + [None]:
                if run and (token is None or token in special):
                    parts.append(f"[P:{len(run)}]")
                    start += run
                    run = []
                if token in special:
                    parts.append(_escape(tokenizer.convert_ids_to_tokens(token)))
                elif token is not None:
                    run.append(token)
    if not start:
        raise InvalidRequest(f"from_prompt {text!r} has no words to start pseudo tokens from")
    return "".join(parts), start
