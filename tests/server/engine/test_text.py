"""TextStream: after every token its text is exactly what one decode of all the
tokens gives, with stop strings cut where the old full-text search cut them."""

import copy
import random

import pytest
from transformers import AutoTokenizer

from server.engine.request import Request, SamplingParams
from server.engine.text import TextStream, decoder_of

TEXTS = [
    "Hello world",
    " Leading spaces,  double  spaces and a trailing one ",
    "Line one\nline two\n\n\tindented\r\nwindows line",
    "Café, naïve, façade, jalapeño, Ærøskøbing, Zürich",
    "Emoji: 🙂👍🏽 🇫🇷 👨‍👩‍👧 done",
    "日本語のテキストと中文文本，还有한국어.",
    "mixed: x²+y² ≤ π·r², €5 — “quotes” and ‘single’…",
    "def f(x):\n    return {'a': [1, 2]}  # code\n",
]


@pytest.fixture(scope="module", params=["gpt2", "llama", "smollm2"])
def tokenizer(request, tiny_model_dirs):
    if request.param == "smollm2":  # fetched and converted on first use, as `ptserve serve` does
        return AutoTokenizer.from_pretrained(request.getfixturevalue("default_model_dir"))
    return AutoTokenizer.from_pretrained(str(tiny_model_dirs[request.param]))


