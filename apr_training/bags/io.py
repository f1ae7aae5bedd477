"""ROS 2 bag I/O with rosbags (no ROS installation needed): the one way bags are opened, read, converted, written.

* :func:`open_bag` opens sqlite3 and mcap bags (a bag directory, or a single ``.db3`` / ``.mcap`` file);
  :func:`iter_messages` deserialises with the Kilted type store (types a bag defines itself are registered from its
  message definitions); :func:`iter_images` yields decoded images of one topic.
* :func:`image_to_rgb`, :func:`pose_from_msg`, :func:`header_stamp_ns`, :func:`message_stamp_ns` turn messages
  into numpy / nanoseconds.
* :func:`read_tf` fills an :class:`apr_localizer.tf_buffer.TfBuffer` (the one TF buffer) from ``/tf`` and
  ``/tf_static``.
* :class:`BagWriter` and the ``make_*`` message builders write bags; :func:`write_bag` writes a rendered sequence
  of :class:`PosedImage` (images, camera info, ground-truth pose and TF).
* :func:`bag_info` summarises topics, types, type hashes, counts and duration; :func:`bag_topics` and
  :func:`topic_types` are its short forms.

Quaternions: ROS messages are ``x, y, z, w``; everything returned here is w-first (``apr_localizer.geometry``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from apr_localizer.geometry import pose_compose, pose_inverse, quat_from_ros, quat_normalize, quat_to_ros
from apr_localizer.tf_buffer import TfBuffer, stamp_to_ns, transform_msg_pose

__all__ = [
    "IMAGE_MSGTYPES",
    "POSE_MSGTYPES",
    "BagError",
    "BagImage",
    "BagMessage",
    "BagWriter",
    "PosedImage",
    "bag_info",
    "bag_topics",
    "header_stamp_ns",
    "image_to_rgb",
    "iter_images",
    "iter_messages",
    "message_stamp_ns",
    "open_bag",
    "make_camera_info",
    "make_compressed_image",
    "make_header",
    "make_image",
    "make_pose_stamped",
    "make_tf_message",
    "make_transform",
    "ns_to_time",
    "pose_from_msg",
    "read_tf",
    "require_topic",
    "topic_types",
    "typestore",
    "write_bag",
]

IMAGE_MSGTYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
# every message type pose_from_msg reads (ground-truth topics accept a subset: bags.ground_truth.GT_POSE_MSGTYPES)
POSE_MSGTYPES = (
    "geometry_msgs/msg/PoseStamped",
    "geometry_msgs/msg/PoseWithCovarianceStamped",
    "nav_msgs/msg/Odometry",
    "geometry_msgs/msg/TransformStamped",
)
TF_TYPE = "tf2_msgs/msg/TFMessage"


class BagError(RuntimeError):
    """A bag cannot be read or does not hold what was asked for (the message names the bag and the topic)."""


class BagMessage(NamedTuple):
    """One deserialised message: ``(topic, msgtype, t_ns, msg)``; ``t_ns`` is the bag (receive) time."""

    topic: str
    msgtype: str
    t_ns: int
    msg: Any


# ------------------------------------------------------------------------------------------------ type store
@lru_cache(maxsize=1)
def typestore():
    """Return the rosbags type store of ROS 2 Kilted (shared, cached)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def _register_bag_types(ts, connections) -> None:
    """Add message types defined by the bag but missing from the Kilted store (custom messages)."""
    from rosbags.interfaces import MessageDefinitionFormat
    from rosbags.typesys import get_types_from_idl, get_types_from_msg

    add: dict = {}
    for c in connections:
        if c.msgtype in ts.types or not c.msgdef or not c.msgdef.data:
            continue
        if c.msgdef.format == MessageDefinitionFormat.IDL:
            add.update(get_types_from_idl(c.msgdef.data))
        else:
            add.update(get_types_from_msg(c.msgdef.data, c.msgtype))
    if add:
        ts.register(add)


