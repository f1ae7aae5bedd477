"""Play a ROS 2 bag into live topics with rclpy and ``rosbags`` (no rosbag2 needed).

``ros2 bag`` is not installable from PyPI, so this replaces ``ros2 bag play`` for the evaluation tools
(``apr-eval-bag live``, ``apr-bench node``) and for users without a full ROS 2 install
(``python -m apr_training.cli.bag_player BAG [--topics ...] [--rate 2] [--clock] [--loop]``).

:class:`BagPlayer` reads the bag through :mod:`apr_training.bags.io` and publishes the **serialized bytes** as recorded
(rclpy publishes CDR buffers directly; the rosbags and rclpy CDR encodings are byte-identical), at the recorded
rate times ``rate``. Options: topic selection and remapping, start offset and duration, looping, ``/clock``
(``rosgraph_msgs/Clock`` on the bag's timeline, for nodes with ``use_sim_time``) and *restamping*: every message that
starts with a ``std_msgs/Header`` gets the wall-clock send time as ``header.stamp`` (patched in the CDR buffer, no
deserialization), messages that shared a recorded stamp (an image and its camera info) share the new one, and the
player logs every (recorded stamp, sent stamp, send time) triple so that a consumer's outputs can be matched back to
the bag.

The process must have a ROS-safe environment first (:func:`apr_training.ros_harness.prepare_ros_environment`).
"""

from __future__ import annotations

import importlib
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import bag_topics, open_bag, typestore

__all__ = [
    "BagPlayer",
    "BagPlayerError",
    "PlayResult",
    "PlayedMessage",
    "cdr_header_stamp_ns",
    "msg_class",
    "msg_type_name",
    "set_cdr_header_stamp",
]

_RESTAMP_MEMORY = 4096  # recorded stamps remembered for sharing a new stamp between messages


class BagPlayerError(RuntimeError):
    """The bag cannot be played or recorded (one sentence naming the bag, topic or option)."""


# --------------------------------------------------------------------------------------------- messages
def msg_class(msgtype: str) -> type:
    """Return the rclpy message class of a ROS 2 type name such as ``sensor_msgs/msg/Image``."""
    parts = msgtype.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3:
        raise BagPlayerError(f"message type {msgtype!r} is not of the form package/msg/Name")
    pkg, kind, name = parts
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError):
        raise BagPlayerError(f"message type {msgtype} is not importable in this Python environment") from None


def msg_type_name(cls: type) -> str:
    """``package/msg/Name`` of an rclpy message class."""
    module = cls.__module__.split(".")
    return f"{module[0]}/{module[1]}/{cls.__name__}"


def _endian(buf: bytes | bytearray | memoryview) -> str | None:
    """``'<'`` or ``'>'`` from the CDR encapsulation header (plain CDR only), None for anything else."""
    if len(buf) < 12 or buf[0] != 0:
        return None
    return {0: ">", 1: "<"}.get(buf[1])


def cdr_header_stamp_ns(buf: bytes | bytearray | memoryview) -> int | None:
    """Return ``header.stamp`` (ns) of a CDR message whose first field is a ``std_msgs/Header`` (None: not CDR)."""
    order = _endian(buf)
    if order is None:
        return None
    sec, nanosec = struct.unpack_from(order + "iI", buf, 4)
    return sec * 1_000_000_000 + nanosec


def set_cdr_header_stamp(buf: bytes | bytearray | memoryview, stamp_ns: int) -> bytearray:
    """Copy of a CDR message (first field ``std_msgs/Header``) with ``header.stamp`` set to ``stamp_ns``."""
    order = _endian(buf)
    if order is None:
        raise BagPlayerError("cannot restamp a message that is not plain CDR (encapsulation CDR_LE or CDR_BE)")
    out = bytearray(buf)
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    struct.pack_into(order + "iI", out, 4, sec, nanosec)
    return out


def _has_header(msgtype: str, store) -> bool:
    try:
        fields = store.fielddefs[msgtype][1]
    except KeyError:
        return False
    return bool(fields) and fields[0][1][1] == "std_msgs/msg/Header"


# --------------------------------------------------------------------------------------------- player
@dataclass
class PlayedMessage:
    """One published message.

    Attributes:
        topic: the topic it was published on (after remapping).
        bag_time_ns: its log time in the bag.
        stamp_ns: its recorded ``header.stamp`` (None for messages without a header).
        sent_stamp_ns: ``header.stamp`` as published (differs from ``stamp_ns`` only when restamping).
        send_time_ns: wall clock (``time.time_ns``) right before ``publish``.
        lateness_ms: how much later than scheduled it was published.
        loop: the pass over the bag (0 unless looping).

    """

    topic: str
    bag_time_ns: int
    stamp_ns: int | None
    sent_stamp_ns: int | None
    send_time_ns: int
    lateness_ms: float
    loop: int = 0


