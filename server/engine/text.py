"""A generating row's text, decoded a few tokens at a time, and its stop strings.

Decoding all of a row's tokens after each new one costs O(n) per token. Here each
token decodes only a short window: the tokens of the last piece of text already
settled ("prefix") and those after it. The text of the window past the prefix's own
text is new; it is settled once it does not end in "\ufffd" (the bytes of a UTF-8
character still arriving), and the window then moves on. This is the prefix/read
offset scheme of TGI's `decode_token`; it keeps the window's first token in both
decodes, so decoders that treat a sequence's first token specially (SentencePiece's
leading space) give the same text as one decode of everything.

Not `tokenizers.decoders.DecodeStream`: it gives the same text for our byte-level
tokenizers, but says nothing about tokens whose character is not complete yet (so
`.text` could not equal decode() after them), and needs a fast tokenizer.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from functools import partial

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

HELD_CANDIDATES = 64  # see TextStream._held


def decoder_of(tokenizer) -> Callable[[list[int]], str]:
    """ids -> tokenizer.decode(ids, skip_special_tokens=True).

    For a Rust-backed tokenizer whose class keeps transformers' own decode, and
    that cleans up no spaces, that decode is exactly its backend's: called
    directly, it skips per-call input conversion that costs more than the
    decoding itself (2-3 us of ~3 us per call; a stream decodes twice per token
    of every running row, between two decode steps)."""
    cls = type(tokenizer)
    # `_decode` is transformers' private API: if it goes, this takes the public
    # decode (slower, same text), and test_a_plain_fast_tokenizer_is_decoded_by_its_backend
    # (tests/server/engine/test_text.py) fails, saying the fast path is lost
    private = getattr(PreTrainedTokenizerFast, "_decode", None)
    plain = (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and private is not None
        and getattr(cls, "_decode", None) is private
        and cls.decode is PreTrainedTokenizerBase.decode
        and not tokenizer.clean_up_tokenization_spaces
    )
    decode = tokenizer.backend_tokenizer.decode if plain else tokenizer.decode
    return partial(decode, skip_special_tokens=True)


class TextStream:
    """The text of one row's generated tokens, with its stop strings.

    After every push, `.text` equals tokenizer.decode(token_ids, skip_special_tokens=True),
    until a stop string appears: then it ends just before the earliest one.

    live: keep the text current as tokens arrive, for streaming (`safe_text`);
    a stream with stop strings is always live. A stream that is not only
    collects token ids, and decodes them once when `.text` is read: the answer
    of a request that nobody reads before it ends costs no decoding per token."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), live: bool = True):
        self._decode = decoder_of(tokenizer)
        self.live = live or bool(stop)
        self.stop = stop
        self.hold = max(map(len, stop), default=1) - 1  # the most characters that could begin a stop string
        self.token_ids: list[int] = []
        self.stopped = False
        # A decoder that rewrites text across tokens (transformers' clean_up_tokenization_spaces
        # turns " ." into "." wherever the space came from) has no incremental form: such a
        # stream never settles anything, so each push decodes all its tokens, as before.
        self._incremental = not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._settled: list[str] = []  # pieces of text that later tokens cannot change
        self._ends: list[int] = []  # where each settled piece ends in .text
        self._tail = ""  # the last `hold` settled characters: where a stop string may begin
        self._pending = ""  # text after the settled part; may still change
        self._prefix = 0  # token_ids[_prefix:_read] decode to the last settled piece
        self._read = 0
        self._prefix_text: str | None = ""  # their decode, None until needed
        self._text: str | None = ""  # .text, cached

    @property
    def _settled_len(self) -> int:
        return self._ends[-1] if self._ends else 0

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = "".join(self._settled) + self._pending if self.live else self._decode(self.token_ids)
        return self._text

    def push(self, token_id: int) -> bool:
        """Append one generated token that is not EOS. -> True when a stop string now
        appears (.text is then cut just before the earliest one; push no more)."""
        if self.stopped:
            raise ValueError("this stream already met a stop string")
        self.token_ids.append(token_id)
        if not self.live:
            self._text = None
            return False
        before = self._settled_len  # text up to here is settled: unchanged by this token
        tail = self._tail
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.token_ids[self._prefix : self._read])
        window = self._decode(self.token_ids[self._prefix :])
        if not window.startswith(self._prefix_text):  # the decoder rewrote settled text: decode everything
            self._incremental = False
            self._settled, self._ends, self._tail, self._prefix, self._read = [], [], "", 0, 0
            self._prefix_text, window = "", self._decode(self.token_ids)
            before, tail = 0, ""
        new = window[len(self._prefix_text) :]
        self._text = None
        if self._incremental and new and not new.endswith("\ufffd"):
            self._settled.append(new)
            self._ends.append(self._settled_len + len(new))
            self._tail = (self._tail + new)[-self.hold :] if self.hold else ""
            self._pending = ""
            self._prefix, self._read, self._prefix_text = self._read, len(self.token_ids), None
        else:
            self._pending = new
        if not self.stop:
            return False
        # a stop string that ends in the new text starts at most `hold` characters before it;
        # a character still arriving ("\ufffd" at the end) is not text yet: searched once it
        # is, or by finish() if the row ends first
        return self._cut((tail + new).rstrip("\ufffd"), before - len(tail))

    def finish(self) -> bool:
        """The row ended (EOS or its token limit): search the unsettled text whole,
        an unfinished character at its end included, as push leaves that for a
        later token. -> True when a stop string appears (.text is then cut)."""
        if self.stopped or not self.stop or not self._pending:
            return False
        return self._cut(self._tail + self._pending, self._settled_len - len(self._tail))

    def _cut(self, changed: str, start: int) -> bool:
        """Cut .text just before the earliest stop string in `changed`, the text
        from position `start` on. -> whether there was one."""
        hits = [i for i in (changed.find(s) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self._text = self.text[: start + min(hits)]
        self.stopped = True
        return True

    def safe_text(self) -> str:
        """The prefix of .text that later tokens can neither change nor cut off:
        what streaming may send."""
        return self.text[: self.safe_end()]

    def safe_end(self) -> int:
        """Where safe_text ends: .text less the end of a character still arriving
        ("\ufffd") and the end that could be the start of a stop string."""
        if self.stopped:
            return len(self.text)
        if not self.live:
            text = self.text.rstrip("\ufffd")
            return len(text) - self._held(text[max(0, len(text) - self.hold) :])
        pending = self._pending.rstrip("\ufffd")  # a settled piece never ends in "\ufffd": only the pending text can
        tail = self._tail + pending
        tail = tail[max(0, len(tail) - self.hold) :]
        return self._settled_len + len(pending) - self._held(tail)

    def _held(self, tail: str) -> int:
        """How many characters at the end of `tail` (the text's last `hold`) could
        begin a stop string: the longest suffix that is a proper prefix of one.
        Each stop string tries at most HELD_CANDIDATES places its first character
        occurs; past that it holds back all it could begin (always safe)."""
        held = 0
        for stop in self.stop:
            reach = min(len(stop) - 1, len(tail))
            i = tail.find(stop[0], len(tail) - reach)
            for _ in range(HELD_CANDIDATES):
                if i < 0 or len(tail) - i <= held:
                    break
                if stop.startswith(tail[i:]):  # the earliest match is the longest suffix
                    held = len(tail) - i
                    break
                i = tail.find(stop[0], i + 1)
            else:
                held = max(held, reach)
        return held

    def text_between(self, start: int, end: int) -> str:
        """.text[start:end], without joining the settled text before `start`: a
        streaming row reads its new text after every token, and joining all of
        it each time would cost as much as its answer is long."""
        if self._text is not None or self.stopped or not self.live:
            return self.text[start:end]
        i = bisect_right(self._ends, start)  # the first settled piece that ends after start
        begin = self._ends[i - 1] if i else 0
        return ("".join(self._settled[i:]) + self._pending)[start - begin : end - begin]