def open_bag(path: str | Path):
    """Open a bag (directory, ``.db3`` or ``.mcap``) with the rosbags reader; the caller closes it."""
    from rosbags.rosbag2 import Reader

    p = Path(path)
    if not p.exists():
        raise BagError(f"bag {p} does not exist")
    try:
        reader = Reader(p)
        reader.open()
    except Exception as exc:  # rosbags raises several types for unreadable bags
        raise BagError(f"bag {p} cannot be opened as a ROS 2 bag (sqlite3 or mcap): {exc}") from exc
    return reader


def topic_types(bag_path: str | Path) -> dict[str, str]:
    """``{topic: msgtype}`` of a bag."""
    reader = open_bag(bag_path)
    try:
        return {c.topic: c.msgtype for c in reader.connections}
    finally:
        reader.close()


def bag_topics(bag_path: str | Path) -> dict[str, tuple[str, int]]:
    """``{topic: (msgtype, message count)}`` of a bag."""
    reader = open_bag(bag_path)
    try:
        out: dict[str, tuple[str, int]] = {}
        for c in reader.connections:
            msgtype, n = out.get(c.topic, (c.msgtype, 0))
            out[c.topic] = (msgtype, n + int(c.msgcount or 0))
        return out
    finally:
        reader.close()


def require_topic(bag_path: str | Path, topic: str, allowed: Sequence[str], what: str) -> str:
    """Return the msgtype of ``topic``; :class:`BagError` naming the topics if it is missing or of another type."""
    types = topic_types(bag_path)
    if topic not in types:
        hint = f" (did you mean {topic}/compressed?)" if f"{topic}/compressed" in types else ""
        listing = ", ".join(f"{t} ({types[t]})" for t in sorted(types)) or "none"
        raise BagError(f"bag {bag_path} has no topic {topic}{hint} for the {what}; topics are: {listing}")
    if types[topic] not in allowed:
        raise BagError(
            f"topic {topic} of bag {bag_path} has type {types[topic]}; the {what} must be {' or '.join(allowed)}"
        )
    return types[topic]


def iter_messages(bag_path: str | Path, topics: Iterable[str] | None = None) -> Iterator[BagMessage]:
    """Deserialised messages of ``topics`` (all when None) in bag-time order.

    Raises :class:`BagError` naming the available topics if a requested topic is not in the bag.
    """
    reader = open_bag(bag_path)
    try:
        conns = reader.connections
        if topics is not None:
            wanted = set(topics)
            have = {c.topic for c in conns}
            missing = sorted(wanted - have)
            if missing:
                raise BagError(
                    f"bag {bag_path} has no topic {', '.join(missing)}; topics are: {', '.join(sorted(have)) or 'none'}"
                )
            conns = [c for c in conns if c.topic in wanted]
            if not conns:  # an empty connection list would mean "everything" to rosbags
                return
        ts = typestore()
        _register_bag_types(ts, conns)
        for conn, t_ns, raw in reader.messages(connections=conns):
            yield BagMessage(conn.topic, conn.msgtype, int(t_ns), ts.deserialize_cdr(raw, conn.msgtype))
    finally:
        reader.close()


def bag_info(path: str | Path) -> dict:
    """Summary: storage, start/end (ns), duration (s), message count and per-topic type, RIHS01 hash and count."""
    p = Path(path)
    reader = open_bag(p)
    try:
        topics: dict[str, dict[str, Any]] = {}
        for c in sorted(reader.connections, key=lambda c: c.topic):
            entry = topics.setdefault(c.topic, {"type": c.msgtype, "hash": c.digest, "count": 0})
            entry["count"] += c.msgcount
        is_mcap = any(p.glob("*.mcap")) if p.is_dir() else p.suffix == ".mcap"
        storage = "mcap" if is_mcap else "sqlite3"
        count = reader.message_count
        return {
            "path": str(p),
            "storage": storage,
            "start_ns": int(reader.start_time) if count else None,
            "end_ns": int(reader.end_time) if count else None,
            "duration_s": reader.duration / 1e9 if count else 0.0,
            "message_count": int(count),
            "topics": topics,
        }
    finally:
        reader.close()