def sequences(tok) -> list[list[int]]:
    """Token ids of real text, some with special tokens in the middle, and random ids
    (which split characters between tokens and make invalid UTF-8)."""
    specials = [i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None]
    out = []
    for n, text in enumerate(TEXTS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append(ids)
        cut = len(ids) // 2
        out.append(specials[:1] + ids[:cut] + specials[n % len(specials) :] + ids[cut:] + specials[-1:])
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(5):
        out.append([rng.randrange(vocab) for _ in range(60)])
    return out


def test_text_equals_decode_after_every_token(tokenizer):
    for ids in sequences(tokenizer):
        stream = TextStream(tokenizer)
        for n, token in enumerate(ids, 1):
            assert stream.push(token) is False
            expected = tokenizer.decode(ids[:n], skip_special_tokens=True)
            assert stream.text == expected, (ids[:n], stream.text, expected)
            assert expected.startswith(stream.safe_text())
        assert stream.token_ids == ids


def test_a_stream_that_is_not_live_decodes_only_when_read(tokenizer):
    """No stop strings and nobody streaming: pushes decode nothing, and reading
    .text decodes all the tokens once, giving what a live stream gives."""
    for ids in sequences(tokenizer):
        counting = CountingTokenizer(tokenizer)
        stream = TextStream(counting, live=False)
        for token in ids[:-1]:
            assert stream.push(token) is False
        assert counting.sizes == []
        assert stream.text == tokenizer.decode(ids[:-1], skip_special_tokens=True)
        stream.push(ids[-1])
        assert stream.text == stream.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert counting.sizes == [len(ids) - 1, len(ids)]  # one decode per read after a push
    assert TextStream(tokenizer, ("stop",), live=False).live  # stop strings are searched as tokens arrive


def test_multibyte_characters_arrive_in_pieces(tokenizer):
    """The tiny tokenizers know few emoji: an emoji's bytes come in several tokens,
    and until the last, the text ends in \ufffd and safe_text holds it back."""
    ids = tokenizer("ok 👍🏽", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    partial = 0
    for token in ids:
        stream.push(token)
        if stream.text.endswith("\ufffd"):
            partial += 1
            assert "\ufffd" not in stream.safe_text()
    assert stream.text == stream.safe_text() == "ok 👍🏽"
    if len(tokenizer) < 1000:
        assert partial > 0


def run(tok, text: str, stop: tuple[str, ...]) -> tuple[TextStream, int]:
    """Push the tokens of `text` until a stop string appears -> (stream, tokens pushed)."""
    stream = TextStream(tok, stop)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for n, token in enumerate(ids, 1):
        if stream.push(token):
            return stream, n
    return stream, len(ids)


def old_stop(tok, text: str, stop: tuple[str, ...]) -> tuple[str, int]:
    """What RowDecoder.push did: decode everything after each token and cut at the earliest stop."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for n in range(1, len(ids) + 1):
        decoded = tok.decode(ids[:n], skip_special_tokens=True)
        hits = [i for i in (decoded.find(s) for s in stop) if i >= 0]
        if hits:
            return decoded[: min(hits)], n
    return tok.decode(ids, skip_special_tokens=True), len(ids)


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("The answer is: forty-two. END of story", ("END",), "The answer is: forty-two. "),  # across tokens
        ("alpha beta gamma delta", ("delta", "beta", "gamma"), "alpha "),  # the earliest wins, not the first listed
        ("STOP right there", ("STOP",), ""),  # at the very start: empty text
        ("one two three", ("two three", "two"), "one "),  # a prefix of a later stop string
        ("a\n\nb\n\nc", ("\n\n",), "a"),
        ("Zürich 🙂 und Café", ("🙂",), "Zürich "),
        ("no stop here at all", ("xyz", "qq"), "no stop here at all"),
    ],
)
def test_stop_strings(tokenizer, text, stop, expected):
    stream, pushed = run(tokenizer, text, stop)
    assert stream.text == expected
    assert (stream.text, pushed) == old_stop(tokenizer, text, stop)
    assert stream.stopped == (expected != text)
    assert stream.safe_text() == (expected if stream.stopped else expected[: len(expected) - could_begin(text, stop)])


def could_begin(text: str, stop: tuple[str, ...]) -> int:
    """By brute force: the longest end of `text` that is a proper prefix of a stop string."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def test_stop_found_as_early_as_the_old_search(tokenizer):
    """On every text, with stop strings taken from inside it, the stream stops at the
    same token and cuts at the same place as a full decode after each token."""
    for text in TEXTS:
        for start, length in ((0, 1), (3, 4), (len(text) // 2, 2), (len(text) - 3, 3)):
            stop = (text[start : start + length], "\n")
            if not stop[0].strip():
                continue
            stream, pushed = run(tokenizer, text, stop)
            assert (stream.text, pushed) == old_stop(tokenizer, text, stop), stop


def test_a_character_still_arriving_does_not_match_a_stop_string(tokenizer):
    """Until its last byte, an emoji decodes to "\ufffd": a stop string of that
    character must not fire on it, nor cut the text there."""
    ids = tokenizer("ok 👍🏽 ok", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, ("\ufffd",))
    assert [stream.push(token) for token in ids] == [False] * len(ids)
    assert stream.text == tokenizer.decode(ids, skip_special_tokens=True) == "ok 👍🏽 ok"


def test_a_row_that_ends_mid_character_is_searched_whole_at_its_end(tokenizer):
    """push leaves an unfinished character for a later token; when there is none
    (EOS, token limit), finish() searches it, and cuts where one decode of all
    the tokens would have."""
    ids = tokenizer("ok 👍", add_special_tokens=False)["input_ids"][:-1]  # the emoji's last byte never comes
    for stop, want in ((("\ufffd",), "ok "), (("k \ufffd",), "o"), (("zz",), None)):
        stream = TextStream(tokenizer, stop)
        assert [stream.push(token) for token in ids] == [False] * len(ids)
        assert stream.finish() is (want is not None)
        assert stream.text == (want if want is not None else tokenizer.decode(ids, skip_special_tokens=True))
        assert stream.text == tokenizer.decode(ids, skip_special_tokens=True).split(stop[0])[0]


def test_safe_text_holds_back_a_possible_stop(tokenizer):
    stream = TextStream(tokenizer, ("<END>",))
    for token in tokenizer("Hello there <EN", add_special_tokens=False)["input_ids"]:
        assert stream.push(token) is False
    assert stream.text == "Hello there <EN"
    assert stream.safe_text() == "Hello there "  # "<EN" could still begin <END>; the space could not
    rest = tokenizer("D> more", add_special_tokens=False)["input_ids"]
    while not stream.push(rest.pop(0)):
        pass
    assert stream.text == stream.safe_text() == "Hello there "
    with pytest.raises(ValueError):
        stream.push(rest[0])


def test_text_between_is_a_slice_of_the_text_at_every_step(tokenizer):
    """What streaming reads: .text[start:end] for any start <= end, read from the
    settled pieces without joining them all, before and after a stop string."""
    for ids in sequences(tokenizer):
        stream = TextStream(tokenizer, ("zz",))
        for token in ids:
            stopped = stream.push(token)
            text = stream.text
            if not stopped:
                stream._text = None  # as after a push: nothing cached to slice
            assert stream.safe_end() == len(stream.safe_text())
            for start in range(0, len(text) + 1, 3):
                for end in (start, stream.safe_end(), len(text)):
                    if end >= start:
                        assert stream.text_between(start, end) == text[start:end]
            if stopped:
                break


def test_new_text_hands_out_each_safe_character_once(tokenizer):
    """What streaming sends, piece by piece, is safe_text at every step."""
    for ids in sequences(tokenizer):
        request = Request.generate(None, [], SamplingParams(max_new_tokens=len(ids)))
        request.text = TextStream(tokenizer, ("zz",))
        sent = ""
        for token in ids:
            stopped = request.text.push(token)
            sent += request.new_text()
            assert sent == request.text.safe_text()
            if stopped:
                break
        assert request.new_text() == ""


def test_ignore_eos_goes_on_past_eos_up_to_max_new_tokens(tokenizer):
    eos = tokenizer.eos_token_id
    for ignore, expected in ((False, ([5], "stop")), (True, ([5, eos, 5], "length"))):
        request = Request.generate(None, [], SamplingParams(max_new_tokens=3, ignore_eos=ignore))
        request.text = TextStream(tokenizer, ())
        for token in (5, eos, 5):
            if not request.done:
                request.add_token(token, frozenset({eos}))
        assert (request.text.token_ids, request.finish_reason) == expected


def test_only_an_end_that_could_begin_a_stop_string_is_held_back(tokenizer):
    def safe(text, stop):
        stream = TextStream(tokenizer, stop)
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            stream.push(token)
        return stream.safe_text()

    assert safe("Hello world", ("Human:",)) == "Hello world"  # nothing is held for a stop string far away
    assert safe("Hello Hu", ("Human:",)) == "Hello "
    assert safe("Hello Hu", ("Human:", "lo Hum")) == "Hel"  # the longest of the possible starts
    assert safe("ab ab ab", ("ab ab ab ab!",)) == ""  # the whole text could still be its start
    assert safe("ab ab ab", ("b ab ab!", "zz")) == "a"


def test_whatever_streaming_sends_stays_in_the_answer(tokenizer):
    """safe_text at every step is a prefix of the final text, for stop strings
    taken from the text itself (they hit) or never in it."""
    rng = random.Random(5)
    for ids in sequences(tokenizer):
        full = tokenizer.decode(ids, skip_special_tokens=True).replace("\ufffd", "")
        for _ in range(4):
            a = rng.randrange(max(1, len(full)))
            stop = (full[a : a + rng.randrange(1, 12)] or "q", "never there")
            stream, sent = TextStream(tokenizer, stop), []
            for token in ids:
                stopped = stream.push(token)
                sent.append(stream.safe_text())
                if stopped:
                    break
            stream.finish()
            assert all(stream.text.startswith(piece) for piece in sent), (stop, sent[-3:], stream.text)


def test_held_back_is_the_longest_possible_start_and_all_of_it_when_too_costly_to_tell():
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice("ab ") for _ in range(rng.randrange(40)))
        stop = tuple("".join(rng.choice("ab ") for _ in range(rng.randrange(1, 9))) for _ in range(rng.randrange(1, 4)))
        stream = TextStream(Rewriter(), stop)
        assert stream._held(text[max(0, len(text) - stream.hold) :]) == could_begin(text, stop), (text, stop)
    # more places to try than HELD_CANDIDATES, none of them a start: everything it could begin is held
    stream = TextStream(Rewriter(), ("ab" * 100 + "x",))
    assert could_begin("ac" * 100, stream.stop) == 0 and stream._held("ac" * 100) == 200


class Rewriter:
    """A decoder that rewrites text it gave before: once token 25 appears, all the
    text is upper case (as a clean-up step might change earlier spaces)."""

    clean_up_tokenization_spaces = False

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(chr(ord("a") + i % 25) for i in ids)
        return text.upper() if 25 in ids else text


def test_streaming_reads_the_same_text_after_the_decoder_rewrote_what_it_had_settled():
    """The stream falls back to decoding everything; slices and what streaming
    hands out still follow .text (text handed out before the rewrite stays sent)."""
    rng = random.Random(3)
    for _ in range(20):
        ids = [rng.randrange(25) for _ in range(12)] + [25] + [rng.randrange(26) for _ in range(12)]
        stream = TextStream(Rewriter(), ("qq",))
        for token in ids:
            if stream.push(token):
                break
            text = stream.text
            stream._text = None
            for start in range(len(text) + 1):
                assert stream.text_between(start, len(text)) == text[start:]
            assert stream.safe_end() == len(stream.safe_text())


class CountingTokenizer:
    """A tokenizer that records how many tokens each decode call gets."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []
        self.clean_up_tokenization_spaces = tok.clean_up_tokenization_spaces

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kw)


def test_a_plain_fast_tokenizer_is_decoded_by_its_backend(tokenizer):
    """Our tokenizers take the backend's decode (so the tests above check that path
    against tokenizer.decode); anything else keeps its own decode."""
    assert decoder_of(tokenizer).func == tokenizer.backend_tokenizer.decode
    counting = CountingTokenizer(tokenizer)
    assert decoder_of(counting).func == counting.decode

    class Rewriting(type(tokenizer)):  # a subclass with its own decoding
        def _decode(self, token_ids, **kw):
            return super()._decode(token_ids, **kw).upper()

    rewriting = copy.copy(tokenizer)
    rewriting.__class__ = Rewriting
    stream = TextStream(rewriting)
    for token in tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        stream.push(token)
    assert stream.text == "HELLO WORLD"


def test_each_token_decodes_a_short_window(tokenizer):
    """Per token, at most two decodes of a few tokens: not the whole text again."""
    ids = tokenizer(" ".join(TEXTS) * 4, add_special_tokens=False)["input_ids"]
    counting = CountingTokenizer(tokenizer)
    stream = TextStream(counting, ("never-there",))
    for token in ids:
        stream.push(token)
    assert stream.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(counting.sizes) <= 2 * len(ids)
    assert max(counting.sizes) <= 12, max(counting.sizes)
