"""LatestMailbox: one slot, replacements counted as drops, bounded waits, close wakes waiters."""

from __future__ import annotations

import threading

from apr_localizer.mailbox import LatestMailbox


def test_put_replaces_and_counts_drops():
    box = LatestMailbox()
    assert box.put(1) is False
    assert box.put(2) is True and box.put(3) is True
    assert box.dropped == 2
    assert box.get(timeout=0.0) == 3
    assert box.get(timeout=0.0) is None


def test_clear_counts_a_pending_item_and_close_wakes_a_waiter():
    box = LatestMailbox()
    box.put("x")
    assert box.clear() == 1 and box.clear() == 0 and box.dropped == 1
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(box.get(timeout=30.0)))
    waiter.start()
    box.close()
    waiter.join(timeout=10.0)
    assert not waiter.is_alive() and got == [None] and box.closed


def test_get_hands_over_an_item_put_from_another_thread():
    box = LatestMailbox()
    threading.Timer(0.05, box.put, args=("frame",)).start()
    assert box.get(timeout=30.0) == "frame"