# ------------------------------------------------------------------------------------------------ conversions
def ns_to_time(t_ns: int):
    """Integer nanoseconds → ``builtin_interfaces/msg/Time``."""
    t_ns = int(t_ns)
    if t_ns < 0:
        raise ValueError(f"ROS time must be non-negative, got {t_ns} ns")
    return typestore().types["builtin_interfaces/msg/Time"](sec=t_ns // 1_000_000_000, nanosec=t_ns % 1_000_000_000)


def header_stamp_ns(msg: Any) -> int | None:
    """``msg.header.stamp`` in ns of a deserialised message, or None if the message has no header."""
    header = getattr(msg, "header", None)
    return None if header is None else stamp_to_ns(header.stamp)


def message_stamp_ns(msg: Any, bag_time_ns: int) -> int:
    """Return the stamp a message is matched by: ``header.stamp``, or its bag time when the stamp is zero or absent."""
    stamp = header_stamp_ns(msg)
    return int(stamp) if stamp else int(bag_time_ns)


def image_to_rgb(msg: Any, msgtype: str | None = None) -> np.ndarray:
    """``sensor_msgs/Image`` or ``CompressedImage`` → (H, W, 3) uint8 RGB (via ``apr_localizer.imaging``)."""
    from apr_localizer.imaging import decode_compressed, decode_raw

    msgtype = msgtype or getattr(msg, "__msgtype__", "")
    if msgtype == "sensor_msgs/msg/Image":
        return decode_raw(
            msg.data, msg.encoding, int(msg.width), int(msg.height), int(msg.step), bool(msg.is_bigendian)
        )
    if msgtype == "sensor_msgs/msg/CompressedImage":
        return decode_compressed(msg.data, msg.format)
    raise ValueError(
        f"cannot decode an image from a {msgtype or type(msg).__name__} message; expected one of "
        f"{', '.join(IMAGE_MSGTYPES)}"
    )


@dataclass(frozen=True)
class BagImage:
    """One image read from a bag.

    ``index`` on its topic, matching stamp (:func:`message_stamp_ns`), bag time, (H, W, 3) uint8 RGB (empty when not
    decoded) and the time spent deserialising and decoding it (ms).
    """

    index: int
    stamp_ns: int
    bag_time_ns: int
    rgb: np.ndarray
    decode_ms: float


def iter_images(
    bag_path: str | Path, topic: str, stride: int = 1, limit: int | None = None, decode: bool = True
) -> Iterator[BagImage]:
    """Yield every ``stride``-th image of ``topic`` (``Image`` or ``CompressedImage``) in bag-time order."""
    from apr_localizer.imaging import ImageDecodeError

    msgtype = require_topic(bag_path, topic, IMAGE_MSGTYPES, "images")
    reader = open_bag(bag_path)
    try:
        conns = [c for c in reader.connections if c.topic == topic]
        ts = typestore()
        n_out = 0
        for i, (_, t_ns, raw) in enumerate(reader.messages(connections=conns)):
            if i % stride:
                continue
            if limit is not None and n_out >= limit:
                break
            t0 = time.perf_counter()
            msg = ts.deserialize_cdr(raw, msgtype)
            rgb = np.zeros((0, 0, 3), np.uint8)
            if decode:
                try:
                    rgb = image_to_rgb(msg, msgtype)
                except ImageDecodeError as exc:
                    raise BagError(f"image {i} on {topic} of bag {bag_path}: {exc}") from None
            stamp = message_stamp_ns(msg, int(t_ns))
            yield BagImage(i, stamp, int(t_ns), rgb, (time.perf_counter() - t0) * 1e3)
            n_out += 1
    finally:
        reader.close()


def _pose7(position: Any, orientation: Any) -> np.ndarray:
    q = quat_from_ros([orientation.x, orientation.y, orientation.z, orientation.w])
    return np.concatenate([[position.x, position.y, position.z], quat_normalize(q)])


def pose_from_msg(msg: Any, msgtype: str | None = None) -> np.ndarray:
    """Return the pose ``(7,)`` ``[x, y, z, qw, qx, qy, qz]`` (unit quaternion, w >= 0) of a message.

    Accepts PoseStamped, PoseWithCovarianceStamped, Odometry, TransformStamped, Pose and Transform.
    """
    msgtype = msgtype or getattr(msg, "__msgtype__", "")
    if msgtype == "geometry_msgs/msg/PoseStamped":
        return _pose7(msg.pose.position, msg.pose.orientation)
    if msgtype in ("geometry_msgs/msg/PoseWithCovarianceStamped", "nav_msgs/msg/Odometry"):
        return _pose7(msg.pose.pose.position, msg.pose.pose.orientation)
    if msgtype == "geometry_msgs/msg/TransformStamped":
        return transform_msg_pose(msg.transform)
    if msgtype == "geometry_msgs/msg/Pose":
        return _pose7(msg.position, msg.orientation)
    if msgtype == "geometry_msgs/msg/Transform":
        return transform_msg_pose(msg)
    raise ValueError(
        f"cannot read a pose from a {msgtype or type(msg).__name__} message; expected one of {', '.join(POSE_MSGTYPES)}"
    )


def read_tf(bag_path: str | Path, topics: Sequence[str] = ("/tf", "/tf_static")) -> TfBuffer:
    """Fill a :class:`TfBuffer` from the TF topics present in the bag (``/tf_static`` counts as static)."""
    present = [t for t in topics if t in topic_types(bag_path)]
    if not present:
        raise BagError(f"bag {bag_path} has no TF topic ({', '.join(topics)})")
    buf = TfBuffer()
    for m in iter_messages(bag_path, present):
        if m.msgtype == TF_TYPE:
            buf.add_message(m.msg, static=m.topic.endswith("tf_static"))
    return buf


# ------------------------------------------------------------------------------------------------ builders
def make_header(t_ns: int, frame_id: str):
    """``std_msgs/msg/Header``."""
    return typestore().types["std_msgs/msg/Header"](stamp=ns_to_time(t_ns), frame_id=frame_id)


def make_image(rgb: np.ndarray, t_ns: int, frame_id: str, encoding: str = "rgb8"):
    """``sensor_msgs/msg/Image`` from (H, W, 3) uint8 RGB (encodings of ``apr_localizer.imaging.encode_raw``)."""
    from apr_localizer.imaging import encode_raw

    data, step = encode_raw(np.ascontiguousarray(rgb), encoding)
    return typestore().types["sensor_msgs/msg/Image"](
        header=make_header(t_ns, frame_id),
        height=int(rgb.shape[0]),
        width=int(rgb.shape[1]),
        encoding=encoding,
        is_bigendian=0,
        step=int(step),
        data=np.frombuffer(data, dtype=np.uint8),
    )


def make_compressed_image(rgb: np.ndarray, t_ns: int, frame_id: str, fmt: str = "jpeg", quality: int = 90):
    """``sensor_msgs/msg/CompressedImage`` (jpeg or png) from (H, W, 3) uint8 RGB."""
    from apr_localizer.imaging import encode_compressed

    data = encode_compressed(np.ascontiguousarray(rgb), fmt, quality)
    return typestore().types["sensor_msgs/msg/CompressedImage"](
        header=make_header(t_ns, frame_id), format=fmt, data=np.frombuffer(data, dtype=np.uint8)
    )


def make_camera_info(t_ns: int, frame_id: str, width: int, height: int, fx: float, fy: float, cx: float, cy: float):
    """``sensor_msgs/msg/CameraInfo`` of an undistorted pinhole camera (plumb_bob, zero distortion)."""
    T = typestore().types
    k = np.array([fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0])
    p = np.array([fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0])
    return T["sensor_msgs/msg/CameraInfo"](
        header=make_header(t_ns, frame_id),
        height=int(height),
        width=int(width),
        distortion_model="plumb_bob",
        d=np.zeros(5),
        k=k,
        r=np.eye(3).reshape(-1),
        p=p,
        binning_x=0,
        binning_y=0,
        roi=T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False),
    )


