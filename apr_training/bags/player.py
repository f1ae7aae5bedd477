"""Play a ROS 2 bag into live topics and record topics, with rclpy and ``rosbags`` (no rosbag2 needed).

``ros2 bag`` is not installable from PyPI, so this module replaces ``ros2 bag play`` / ``ros2 bag record`` for the
evaluation tools (``apr-eval-bag live``, ``apr-bench node``) and for users without a full ROS 2 install::

    python -m apr_training.bags.player BAG [--topics /camera/image_raw ...] [--rate 2] [--clock] [--loop]

:class:`BagPlayer` reads the bag with the ``rosbags`` reader and publishes the **serialized bytes** as recorded
(rclpy publishes CDR buffers directly; the rosbags and rclpy CDR encodings are byte-identical), at the recorded
rate times ``rate``. Options: topic selection and remapping, start offset and duration, looping, ``/clock``
(``rosgraph_msgs/Clock`` on the bag's timeline, for nodes with ``use_sim_time``) and *restamping*: every message that
starts with a ``std_msgs/Header`` gets the wall-clock send time as ``header.stamp`` (patched in the CDR buffer, no
deserialization), messages that shared a recorded stamp (an image and its camera info) share the new one, and the
player logs every (recorded stamp, sent stamp, send time) triple so that a consumer's outputs can be matched back to
the bag. :class:`TopicRecorder` subscribes to topics, keeps every message with its receipt time (wall clock, taken
first thing in the callback) and can write them to a bag.

Every process that imports rclpy must run with ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, a private
``ROS_DOMAIN_ID`` and a temporary ``ROS_LOG_DIR``; :func:`prepare_ros_environment` sets what the caller has not set
(call it before importing rclpy). Large images need the shared-memory Fast DDS profile
(``config/fastdds_shm_big.xml``), which it sets as well.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BagPlayer",
    "BagPlayerError",
    "PlayResult",
    "PlayedMessage",
    "Recorded",
    "RosSession",
    "TopicRecorder",
    "bag_topics",
    "header_stamp_ns",
    "main",
    "msg_class",
    "prepare_ros_environment",
    "ros_environment",
    "set_header_stamp",
]

_DOMAIN_RANGE = range(1, 101)  # 0 is everybody's default; ids above 101 can collide with ephemeral ports
_RESTAMP_MEMORY = 4096
_ENV_KEYS = (
    "ROS_AUTOMATIC_DISCOVERY_RANGE",
    "ROS_DOMAIN_ID",
    "ROS_LOG_DIR",
    "FASTDDS_DEFAULT_PROFILES_FILE",
    "AMENT_PREFIX_PATH",
)  # recorded stamps remembered for sharing a new stamp between messages


class BagPlayerError(RuntimeError):
    """The bag cannot be played or recorded (one sentence naming the bag, topic or option)."""


# --------------------------------------------------------------------------------------------- environment
def prepare_ros_environment(
    env: MutableMapping[str, str] | None = None, fastdds_profile: str | Path | None = None
) -> dict[str, str]:
    """Make ``env`` (default ``os.environ``) safe for rclpy; return the variables that were set or replaced.

    * ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` always (any other value would multicast off the machine);
    * ``ROS_DOMAIN_ID``: a random private id in 1..100 when unset or invalid;
    * ``ROS_LOG_DIR``: a new temporary directory when unset;
    * ``FASTDDS_DEFAULT_PROFILES_FILE``: ``fastdds_profile`` or the package's ``config/fastdds_shm_big.xml`` when
      unset (shared-memory transport for full-size images);
    * ``AMENT_PREFIX_PATH``: ``sys.prefix`` when unset (``ament_index_python`` raises without it).

    Call it before ``import rclpy`` in this process; pass a copy of the environment for subprocesses.
    """
    env = os.environ if env is None else env
    changed: dict[str, str] = {}
    if env.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != "LOCALHOST":
        env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = changed["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    domain = env.get("ROS_DOMAIN_ID", "")
    if not (domain.isdigit() and 0 <= int(domain) <= 232):
        env["ROS_DOMAIN_ID"] = changed["ROS_DOMAIN_ID"] = str(random.SystemRandom().choice(_DOMAIN_RANGE))
    if not env.get("ROS_LOG_DIR"):
        env["ROS_LOG_DIR"] = changed["ROS_LOG_DIR"] = tempfile.mkdtemp(prefix="apr_ros_log_")
    if not env.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        profile = Path(fastdds_profile) if fastdds_profile else _default_fastdds_profile()
        if profile is not None and profile.is_file():
            env["FASTDDS_DEFAULT_PROFILES_FILE"] = changed["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)
    if not env.get("AMENT_PREFIX_PATH"):
        env["AMENT_PREFIX_PATH"] = changed["AMENT_PREFIX_PATH"] = sys.prefix
    return changed


@contextlib.contextmanager
def ros_environment(announce: Callable[[str], None] | None = None) -> Iterator[dict[str, str]]:
    """Apply :func:`prepare_ros_environment` to ``os.environ`` for a block; undo it afterwards.

    Yields the variables that were set (each is passed to ``announce`` as ``NAME=value`` first). On exit the
    variables are restored and a ``ROS_LOG_DIR`` created here is removed with its contents.
    """
    before = {k: os.environ.get(k) for k in _ENV_KEYS}
    changes = prepare_ros_environment()
    for name, value in changes.items():
        if announce is not None:
            announce(f"{name}={value}")
    try:
        yield changes
    finally:
        if "ROS_LOG_DIR" in changes:
            shutil.rmtree(changes["ROS_LOG_DIR"], ignore_errors=True)
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _default_fastdds_profile() -> Path | None:
    from apr_localizer.resources import config_path

    try:
        return config_path("fastdds_shm_big.xml")
    except FileNotFoundError:
        return None


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


def header_stamp_ns(buf: bytes | bytearray | memoryview) -> int | None:
    """Return ``header.stamp`` (ns) of a CDR message whose first field is a ``std_msgs/Header`` (None: not CDR)."""
    order = _endian(buf)
    if order is None:
        return None
    sec, nanosec = struct.unpack_from(order + "iI", buf, 4)
    return sec * 1_000_000_000 + nanosec


def set_header_stamp(buf: bytes | bytearray | memoryview, stamp_ns: int) -> bytearray:
    """Copy of a CDR message (first field ``std_msgs/Header``) with ``header.stamp`` set to ``stamp_ns``."""
    order = _endian(buf)
    if order is None:
        raise BagPlayerError("cannot restamp a message that is not plain CDR (encapsulation CDR_LE or CDR_BE)")
    out = bytearray(buf)
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    struct.pack_into(order + "iI", out, 4, sec, nanosec)
    return out


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def _has_header(msgtype: str, typestore) -> bool:
    try:
        fields = typestore.fielddefs[msgtype][1]
    except KeyError:
        return False
    return bool(fields) and fields[0][1][1] == "std_msgs/msg/Header"


def bag_topics(bag: str | Path) -> dict[str, tuple[str, int]]:
    """``{topic: (msgtype, message count)}`` of a rosbag2 directory (sqlite3 or mcap) or a bare ``.mcap`` file."""
    reader = _open_reader(bag)
    try:
        out: dict[str, tuple[str, int]] = {}
        for c in reader.connections:
            msgtype, n = out.get(c.topic, (c.msgtype, 0))
            out[c.topic] = (msgtype, n + int(c.msgcount or 0))
        return out
    finally:
        reader.close()


def _open_reader(bag: str | Path):
    """Return an opened rosbags reader (the caller closes it)."""
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import Reader

    path = Path(bag)
    if not path.exists():
        raise BagPlayerError(f"bag {path} does not exist")
    try:
        reader = Reader(path) if path.is_dir() else AnyReader([path])
        reader.open()
    except Exception as exc:  # rosbags raises several reader error types
        raise BagPlayerError(f"cannot open bag {path}: {exc}") from None
    return reader


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
        self._typestore = _typestore()

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

        while not done.is_set():
            now_ns = start_bag_ns + int((time.monotonic() - start_wall) * self.rate * 1e9)
            self._clock_pub.publish(Clock(clock=ns_to_time(max(now_ns, 0))))
            done.wait(self.clock_period_s)

    def play(self, on_publish: Callable[[PlayedMessage], None] | None = None) -> PlayResult:
        """Publish the selected messages at the recorded rate (blocking); return the log of what was sent.

        ``on_publish`` is called after every publish (from this thread). :meth:`stop` ends the playback early.
        """
        result = PlayResult()
        reader = _open_reader(self.bag)
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
                            recorded = sent = header_stamp_ns(raw)
                            if self.restamp and recorded is not None:
                                sent = self._new_stamp(recorded, send_time)
                                data = set_header_stamp(raw, sent)
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


# --------------------------------------------------------------------------------------------- recorder
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
        from rosbags.rosbag2 import StoragePlugin, Writer

        plugins = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
        if storage not in plugins:
            raise BagPlayerError(f"storage must be one of {sorted(plugins)}, got {storage!r}")
        path = Path(path)
        if path.exists():
            raise BagPlayerError(f"output bag {path} already exists")
        ts = _typestore()
        with Writer(path, version=9, storage_plugin=plugins[storage]) as writer:
            conns = {}
            for topic, cls in self.types.items():
                conns[topic] = writer.add_connection(topic, msg_type_name(cls), typestore=ts)
            for r in self.snapshot():
                data = r.msg if self.raw else serialize_message(r.msg)
                writer.write(conns[r.topic], r.receipt_ns, bytes(data))
        return path


# --------------------------------------------------------------------------------------------- session
class RosSession:
    """A private ``rclpy.Context`` with one node, spun by a ``SingleThreadedExecutor`` in a background thread.

    Call :func:`prepare_ros_environment` first. The domain is ``domain_id`` or ``$ROS_DOMAIN_ID``.
    """

    def __init__(self, name: str, domain_id: int | None = None) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        if os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != "LOCALHOST":
            raise BagPlayerError("ROS_AUTOMATIC_DISCOVERY_RANGE must be LOCALHOST (call prepare_ros_environment first)")
        self.domain_id = int(os.environ.get("ROS_DOMAIN_ID", "0")) if domain_id is None else int(domain_id)
        self.context = Context()
        rclpy.init(context=self.context, domain_id=self.domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name=f"{name}_spin", daemon=True)
        self._thread.start()
        self._closed = False

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            while self.context.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except (ExternalShutdownException, RuntimeError):
            pass

    def close(self) -> None:
        """Shut the context down and release the node (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.context.try_shutdown()
        self._thread.join(timeout=5.0)
        self.executor.shutdown()
        self.node.destroy_node()

    def __enter__(self) -> RosSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- CLI
def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m apr_training.bags.player",
        description="Play a ROS 2 bag (sqlite3 or mcap, read with rosbags) into live topics at the recorded rate, "
        "like `ros2 bag play`, with LOCALHOST-only discovery.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("bag", help="rosbag2 directory or .mcap file")
    p.add_argument("--topics", nargs="+", help="bag topics to play (default: all)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    p.add_argument("--start-offset", type=float, default=0.0, help="skip this many seconds of the bag")
    p.add_argument("--duration", type=float, help="play at most this many seconds of the bag")
    p.add_argument("--loop", action="store_true", help="replay until interrupted")
    p.add_argument("--clock", action="store_true", help="publish /clock on the bag's timeline (use_sim_time)")
    p.add_argument("--restamp", action="store_true", help="stamp header-bearing messages with the send time")
    p.add_argument("--remap", nargs="+", default=[], metavar="FROM:=TO", help="topic remappings")
    p.add_argument("--wait-subscribers", type=float, default=0.0, help="wait up to this long for a subscriber first")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Play a bag from the command line; returns the exit status."""
    args = _build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    remap = {}
    for item in args.remap:
        if ":=" not in item:
            print(f"bag_player: error: remapping {item!r} is not of the form FROM:=TO", file=sys.stderr)
            return 2
        src, dst = item.split(":=", 1)
        remap[src] = dst
    with ros_environment(lambda text: print(f"bag_player: set {text}", file=sys.stderr)):
        session = RosSession("apr_bag_player")
        try:
            player = BagPlayer(
                args.bag,
                session.node,
                args.topics,
                rate=args.rate,
                start_offset_s=args.start_offset,
                duration_s=args.duration,
                loop=args.loop,
                clock=args.clock,
                restamp=args.restamp,
                remap=remap,
            )
            if args.wait_subscribers > 0:
                player.wait_for_subscribers(timeout=args.wait_subscribers)
            result = player.play()
            print(f"bag_player: published {result.count()} messages in {result.wall_s:.2f} s ({result.loops} pass(es))")
            return 0
        except BagPlayerError as exc:
            print(f"bag_player: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        finally:
            session.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
