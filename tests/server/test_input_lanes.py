"""The long-input lane's tokenizer: a process of its own at the lowest CPU
priority (server/tokenizer_process.py), which encodes exactly as the served
tokenizer does, and comes back when it dies."""

import os
import signal

import pytest

from prompt_store.template import tokenize_text
from server.tokenizer_process import TokenizerProcess

TEXTS = ["hello there", "<|endoftext|> and <s> </s>", "😀" * 300, "Ünïcödé\ttabs\nnewlines", " x", "", "a " * 3000]


@pytest.fixture
def process(loaded):
    tp = TokenizerProcess(loaded.tokenizer, timeout_s=60)
    yield tp
    tp.close()


def test_it_encodes_as_the_served_tokenizer(loaded, process):
    for text in TEXTS:
        for split in (False, True):
            assert tokenize_text(process, text, split) == tokenize_text(loaded.tokenizer, text, split), (text, split)
    assert process.usable


def test_it_runs_at_the_lowest_priority_and_restarts_when_it_dies(process):
    tokenize_text(process, "start it", True)
    pid = process._proc.pid
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE and os.getpriority(os.PRIO_PROCESS, pid) == 19
    os.kill(pid, signal.SIGKILL)
    process._proc.join()
    assert tokenize_text(process, "hello there", True) == tokenize_text(process._served, "hello there", True)
    assert process._proc.pid != pid


def test_a_tokenizer_it_cannot_reproduce_is_used_in_process(loaded):
    tp = TokenizerProcess(loaded.tokenizer, timeout_s=60)
    tp._expected = [("hello there", False, [-1])]  # as if the child encoded differently
    try:
        assert tokenize_text(tp, "hello there", True) == tokenize_text(loaded.tokenizer, "hello there", True)
        assert not tp.usable and tp._proc is None
    finally:
        tp.close()


def test_truncation_in_the_tokenizer_json_never_cuts_an_input_short(gpt2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_dir))
    tokenizer.backend_tokenizer.enable_truncation(max_length=16)  # as a tokenizer.json with "truncation" loads
    tp = TokenizerProcess(tokenizer, timeout_s=60)
    try:
        ids = tokenize_text(tp, "word " * 100, True)
        assert len(ids) > 16 and ids == tokenize_text(tokenizer, "word " * 100, True) and tp.usable
    finally:
        tp.close()


def test_a_child_that_cannot_start_leaves_the_tokenizing_in_process(loaded):
    tp = TokenizerProcess(loaded.tokenizer, timeout_s=60)
    tp._json = "not a tokenizer"  # the child fails to load it and exits
    try:
        assert tokenize_text(tp, "hello there", True) == tokenize_text(loaded.tokenizer, "hello there", True)
        assert not tp.usable
    finally:
        tp.close()


def test_an_encode_past_the_timeout_is_a_504_and_the_next_call_starts_a_new_child(loaded):
    from ptcore.errors import DeadlineExceeded

    tp = TokenizerProcess(loaded.tokenizer, timeout_s=60)
    try:
        tokenize_text(tp, "start it", True)
        first = tp._proc.pid
        tp.timeout_s = 0.001
        with pytest.raises(DeadlineExceeded, match="took more than 0.001 s"):
            tokenize_text(tp, "x" * 2_000_000, True)
        tp.timeout_s = 60
        assert tokenize_text(tp, "hello there", True) == tokenize_text(loaded.tokenizer, "hello there", True)
        assert tp._proc.pid != first and tp.usable
    finally:
        tp.close()


def test_after_close_a_call_is_a_503(loaded):
    from ptcore.errors import ServiceUnavailable

    tp = TokenizerProcess(loaded.tokenizer, timeout_s=60)
    tokenize_text(tp, "start it", True)
    tp.close()
    with pytest.raises(ServiceUnavailable, match="server is shutting down"):
        tokenize_text(tp, "hello", True)