def _ros_pose_parts(pose):
    pose = np.asarray(pose, dtype=np.float64).reshape(7)
    q = quat_to_ros(quat_normalize(pose[3:], canonical=False))
    return pose[:3], q


def make_pose_stamped(pose, t_ns: int, frame_id: str = "map"):
    """``geometry_msgs/msg/PoseStamped`` from a pose ``[x, y, z, qw, qx, qy, qz]``."""
    T = typestore().types
    t, q = _ros_pose_parts(pose)
    return T["geometry_msgs/msg/PoseStamped"](
        header=make_header(t_ns, frame_id),
        pose=T["geometry_msgs/msg/Pose"](
            position=T["geometry_msgs/msg/Point"](x=float(t[0]), y=float(t[1]), z=float(t[2])),
            orientation=T["geometry_msgs/msg/Quaternion"](x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])),
        ),
    )


def make_transform(pose, t_ns: int, parent: str, child: str):
    """``geometry_msgs/msg/TransformStamped`` ``parent <- child`` (the child's pose in the parent frame)."""
    T = typestore().types
    t, q = _ros_pose_parts(pose)
    return T["geometry_msgs/msg/TransformStamped"](
        header=make_header(t_ns, parent),
        child_frame_id=child,
        transform=T["geometry_msgs/msg/Transform"](
            translation=T["geometry_msgs/msg/Vector3"](x=float(t[0]), y=float(t[1]), z=float(t[2])),
            rotation=T["geometry_msgs/msg/Quaternion"](x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])),
        ),
    )