@dataclass
class PlayResult:
    """What :meth:`BagPlayer.play` published."""

    messages: list[PlayedMessage] = field(default_factory=list)
    wall_s: float = 0.0
    bag_span_s: float = 0.0
    loops: int = 0
    interrupted: bool = False

    def count(self, topic: str | None = None) -> int:
        return sum(1 for m in self.messages if topic is None or m.topic == topic)

    def on(self, topic: str) -> list[PlayedMessage]:
        return [m for m in self.messages if m.topic == topic]


class BagPlayer:
    """Publish the messages of a bag on live topics at the recorded rate (times ``rate``) from an rclpy node.

    Args:
        bag: rosbag2 directory (sqlite3 or mcap) or a bare ``.mcap`` file.
        node: the rclpy node that owns the publishers (its executor may spin in another thread).
        topics: bag topics to play (default: all whose types are importable).
        rate: playback speed factor (2.0 = twice as fast).
        start_offset_s: skip this many seconds from the start of the bag.
        duration_s: play at most this many seconds of the bag (after the offset); None = to the end.
        loop: replay the bag until :meth:`stop` (or ``max_loops``).
        max_loops: with ``loop``, stop after this many passes (None = unlimited).
        clock: publish ``rosgraph_msgs/Clock`` on ``/clock`` (bag timeline) every ``clock_period_s``.
        restamp: set ``header.stamp`` of header-bearing messages to the wall-clock send time.
        remap: bag topic → live topic.
        qos_depth: history depth of the (reliable) publishers; ``/tf_static`` is transient-local, depth 1.

    """

    def __init__(
        self,
        bag: str | Path,
        node: Any,
        topics: Sequence[str] | None = None,
        *,
        rate: float = 1.0,
        start_offset_s: float = 0.0,
        duration_s: float | None = None,
        loop: bool = False,
        max_loops: int | None = None,
        clock: bool = False,
        clock_period_s: float = 0.01,
        restamp: bool = False,
        remap: Mapping[str, str] | None = None,
        qos_depth: int = 10,
    ) -> None:
        if not rate > 0.0:
            raise BagPlayerError(f"rate must be > 0, got {rate}")
        if start_offset_s < 0.0:
            raise BagPlayerError(f"start offset must be >= 0 s, got {start_offset_s}")
        if duration_s is not None and duration_s <= 0.0:
            raise BagPlayerError(f"duration must be > 0 s, got {duration_s}")
        self.bag = Path(bag)
        self.node = node
        self.rate = float(rate)
        self.start_offset_s = float(start_offset_s)
        self.duration_s = duration_s
        self.loop = loop
        self.max_loops = max_loops
        self.clock = clock
        self.clock_period_s = float(clock_period_s)
        self.restamp = restamp
        self.remap = dict(remap or {})
        self._stop = threading.Event()
        self._restamped: OrderedDict[int, int] = OrderedDict()
        self._typestore = typestore()

        available = bag_topics(self.bag)
        if topics is None:
            topics = list(available)
        missing = [t for t in topics if t not in available]
        if missing:
            raise BagPlayerError(
                f"bag {self.bag} has no topic {missing[0]}; its topics are: {', '.join(sorted(available)) or 'none'}"
            )
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        self.topics = list(dict.fromkeys(topics))
        self.types = {t: available[t][0] for t in self.topics}
        self.counts = {t: available[t][1] for t in self.topics}
        self._header = {t: _has_header(self.types[t], self._typestore) for t in self.topics}
        self.publishers: dict[str, Any] = {}
        for t in self.topics:
            cls = msg_class(self.types[t])
            live = self.remap.get(t, t)
            if live == "/tf_static":
                qos = QoSProfile(
                    depth=1,
                    history=HistoryPolicy.KEEP_LAST,
                    reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.TRANSIENT_LOCAL,
                )
            else:
                qos = QoSProfile(
                    depth=qos_depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE
                )
            self.publishers[t] = node.create_publisher(cls, live, qos)
        self._clock_pub = None
        if clock:
            from rosgraph_msgs.msg import Clock

            self._clock_pub = node.create_publisher(Clock, "/clock", 10)

    def live_topic(self, topic: str) -> str:
        """Return the live topic that bag ``topic`` is published on."""
        return self.remap.get(topic, topic)

    def wait_for_subscribers(
        self,
        topics: Iterable[str] | None = None,
        count: int = 1,
        timeout: float = 20.0,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        """Wait until every publisher of ``topics`` (bag names; default all) has ``count`` matched subscribers.

        ``alive`` is polled as well: when it returns False the wait ends with an error (e.g. the consumer exited).
        """
        names = list(self.topics if topics is None else topics)
        deadline = time.monotonic() + timeout
        while True:
            waiting = [t for t in names if self.publishers[t].get_subscription_count() < count]
            if not waiting:
                return
            if alive is not None and not alive():
                raise BagPlayerError(f"the subscriber of {self.live_topic(waiting[0])} went away while waiting")
            if time.monotonic() > deadline:
                raise BagPlayerError(
                    f"no subscriber on {', '.join(self.live_topic(t) for t in waiting)} within {timeout:g} s"
                )
            if self._stop.wait(0.02):
                raise BagPlayerError("stopped while waiting for subscribers")

    def stop(self) -> None:
        """Make a running :meth:`play` return after the current message (thread-safe)."""
        self._stop.set()

    def _new_stamp(self, recorded: int, now_ns: int) -> int:
        """Return the new stamp for ``recorded``: ``now_ns`` unless an earlier message already had one."""
        stamp = self._restamped.get(recorded)
        if stamp is None:
            stamp = now_ns
            self._restamped[recorded] = stamp
            if len(self._restamped) > _RESTAMP_MEMORY:
                self._restamped.popitem(last=False)
        return stamp

    def _clock_loop(self, start_wall: float, start_bag_ns: int, done: threading.Event) -> None:
        from rosgraph_msgs.msg import Clock

        from apr_localizer.ros_convert import ns_to_time

        pub = self._clock_pub
        assert pub is not None
        while not done.is_set():
            now_ns = start_bag_ns + int((time.monotonic() - start_wall) * self.rate * 1e9)
            pub.publish(Clock(clock=ns_to_time(max(now_ns, 0))))
            done.wait(self.clock_period_s)

    def play(self, on_publish: Callable[[PlayedMessage], None] | None = None) -> PlayResult:
        """Publish the selected messages at the recorded rate (blocking); return the log of what was sent.

        ``on_publish`` is called after every publish (from this thread). :meth:`stop` ends the playback early.
        """
        result = PlayResult()
        reader = open_bag(self.bag)
        try:
            conns = [c for c in reader.connections if c.topic in self.publishers]
            begin_ns = int(reader.start_time) + int(self.start_offset_s * 1e9)
            end_ns = None if self.duration_s is None else begin_ns + int(self.duration_s * 1e9)
            start_wall = time.monotonic()
            done = threading.Event()
            clock_thread = None
            if self._clock_pub is not None:
                clock_thread = threading.Thread(target=self._clock_loop, args=(start_wall, begin_ns, done), daemon=True)
                clock_thread.start()
            pass_offset = 0.0  # wall seconds of the earlier passes
            loop_index = 0
            last_bag_ns = begin_ns
            try:
                while not self._stop.is_set():
                    pass_start = start_wall + pass_offset
                    n_pass = 0
                    for conn, t_ns, raw in reader.messages(connections=conns, start=begin_ns, stop=end_ns):
                        if self._stop.is_set():
                            break
                        due = pass_start + (t_ns - begin_ns) * 1e-9 / self.rate
                        wait = due - time.monotonic()
                        if wait > 0.0 and self._stop.wait(wait):
                            break
                        topic = conn.topic
                        recorded = sent = None
                        data: bytes | bytearray = raw
                        send_time = time.time_ns()
                        if self._header[topic]:
                            recorded = sent = cdr_header_stamp_ns(raw)
                            if self.restamp and recorded is not None:
                                sent = self._new_stamp(recorded, send_time)
                                data = set_cdr_header_stamp(raw, sent)
                        lateness = (time.monotonic() - due) * 1e3
                        self.publishers[topic].publish(bytes(data))
                        played = PlayedMessage(
                            topic=self.live_topic(topic),
                            bag_time_ns=int(t_ns),
                            stamp_ns=recorded,
                            sent_stamp_ns=sent,
                            send_time_ns=send_time,
                            lateness_ms=lateness,
                            loop=loop_index,
                        )
                        result.messages.append(played)
                        last_bag_ns = max(last_bag_ns, int(t_ns))
                        n_pass += 1
                        if on_publish is not None:
                            on_publish(played)
                    loop_index += 1
                    result.loops = loop_index
                    if not self.loop or n_pass == 0 or (self.max_loops is not None and loop_index >= self.max_loops):
                        break
                    span = ((end_ns if end_ns is not None else int(reader.end_time)) - begin_ns) * 1e-9 / self.rate
                    pass_offset += max(span, 1e-3)
            finally:
                done.set()
                if clock_thread is not None:
                    clock_thread.join(timeout=1.0)
            result.interrupted = self._stop.is_set()
            result.wall_s = time.monotonic() - start_wall
            result.bag_span_s = (last_bag_ns - begin_ns) * 1e-9
        finally:
            reader.close()
        return result
