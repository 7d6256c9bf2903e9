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