def make_tf_message(transforms: Sequence[Any]):
    """``tf2_msgs/msg/TFMessage`` holding ``transforms`` (TransformStamped messages)."""
    return typestore().types[TF_TYPE](transforms=list(transforms))


# ------------------------------------------------------------------------------------------------ writers
_STORAGES = ("sqlite3", "mcap")


class BagWriter:
    """Context manager around the rosbags ``Writer`` (rosbag2 version 9): connections are created on first use.

    ``write(topic, msg, t_ns)`` serialises ``msg`` (a type-store message) with its own type; ``/tf_static`` is
    offered with transient-local durability so that a player latches it.
    """

    def __init__(self, path: str | Path, storage: str = "sqlite3", overwrite: bool = False):
        from rosbags.rosbag2 import StoragePlugin, Writer

        if storage not in _STORAGES:
            raise ValueError(f"bag storage must be one of {', '.join(_STORAGES)}, got {storage!r}")
        self.path = Path(path)
        if self.path.exists():
            if not overwrite:
                raise FileExistsError(
                    f"bag {self.path} already exists; pass overwrite=True (--overwrite) to replace it"
                )
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        plugin = StoragePlugin.SQLITE3 if storage == "sqlite3" else StoragePlugin.MCAP
        self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        self._conns: dict[tuple[str, str], Any] = {}
        self.counts: dict[str, int] = {}

    def __enter__(self) -> BagWriter:
        self._writer.open()
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()

    def _connection(self, topic: str, msgtype: str):
        key = (topic, msgtype)
        if key not in self._conns:
            qos = _latched_qos() if topic.endswith("tf_static") else ()
            self._conns[key] = self._writer.add_connection(
                topic, msgtype, typestore=typestore(), offered_qos_profiles=qos
            )
        return self._conns[key]

    def write(self, topic: str, msg: Any, t_ns: int) -> None:
        """Serialise and write ``msg`` on ``topic`` at bag time ``t_ns``."""
        msgtype = msg.__msgtype__
        self.write_cdr(topic, msgtype, typestore().serialize_cdr(msg, msgtype), t_ns)

    def write_cdr(self, topic: str, msgtype: str, data: bytes, t_ns: int) -> None:
        """Write an already serialised (CDR) ``msgtype`` message on ``topic`` at bag time ``t_ns``."""
        self._writer.write(self._connection(topic, msgtype), int(t_ns), bytes(data))
        self.counts[topic] = self.counts.get(topic, 0) + 1


