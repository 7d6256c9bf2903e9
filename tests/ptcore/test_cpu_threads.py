"""ptcore/cpu_threads.py: a thread's CPU thread count, once set, stays what
that thread set, whatever another thread sets later; after the model's
thread has chosen its count, a thread that never chose computes on one."""

import threading

import torch

from ptcore import cpu_threads


def on_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(60)
    return out[0]


def test_serial_and_use_pin_each_thread_whatever_another_sets_later():
    serial_set, model_set, check = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def serial_thread():
        cpu_threads.serial()
        serial_set.set()
        assert check.wait(60)
        seen["serial"] = torch.get_num_threads()

    def model_thread():
        assert serial_set.wait(60)
        cpu_threads.use(3)
        model_set.set()
        assert check.wait(60)
        seen["model"] = torch.get_num_threads()

    threads = [threading.Thread(target=serial_thread), threading.Thread(target=model_thread)]
    for t in threads:
        t.start()
    assert model_set.wait(60)
    seen["newcomer"] = on_thread(torch.get_num_threads)
    check.set()
    for t in threads:
        t.join(60)
    assert seen == {"serial": 1, "model": 3, "newcomer": 1}  # a thread that never chose: one


def test_resolve_zero_is_torchs_default_taken_before_any_change():
    assert cpu_threads.resolve(0) == cpu_threads.DEFAULT >= 1
    assert cpu_threads.resolve(5) == 5


def test_on_thread_computes_with_its_count_on_a_thread_that_ends_and_hands_back_errors():
    seen = []

    def work():
        seen.append((threading.current_thread() is not threading.main_thread(), torch.get_num_threads()))
        return "done"

    assert cpu_threads.on_thread(3, work) == "done"
    assert seen == [(True, 3)]
    assert not [t for t in threading.enumerate() if t.name == "cpu-threads-work"]  # it ended

    def fails():
        raise KeyError("no such weight")

    try:
        cpu_threads.on_thread(2, fails)
    except KeyError as e:
        assert e.args == ("no such weight",)
    else:
        raise AssertionError("the error was not handed back")
    try:
        cpu_threads.on_thread(-1, work)  # setting the count itself fails
    except RuntimeError as e:
        assert str(e) == "set_num_threads expects a positive integer"
    else:
        raise AssertionError("the error was not handed back")
    assert len(seen) == 1
    assert on_thread(torch.get_num_threads) == 1  # and a thread that never chose still computes on one
