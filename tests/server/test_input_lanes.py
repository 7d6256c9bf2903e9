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
    tp._expected[0] = (tp._expected[0][0], tp._expected[0][1], [-1])  # as if the child encoded differently
    try:
        assert tokenize_text(tp, "hello there", True) == tokenize_text(loaded.tokenizer, "hello there", True)
        assert not tp.usable and tp._proc is None
    finally:
        tp.close()
