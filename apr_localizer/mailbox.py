"""A 1-slot "latest item" mailbox between the image callback and the worker thread (ROS-free).

The camera callback only ever stores the newest frame; the worker takes it when it is free. An unprocessed frame that
a newer one replaces is counted as a drop, so nothing queues up beyond one item and the drop count is exact.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["LatestMailbox", "SequenceGaps"]


class LatestMailbox:
    """``put`` replaces an unread item (counted in :attr:`dropped`); ``get`` waits until an item is there."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._has_item = False
        self._closed = False
        self.dropped = 0

    def put(self, item: Any) -> bool:
        """Store ``item`` as the newest one; return True when it replaced an unprocessed item."""
        with self._cond:
            replaced = self._has_item
            if replaced:
                self.dropped += 1
            self._item, self._has_item = item, True
            self._cond.notify()
            return replaced

    def get(self, timeout: float | None = None) -> Any | None:
        """Take the newest item, waiting up to ``timeout`` seconds; None on timeout or when closed and empty."""
        with self._cond:
            if not self._has_item and not self._closed:
                self._cond.wait(timeout)
            if not self._has_item:
                return None
            item, self._item, self._has_item = self._item, None, False
            return item

    def clear(self) -> int:
        """Discard a pending item (counted as a drop); return how many were discarded (0 or 1)."""
        with self._cond:
            n = int(self._has_item)
            self.dropped += n
            self._item, self._has_item = None, False
            return n

    def close(self) -> None:
        """Wake every waiter; later ``get`` calls return at once (with a pending item, if any)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed


class SequenceGaps:
    """Messages a publisher sent that never reached the callback (DDS history overwrites), from sequence numbers.

    Keyed by publisher id; the map is reset when more than ``max_publishers`` have been seen (they come and go).
    """

    def __init__(self, max_publishers: int = 64) -> None:
        self._last: dict[bytes, int] = {}
        self._max = max_publishers

    def lost(self, publisher: bytes, seq: int) -> int:
        """Record ``seq`` from ``publisher``; return how many numbers were skipped since its previous message."""
        last = self._last.get(publisher)
        self._last[publisher] = seq
        if len(self._last) > self._max:
            self._last = {publisher: seq}
        return max(0, seq - last - 1) if last is not None and seq > last else 0
