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

The child runs under SCHED_IDLE at nice 19 (Linux; elsewhere nice 19). It
starts on the first long input and is started again if it dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading

from ptcore.errors import DeadlineExceeded, ServiceUnavailable

log = logging.getLogger(__name__)
PROBES = ("hello there", "  two leading spaces", "<|endoftext|> <s></s> [MASK] <|im_start|>", "Ünïcödé\ttab\nline",
          "😀 emoji", "x" * 300)  # fmt: skip


class TokenizerProcess:
    """Callable as a Hugging Face tokenizer is by `tokenize_text`:
    `tp(text, add_special_tokens=False, split_special_tokens=...)["input_ids"]`."""

    def __init__(self, tokenizer, timeout_s: float):
        """tokenizer: the served one. timeout_s: the longest one encode may take (the request timeout)."""
        from prompt_store.template import tokenize_text

        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._json = backend.to_str() if backend is not None else None
        # what the child must answer for the probes, without and with split_special_tokens
        self._expected = [(text, split, tokenize_text(tokenizer, text, split))
                          for text in PROBES for split in (False, True)]  # fmt: skip
        self.timeout_s = timeout_s
        self._served = tokenizer
        self.usable = self._json is not None  # False: encode in-process, on the served tokenizer
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def __call__(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> dict:
        from prompt_store.template import tokenize_text

        if add_special_tokens:
            raise ValueError("the tokenizer process adds no special tokens")
        with self._lock:
            if self.usable and (self._proc is None or not self._proc.is_alive()):
                self._start()
            if self.usable:
                return {"input_ids": self._encode(text, bool(split_special_tokens))}
        return {"input_ids": tokenize_text(self._served, text, split_special_tokens)}

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of the model's memory
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=_serve, args=(child, self._json), name="ptserve-tokenizer", daemon=True)
        self._proc.start()
        child.close()
        for text, split, ids in self._expected:
            if self._encode(text, split) != ids:
                log.warning("the tokenizer process disagrees with the served tokenizer on %r: long inputs are "
                            "tokenized in-process", text)  # fmt: skip
                self.close()
                self.usable = False
                return
        log.info("tokenizer process %d started (lowest CPU priority)", self._proc.pid)

    def _encode(self, text: str, split: bool) -> list[int]:
        try:
            self._conn.send((text, split))
            if not self._conn.poll(self.timeout_s):
                self.close()  # stuck, or starved of CPU: a new one starts with the next long input
                raise DeadlineExceeded(f"tokenizing the long input took more than {self.timeout_s:g} s")
            ok, value = self._conn.recv()
        except (EOFError, OSError) as e:
            self.close()
            raise ServiceUnavailable(f"the tokenizer process stopped ({type(e).__name__}); try again") from None
        if not ok:
            raise ValueError(value)
        return value

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
            self._conn.close()
        self._proc = self._conn = None


def _serve(conn, tokenizer_json: str) -> None:
    """The child: encode each (text, split_special_tokens) it is sent, until the pipe closes."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # not Linux: nice 19 alone, or normal priority
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
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
