"""The generate batch's row bookkeeping (the loop that drives it is tested in
tests/server/test_scheduler.py with a scripted backend)."""

from server.engine.batch import order_after_removing


def test_a_freed_row_is_taken_by_the_last_row():
    assert order_after_removing(5, [1]) == [0, 4, 2, 3]
    assert order_after_removing(5, [1, 4]) == [0, 3, 2]
    assert order_after_removing(3, [0, 1, 2]) == []
    assert order_after_removing(4, [3]) == [0, 1, 2]
