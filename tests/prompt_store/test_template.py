import threading
import time

import pytest

from prompt_store.errors import TemplateError
from prompt_store.template import Field, Literal, Pseudo, parse_template, render, tokenize_text
from ptcore.tiny_model import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


def test_parse_segments_and_counts():
    t = parse_template("{premise}[P:3]{hypothesis}?[P:2]")
    assert t.segments == (Field("premise"), Pseudo(3), Field("hypothesis"), Literal("?"), Pseudo(2))
    assert t.num_virtual_tokens == 5
    assert t.fields == ("premise", "hypothesis")


def test_whitespace_next_to_pseudo_holes_is_dropped():
    t = parse_template("[P:2] Review: {input} [P:2] Sentiment:")
    assert t.segments == (Pseudo(2), Literal("Review: "), Field("input"), Pseudo(2), Literal("Sentiment:"))
    # whitespace between a field and a pseudo hole is dropped entirely
    assert parse_template("{input} [P:1]").segments == (Field("input"), Pseudo(1))


@pytest.mark.parametrize("bad", ["", "[P:0]{input}"])
def test_bad_templates(bad):
    with pytest.raises(TemplateError):
        parse_template(bad)


def test_render_places_virtual_ids_and_tokenizes_segments_separately(tok):
    V = 1000
    t = parse_template("[P:2] Review: {input} [P:1] Sentiment:")
    ids = render(t, tok, {"input": "a fine film"}, V)
    expected = (
        [V, V + 1]
        + tokenize_text(tok, "Review: ")
        + tokenize_text(tok, "a fine film")
        + [V + 2]
        + tokenize_text(tok, "Sentiment:")
    )
    assert ids == expected


def test_special_token_strings_in_a_template_become_those_tokens(tok):
    ids = render(parse_template("[P:1]<s>{input}"), tok, {"input": "x"}, 1000)
    assert ids[:2] == [1000, tok.bos_token_id]
    assert tok.bos_token_id not in render(parse_template("[P:1]{input}"), tok, {"input": "x"}, 1000)


def test_render_field_errors(tok):
    t = parse_template("{premise}[P:3]{hypothesis}")
    with pytest.raises(TemplateError, match="missing field"):
        render(t, tok, {"premise": "a"}, 1000)
    with pytest.raises(TemplateError, match="unknown field"):
        render(t, tok, {"premise": "a", "hypothesis": "b", "extra": "c"}, 1000)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("[P:3]{0}[P:3]", r"field \{0\}: a field name is letters, digits and _"),
        ("{input.__dict__}[P:1]", r"field \{input.__dict__\}.*no attribute or index access"),
        ("{input[0]}[P:1]", r"field \{input\[0\]\}"),
        ("{input[P:3]", r"unbalanced '\{' at index 0"),
        ("[P:3]}{input}", r"unbalanced '\}' at index 5"),
        ("[P:" + "9" * 5000 + "]{input}", r"\[P:99999999\.\.\.\]: a hole holds at least 1 and at most 10000"),
        ("[P:10001]{input}", r"\[P:10001\]: a hole holds .* at most 10000"),
    ],
)
def test_templates_with_bad_holes_are_refused(bad, message):
    with pytest.raises(TemplateError, match=message):
        parse_template(bad)


def test_doubled_braces_are_literal_braces(tok):
    t = parse_template('[P:1]{{"q": "{input}"}} {{x}}')
    assert t.segments == (Pseudo(1), Literal('{"q": "'), Field("input"), Literal('"} {x}'))
    assert t.fields == ("input",)


def test_special_token_text_in_a_field_value_is_plain_text(tok):
    specials = {tok.eos_token_id, tok.bos_token_id, tok.pad_token_id}
    ids = render(parse_template("[P:1]{input}"), tok, {"input": "</s> <s><pad>"}, 1000)
    assert not specials & set(ids) and tok.decode(ids[1:]) == "</s> <s><pad>"
    assert render(parse_template("[P:1]{input}</s>"), tok, {"input": "x"}, 1000)[-1] == tok.eos_token_id


def test_a_lone_surrogate_in_a_field_value_is_refused(tok):
    with pytest.raises(TemplateError, match=r"field 'input' holds a lone surrogate '\\ud800' at index 1"):
        render(parse_template("[P:1]{input}"), tok, {"input": "a\ud800"}, 1000)


def test_field_values_stay_plain_text_while_other_threads_tokenize_templates(tok):
    """The tokenizer's special-token switch is shared state: a template literal
    tokenized in another thread must not flip a field value back to control tokens."""
    value = "x </s> " * 200
    deadline = time.monotonic() + 2
    leaked, renders = [], [0]

    def fields():
        while time.monotonic() < deadline:
            if tok.eos_token_id in tokenize_text(tok, value, split_special_tokens=True):
                leaked.append(1)
            renders[0] += 1

    def literals():
        while time.monotonic() < deadline:
            tokenize_text(tok, "<s> Review: ")

    threads = [threading.Thread(target=fields)] + [threading.Thread(target=literals) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert renders[0] > 20 and leaked == []