def _latched_qos():
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(0, 0)
    return [
        Qos(
            QosHistory.KEEP_LAST,
            1,
            QosReliability.RELIABLE,
            QosDurability.TRANSIENT_LOCAL,
            zero,
            zero,
            QosLiveliness.AUTOMATIC,
            zero,
            False,
        )
    ]


@dataclass(frozen=True)
class PosedImage:
    """One image to write: bag/header stamp (ns), (H, W, 3) uint8 RGB and its camera-to-map pose (7,) or None."""

    stamp_ns: int
    rgb: np.ndarray
    pose: np.ndarray | None = None


@dataclass(frozen=True)
class _ImageTopics:
    """The per-image messages :func:`write_bag` writes (a topic of None is not written)."""

    raw_topic: str | None
    compressed_topic: str | None
    camera_info_topic: str | None
    camera_frame: str
    encoding: str
    jpeg_quality: int
    intrinsics: Any

    def messages(self, rgb: np.ndarray, t_ns: int) -> Iterator[tuple[str, Any]]:
        """``(topic, message)`` of one image: raw, then compressed, then camera info."""
        if self.raw_topic:
            yield self.raw_topic, make_image(rgb, t_ns, self.camera_frame, self.encoding)
        if self.compressed_topic:
            yield self.compressed_topic, make_compressed_image(rgb, t_ns, self.camera_frame, "jpeg", self.jpeg_quality)
        if self.camera_info_topic:
            h, w = rgb.shape[:2]
            k = self.intrinsics
            yield self.camera_info_topic, make_camera_info(t_ns, self.camera_frame, w, h, k.fx, k.fy, k.cx, k.cy)


@dataclass(frozen=True)
class _TfTopics:
    """The TF messages :func:`write_bag` writes for ``mode`` camera (``map -> camera``) or chain."""

    mode: str
    map_frame: str
    camera_frame: str
    odom_frame: str
    base_frame: str
    base_to_camera: np.ndarray
    map_to_odom: np.ndarray

    def static(self, t_ns: int):
        """``/tf_static`` of the chain: ``map -> odom`` and ``base_link -> camera``."""
        return make_tf_message(
            [
                make_transform(self.map_to_odom, t_ns, self.map_frame, self.odom_frame),
                make_transform(self.base_to_camera, t_ns, self.base_frame, self.camera_frame),
            ]
        )

    def dynamic(self, t_ns: int, pose: np.ndarray):
        """``/tf`` at ``t_ns`` for the camera pose ``pose`` (``odom -> base_link`` for the chain)."""
        if self.mode == "camera":
            return make_tf_message([make_transform(pose, t_ns, self.map_frame, self.camera_frame)])
        # odom <- base = (map <- odom)^-1 (map <- camera) (base <- camera)^-1
        odom_base = pose_compose(pose_compose(pose_inverse(self.map_to_odom), pose), pose_inverse(self.base_to_camera))
        return make_tf_message([make_transform(odom_base, t_ns, self.odom_frame, self.base_frame)])


def _check_write_options(tf: str | None, raw: bool, compressed: bool) -> None:
    if tf not in (None, "camera", "chain"):
        raise ValueError(f"tf must be None, 'camera' or 'chain', got {tf!r}")
    if not raw and not compressed:
        raise ValueError("write_bag needs raw=True or compressed=True: no image topic would be written")


