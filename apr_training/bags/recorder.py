"""Record live topics with rclpy: every message with its receipt time, optionally written to a bag.

:class:`TopicRecorder` subscribes to topics, keeps every message with its receipt time (wall clock, taken first thing
in the callback), waits on predicates over what arrived and writes the records to a rosbag2 bag.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import BagWriter
from .player import BagPlayerError, msg_class, msg_type_name

__all__ = ["Recorded", "TopicRecorder"]


@dataclass
class Recorded:
    """One received message: ``receipt_ns`` is the wall clock taken first thing in the callback."""

    topic: str
    receipt_ns: int
    msg: Any  # the message object, or its CDR bytes when recording raw


class TopicRecorder:
    """Subscribe to topics on an rclpy node and keep every message with its receipt time.

    Args:
        node: the rclpy node (its executor must spin, e.g. in a background thread).
        topics: topic → message class or type name (``geometry_msgs/msg/PoseStamped``).
        qos: a QoS profile or depth for every subscription (default reliable, depth 100).
        raw: keep the CDR bytes instead of deserialized messages (cheapest for images; needed for :meth:`write_bag`
            only in the sense that deserialized messages are serialized again).

    """

    def __init__(self, node: Any, topics: Mapping[str, type | str], qos: Any = None, raw: bool = False) -> None:
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

        self.node = node
        self.raw = raw
        self.records: list[Recorded] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.types: dict[str, type] = {}
        self.subscriptions: dict[str, Any] = {}
        if qos is None:
            qos = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
        for topic, kind in topics.items():
            cls = msg_class(kind) if isinstance(kind, str) else kind
            self.types[topic] = cls
            self.subscriptions[topic] = node.create_subscription(cls, topic, self._callback(topic), qos, raw=raw)

    def _callback(self, topic: str) -> Callable[[Any], None]:
        def cb(msg: Any) -> None:
            receipt = time.time_ns()
            with self._cond:
                self.records.append(Recorded(topic, receipt, msg))
                self._cond.notify_all()

        return cb

    def count(self, topic: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.records if topic is None or r.topic == topic)

    def snapshot(self, topic: str | None = None) -> list[Recorded]:
        """Return the records so far (of ``topic`` or all), in receipt order."""
        with self._lock:
            return [r for r in self.records if topic is None or r.topic == topic]

    def messages(self, topic: str) -> list[Any]:
        """Deserialized messages of ``topic`` in receipt order."""
        from rclpy.serialization import deserialize_message

        cls = self.types[topic]
        return [deserialize_message(r.msg, cls) if self.raw else r.msg for r in self.snapshot(topic)]

    def wait_for(self, predicate: Callable[[list[Recorded]], bool], timeout: float) -> bool:
        """Wait until ``predicate(records)`` is true (re-checked on every message); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.records):
                left = deadline - time.monotonic()
                if left <= 0.0:
                    return False
                self._cond.wait(min(left, 0.1))
            return True

    def wait_for_publishers(self, topics: Iterable[str] | None = None, timeout: float = 20.0) -> bool:
        """Wait until every subscription of ``topics`` (default all) has a matched publisher."""
        names = list(self.subscriptions if topics is None else topics)
        deadline = time.monotonic() + timeout
        while any(self.subscriptions[t].get_publisher_count() < 1 for t in names):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        for sub in self.subscriptions.values():
            self.node.destroy_subscription(sub)
        self.subscriptions.clear()

    def write_bag(self, path: str | Path, storage: str = "sqlite3") -> Path:
        """Write the records to a new rosbag2 (``storage`` sqlite3 or mcap) with their receipt times as log times."""
        from rclpy.serialization import serialize_message

        try:
            with BagWriter(path, storage) as writer:
                for r in self.snapshot():
                    data = r.msg if self.raw else serialize_message(r.msg)
                    writer.write_cdr(r.topic, msg_type_name(self.types[r.topic]), bytes(data), r.receipt_ns)
        except (ValueError, FileExistsError) as exc:
            raise BagPlayerError(str(exc)) from None
        return Path(path)
