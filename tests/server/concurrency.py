"""Submitting work from many threads at once, as concurrent HTTP requests do."""

import threading


def submit_from_threads(scheduler, works) -> list:
    """One thread per work, all submitting together; -> the results, in order."""
    futures = [None] * len(works)

    def submit(i):
        futures[i] = scheduler.submit(works[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(works))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [f.result(timeout=60) for f in futures]