def write_bag(
    out_path: str | Path,
    frames: Iterable[PosedImage],
    storage: str = "sqlite3",
    image_topic: str = "/camera/image_raw",
    compressed: bool = False,
    *,
    raw: bool = True,
    encoding: str = "rgb8",
    jpeg_quality: int = 90,
    compressed_topic: str | None = None,
    camera_info_topic: str | None = "/camera/camera_info",
    intrinsics: Any = None,
    pose_topic: str | None = "/ground_truth/pose",
    tf: str | None = "camera",
    tf_poses: Iterable[tuple[int, np.ndarray]] | None = None,
    map_frame: str = "map",
    camera_frame: str = "camera_optical",
    odom_frame: str = "odom",
    base_frame: str = "base_link",
    base_to_camera=(0.1, 0.0, 0.3, 0.5, -0.5, 0.5, -0.5),
    map_to_odom=(0.3, -0.2, 0.0, 1.0, 0.0, 0.0, 0.0),
    overwrite: bool = False,
) -> dict:
    """Write rendered frames (with known poses) into a rosbag2 bag; returns :func:`bag_info` of the result.

    Topics: ``image_topic`` (``sensor_msgs/Image``, ``encoding``; ``raw=False`` skips it), with ``compressed`` a
    ``sensor_msgs/CompressedImage`` (jpeg) on ``compressed_topic`` (default ``<image_topic>/compressed``),
    ``camera_info_topic`` (``CameraInfo``, needs ``intrinsics`` with fx, fy, cx, cy), ``pose_topic``
    (``geometry_msgs/PoseStamped`` of the camera in ``map_frame``) and TF:

    * ``tf="camera"``: ``/tf`` ``map_frame -> camera_frame``;
    * ``tf="chain"``: ``/tf_static`` ``map -> odom`` (``map_to_odom``) and ``base_link -> camera``
      (``base_to_camera``), ``/tf`` ``odom -> base_link`` so that the chain composes to the camera pose;
    * ``tf=None``: no TF.

    TF is stamped with the image stamps unless ``tf_poses`` gives its own ``(t_ns, camera pose)`` samples (e.g. at a
    different rate). All header stamps equal the bag time of the message.
    """
    _check_write_options(tf, raw, compressed)
    if intrinsics is None:
        camera_info_topic = None
    compressed_topic = compressed_topic or f"{image_topic}/compressed"
    base_to_camera = np.asarray(base_to_camera, dtype=np.float64)
    map_to_odom = np.asarray(map_to_odom, dtype=np.float64)
    tf_list = None if tf_poses is None else [(int(t), np.asarray(p, dtype=np.float64)) for t, p in tf_poses]

    images = _ImageTopics(
        image_topic if raw else None,
        compressed_topic if compressed else None,
        camera_info_topic,
        camera_frame,
        encoding,
        jpeg_quality,
        intrinsics,
    )

    tf_out = _TfTopics(tf or "", map_frame, camera_frame, odom_frame, base_frame, base_to_camera, map_to_odom)
    tf_msg = tf_out.dynamic

    with BagWriter(out_path, storage, overwrite=overwrite) as bw:
        first = True
        tf_i = 0
        for fr in frames:
            t = int(fr.stamp_ns)
            if first and tf == "chain":
                bw.write("/tf_static", tf_out.static(t), t)
            first = False
            if tf_list is not None and tf is not None:  # TF samples up to this image, in time order
                while tf_i < len(tf_list) and tf_list[tf_i][0] <= t:
                    bw.write("/tf", tf_msg(*tf_list[tf_i]), tf_list[tf_i][0])
                    tf_i += 1
            for topic, msg in images.messages(fr.rgb, t):
                bw.write(topic, msg, t)
            if fr.pose is not None:
                if pose_topic:
                    bw.write(pose_topic, make_pose_stamped(fr.pose, t, map_frame), t)
                if tf is not None and tf_list is None:
                    bw.write("/tf", tf_msg(t, np.asarray(fr.pose, dtype=np.float64)), t)
        if tf_list is not None and tf is not None:
            for t_ns, pose in tf_list[tf_i:]:
                bw.write("/tf", tf_msg(t_ns, pose), t_ns)
    return bag_info(out_path)
