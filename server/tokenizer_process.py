"""Long inputs are tokenized in a process of their own, at the lowest CPU priority.

Why: tokenizing a long input (65,536 emoji are 196,608 tokens, about 0.1 s of a
core) competes with the model's threads for the cores, and ordinary requests
then wait (bench/long_input_flood.py: 10x their latency). At the lowest
priority it only takes cores the model leaves idle. A thread of the server's
own process cannot safely run at that priority: whenever it runs Python it
holds the GIL, and preempted there it makes every other thread wait (a priority
inversion: seconds, under load). A process shares no GIL and no lock with the
server, so its priority costs the server nothing.

The child loads the same tokenizer from its JSON (the Rust `tokenizers.Tokenizer`
behind a fast Hugging Face tokenizer) and encodes as prompt_store/template.py's
`tokenize_text` does. When it starts, it must agree with the served tokenizer on
probe texts; a tokenizer without a Rust one, or one that disagrees, is not used:
the caller tokenizes in-process instead (`usable` is False).

The child starts on the first long input, answers the probes at normal
priority, then lowers itself to SCHED_IDLE at nice 19 (Linux; elsewhere nice
19). An exchange (sending the text, reading the ids) that takes longer than
the request timeout kills it (504); it is started again with the next long
input, and after a failed start (it died, or did not answer the probes in
START_TIMEOUT_S) long inputs are tokenized in-process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading

from ptcore.errors import DeadlineExceeded, ServiceUnavailable

log = logging.getLogger(__name__)
# probe texts: special-token strings, whitespace, non-ASCII, and one longer than any truncation a
# tokenizer.json may carry (the child must never cut an input short)
PROBES = ("hello there", "  two leading spaces", "<|endoftext|> <s></s> [MASK] <|im_start|>", "Ünïcödé\ttab\nline",
          "😀 emoji", "x" * 300, "word " * 5000)  # fmt: skip
START_TIMEOUT_S = 60.0  # for the child to start and answer the probes (at normal priority)


class TokenizerProcess:
    """Callable as a Hugging Face tokenizer is by `tokenize_text`:
    `tp(text, add_special_tokens=False, split_special_tokens=...)["input_ids"]`.
    One caller at a time (the long lane); `close` may come from another thread."""

    def __init__(self, tokenizer, timeout_s: float):
        """tokenizer: the served one. timeout_s: the longest one encode may take (the request timeout).
        Nothing is computed here (a server that never sees a long input pays nothing): the tokenizer's
        JSON and the probes' expected ids are made when the child first starts."""
        self.timeout_s = timeout_s
        self._served = tokenizer
        self.usable = getattr(tokenizer, "backend_tokenizer", None) is not None  # False: encode in-process
        self._json: str | None = None  # the Rust tokenizer, for the child
        self._expected: list | None = None  # (text, split_special_tokens, ids) the child must reproduce
        self._calls = threading.Lock()  # one caller at a time
        self._state = threading.Lock()  # the child and its pipe change hands under this (held briefly)
        self._proc = None
        self._conn = None
        self._closed = False

    def __call__(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> dict:
        from prompt_store.template import tokenize_text

        if add_special_tokens:
            raise ValueError("the tokenizer process adds no special tokens")
        with self._calls:
            if self.usable:
                proc, conn = self._running()
                if proc is not None:
                    return {"input_ids": self._exchange(proc, conn, (text, bool(split_special_tokens)), self.timeout_s)}
        return {"input_ids": tokenize_text(self._served, text, split_special_tokens)}

    def _running(self):
        """The child and its pipe, started (and checked on the probes) if need be; (None, None) when
        the child cannot be used: long inputs are then tokenized in-process."""
        with self._state:
            if self._closed:
                raise ServiceUnavailable("server is shutting down")
            if self._proc is not None and self._proc.is_alive():
                return self._proc, self._conn
        from prompt_store.template import tokenize_text

        if self._json is None:
            self._json = self._served.backend_tokenizer.to_str()
        if self._expected is None:  # without and with split_special_tokens
            self._expected = [(text, split, tokenize_text(self._served, text, split))
                              for text in PROBES for split in (False, True)]  # fmt: skip
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of the model's memory
        conn, child = context.Pipe()
        proc = context.Process(target=_serve, args=(child, self._json, len(self._expected)), daemon=True,
                               name="ptserve-tokenizer")  # fmt: skip
        proc.start()
        child.close()
        with self._state:
            self._proc, self._conn = proc, conn
        try:
            for text, split, ids in self._expected:
                if self._exchange(proc, conn, (text, split), START_TIMEOUT_S) != ids:
                    raise ValueError(f"it encodes {text[:40]!r} otherwise")
        except Exception as e:
            log.warning("the tokenizer process is not used (%s): long inputs are tokenized in-process", e)
            self.usable = False
            self._kill(proc)
            return None, None
        log.info("tokenizer process %d started (lowest CPU priority once started)", proc.pid)
        return proc, conn

    def _exchange(self, proc, conn, message, timeout_s: float):
        """Send `message`, read the answer; past `timeout_s` (sending and reading alike) the
        child is killed (stuck, or starved of CPU) and a new one starts with the next call."""
        expired = threading.Event()

        def expire():
            expired.set()
            self._kill(proc)

        timer = threading.Timer(timeout_s, expire)
        timer.start()
        try:
            conn.send(message)
            ok, value = conn.recv()
        except (EOFError, OSError) as e:
            self._kill(proc)
            if expired.is_set():
                raise DeadlineExceeded(f"tokenizing the long input took more than {timeout_s:g} s") from None
            if self._closed:
                raise ServiceUnavailable("server is shutting down") from None
            raise ServiceUnavailable(f"the tokenizer process stopped ({type(e).__name__}); try again") from None
        finally:
            timer.cancel()
        if not ok:
            raise ValueError(value)
        return value

    def _kill(self, proc) -> None:
        """Stop `proc` (if it is still the child): its pipe then reads as closed."""
        with self._state:
            if proc is not self._proc:
                return
            self._proc, conn = None, self._conn
            self._conn = None
        proc.kill()
        proc.join()
        conn.close()

    def close(self) -> None:
        """From any thread: stop the child; a call in progress gets 503, later ones too."""
        with self._state:
            self._closed = True
            proc = self._proc
        if proc is not None:
            self._kill(proc)


def _serve(conn, tokenizer_json: str, probes: int) -> None:
    """The child: encode each (text, split_special_tokens) it is sent, until the pipe closes. It
    answers the parent's `probes` first at normal priority, then lowers its own."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()  # a tokenizer.json may carry truncation or padding: tokenize_text uses neither
    tokenizer.no_padding()
    answered = 0
    while True:
        try:
            text, split = conn.recv()
        except EOFError:
            return
        try:
            tokenizer.encode_special_tokens = split
            conn.send((True, tokenizer.encode(text, add_special_tokens=False).ids))
        except Exception as e:  # reported to the caller; the child goes on
            conn.send((False, f"{type(e).__name__}: {e}"))
        answered += 1
        if answered == probes:
            _lowest_priority()


def _lowest_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # not Linux: nice 19 alone, or normal priority
