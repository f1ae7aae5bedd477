"""Conversions between ROS 2 messages and apr_localizer's numpy types.

Together with :mod:`apr_localizer.node` this is the only module that imports ROS message types. Poses are numpy
``(7,)`` vectors ``[x, y, z, qw, qx, qy, qz]`` (see :mod:`apr_localizer.geometry`); the ROS ``x, y, z, w`` order is
produced and consumed only through :func:`geometry.quat_to_ros` / :func:`geometry.quat_from_ros`.

Images: rclpy hands ``uint8[]`` fields over as ``array.array('B')`` (one copy out of the middleware, made by rclpy).
:func:`image_to_rgb` wraps that buffer with ``np.frombuffer`` (no copy) and :mod:`apr_localizer.imaging` returns a view
of it for ``rgb8`` (also with row padding); other encodings are converted once.

Covariance (:func:`covariance_from_diagonal`): ``geometry_msgs/PoseWithCovariance.covariance`` is a row-major 6x6
matrix over ``(x, y, z, rot_x, rot_y, rot_z)`` (metres², radians²). The node fills only the diagonal, from the
configured position and orientation variances; with ``scale_by_confidence`` both are divided by the estimate's
confidence (the softmax probability of the chosen scene, floored at ``min_scale_confidence``), so a less certain
scene choice reports a proportionally larger uncertainty.
"""

from __future__ import annotations

import array
from collections.abc import Sequence

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import (
    Point,
    Pose,
    PoseStamped,
    PoseWithCovarianceStamped,
    Quaternion,
    Transform,
    TransformStamped,
    Vector3,
)
from sensor_msgs.msg import CompressedImage, Image

from apr_localizer import geometry, imaging
from apr_localizer.tf_buffer import stamp_to_ns

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "HAVE_TF2_MSGS",
    "compressed_to_rgb",
    "covariance_from_diagonal",
    "image_to_rgb",
    "msg_to_rgb",
    "ns_to_time",
    "pose_from_msg",
    "pose_stamped",
    "pose_to_msg",
    "pose_with_covariance_stamped",
    "rgb_to_compressed",
    "rgb_to_image",
    "time_copy",
    "time_to_ns",
    "tf_message",
    "transform_from_msg",
    "transform_stamped",
    "uint8_array",
]

#: Default upper bound on ``width * height`` of an incoming image (the node exposes it as ``max_image_pixels``).
DEFAULT_MAX_PIXELS = 40_000_000

try:  # tf2_msgs is not on PyPI; it is generated into the venv (ros2_environment.md §6)
    from tf2_msgs.msg import TFMessage

    HAVE_TF2_MSGS = True
except ImportError:  # pragma: no cover - depends on the environment
    TFMessage = None
    HAVE_TF2_MSGS = False


# --------------------------------------------------------------------------------------------- time
time_to_ns = stamp_to_ns  # the one stamp conversion (tf_buffer owns it); re-exported with the message helpers


def ns_to_time(ns: int) -> Time:
    """``builtin_interfaces/Time`` for ``ns`` nanoseconds (non-negative)."""
    if ns < 0:
        raise ValueError(f"a ROS time stamp cannot be negative, got {ns} ns")
    sec, nanosec = divmod(int(ns), 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


def time_copy(stamp: Time) -> Time:
    """Return an independent copy of a ``builtin_interfaces/Time`` (messages must not share stamps)."""
    return Time(sec=stamp.sec, nanosec=stamp.nanosec)


# --------------------------------------------------------------------------------------------- images
def _buffer(data) -> np.ndarray:
    """1-D uint8 view of a message's ``data`` field (``array.array``, bytes, memoryview, or ndarray); no copy."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def image_to_rgb(
    msg: Image, max_pixels: int = DEFAULT_MAX_PIXELS, limits: imaging.ImageLimits | None = None
) -> np.ndarray:
    """``sensor_msgs/Image`` → ``(H, W, 3)`` uint8 RGB; a view of ``msg.data`` for rgb8.

    ``limits`` (default :data:`apr_localizer.imaging.DEFAULT_LIMITS`, with ``max_pixels``) bounds each side, the
    aspect ratio and the pixel count before the data is touched. Raises
    :class:`apr_localizer.imaging.ImageDecodeError` (one sentence) for any malformed message.
    """
    return imaging.decode_raw(
        _buffer(msg.data),
        msg.encoding,
        int(msg.width),
        int(msg.height),
        int(msg.step),
        is_bigendian=bool(msg.is_bigendian),
        max_pixels=max_pixels,
        limits=limits,
    )


def compressed_to_rgb(
    msg: CompressedImage, max_pixels: int = DEFAULT_MAX_PIXELS, limits: imaging.ImageLimits | None = None
) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (jpeg/png) → ``(H, W, 3)`` uint8 RGB.

    The size in the PNG/JPEG header is checked against ``limits`` before decoding. Raises
    :class:`apr_localizer.imaging.ImageDecodeError` for undecodable, corrupt, mislabelled or oversized data.
    """
    return imaging.decode_compressed(_buffer(msg.data), msg.format, max_pixels=max_pixels, limits=limits)


def msg_to_rgb(
    msg: Image | CompressedImage, max_pixels: int = DEFAULT_MAX_PIXELS, limits: imaging.ImageLimits | None = None
) -> np.ndarray:
    """Dispatch on the message type: :func:`image_to_rgb` or :func:`compressed_to_rgb`."""
    if isinstance(msg, CompressedImage):
        return compressed_to_rgb(msg, max_pixels, limits)
    return image_to_rgb(msg, max_pixels, limits)


def uint8_array(data: bytes | bytearray | memoryview) -> array.array:
    """Return ``array.array('B')`` of ``data`` for a ``uint8[]`` field (one C-level copy).

    Assigning plain ``bytes`` to such a field makes rclpy check every element in Python (~50 ms for 900 KB).
    """
    out = array.array("B")
    out.frombytes(data)
    return out


def rgb_to_image(rgb: np.ndarray, encoding: str = "rgb8", stamp: Time | None = None, frame_id: str = "") -> Image:
    """``(H, W, 3)`` uint8 RGB → ``sensor_msgs/Image`` in ``encoding`` (via :func:`imaging.encode_raw`)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got shape {rgb.shape}")
    data, step = imaging.encode_raw(rgb, encoding)
    msg = Image()
    if stamp is not None:
        msg.header.stamp = time_copy(stamp)
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(step)
    msg.data = uint8_array(data)
    return msg


def rgb_to_compressed(
    rgb: np.ndarray, fmt: str = "jpeg", stamp: Time | None = None, frame_id: str = "", quality: int = 90
) -> CompressedImage:
    """``(H, W, 3)`` uint8 RGB → ``sensor_msgs/CompressedImage`` (``fmt`` ``jpeg`` with ``quality``, or ``png``)."""
    msg = CompressedImage()
    if stamp is not None:
        msg.header.stamp = time_copy(stamp)
    msg.header.frame_id = frame_id
    msg.format = fmt
    msg.data = uint8_array(imaging.encode_compressed(np.ascontiguousarray(rgb, dtype=np.uint8), fmt, quality))
    return msg


# --------------------------------------------------------------------------------------------- poses
def _pose7(pose) -> tuple[np.ndarray, np.ndarray]:
    """Split and check a pose ``(7,)`` → (position (3,), unit quaternion (4,) in ROS order x, y, z, w)."""
    p = np.asarray(pose, dtype=np.float64).reshape(-1)
    if p.shape != (7,):
        raise ValueError(f"expected a pose vector [x, y, z, qw, qx, qy, qz] of length 7, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("cannot convert a pose with NaN or inf entries to a ROS message")
    return p[:3], geometry.quat_to_ros(geometry.quat_normalize(p[3:7]))


def pose_to_msg(pose) -> Pose:
    """Pose ``(7,)`` ``[x, y, z, qw, qx, qy, qz]`` → ``geometry_msgs/Pose`` (quaternion normalised, ``w >= 0``)."""
    t, q = _pose7(pose)
    return Pose(
        position=Point(x=float(t[0]), y=float(t[1]), z=float(t[2])),
        orientation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])),
    )


def pose_from_msg(msg: Pose) -> np.ndarray:
    """``geometry_msgs/Pose`` → pose ``(7,)`` ``[x, y, z, qw, qx, qy, qz]`` (as stored, not normalised)."""
    o = msg.orientation
    q = geometry.quat_from_ros([o.x, o.y, o.z, o.w])
    return np.concatenate([[msg.position.x, msg.position.y, msg.position.z], q])


def pose_stamped(pose, frame_id: str, stamp: Time) -> PoseStamped:
    """``geometry_msgs/PoseStamped`` of ``pose`` in ``frame_id`` at ``stamp`` (stamp copied)."""
    msg = PoseStamped(pose=pose_to_msg(pose))
    msg.header.frame_id = frame_id
    msg.header.stamp = time_copy(stamp)
    return msg


def covariance_from_diagonal(
    position_variance: Sequence[float],
    orientation_variance: Sequence[float],
    confidence: float = 1.0,
    scale_by_confidence: bool = True,
    min_scale_confidence: float = 1e-3,
) -> np.ndarray:
    """Row-major 6x6 covariance ``(36,)`` over ``(x, y, z, rot_x, rot_y, rot_z)`` with only the diagonal set.

    ``position_variance`` (m²) and ``orientation_variance`` (rad²) have 3 entries each. With ``scale_by_confidence``
    the diagonal is divided by ``max(confidence, min_scale_confidence)``.
    """
    pv = np.asarray(position_variance, dtype=np.float64).reshape(-1)
    ov = np.asarray(orientation_variance, dtype=np.float64).reshape(-1)
    if pv.shape != (3,) or ov.shape != (3,):
        raise ValueError(f"position and orientation variances need 3 entries each, got {pv.shape[0]} and {ov.shape[0]}")
    diag = np.concatenate([pv, ov])
    if not np.all(np.isfinite(diag)) or np.any(diag < 0):
        raise ValueError("covariance variances must be finite and non-negative")
    if scale_by_confidence:
        c = float(confidence) if np.isfinite(confidence) else 0.0
        with np.errstate(over="ignore"):
            diag = diag / max(c, float(min_scale_confidence))
    if not np.all(np.isfinite(diag)):
        raise ValueError("covariance variances overflow when divided by the confidence; use smaller variances")
    return np.diag(diag).reshape(36)


def pose_with_covariance_stamped(pose, covariance, frame_id: str, stamp: Time) -> PoseWithCovarianceStamped:
    """``geometry_msgs/PoseWithCovarianceStamped`` from a pose ``(7,)`` and a row-major covariance ``(36,)``."""
    cov = np.asarray(covariance, dtype=np.float64).reshape(-1)
    if cov.shape != (36,):
        raise ValueError(f"covariance must have 36 entries (row-major 6x6), got {cov.shape[0]}")
    msg = PoseWithCovarianceStamped()
    msg.header.frame_id = frame_id
    msg.header.stamp = time_copy(stamp)
    msg.pose.pose = pose_to_msg(pose)
    msg.pose.covariance = cov
    return msg


# --------------------------------------------------------------------------------------------- transforms
def transform_stamped(pose, parent_frame: str, child_frame: str, stamp: Time) -> TransformStamped:
    """``geometry_msgs/TransformStamped`` ``parent → child`` whose value is the child's pose in the parent frame."""
    t, q = _pose7(pose)
    msg = TransformStamped(
        child_frame_id=child_frame,
        transform=Transform(
            translation=Vector3(x=float(t[0]), y=float(t[1]), z=float(t[2])),
            rotation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])),
        ),
    )
    msg.header.frame_id = parent_frame
    msg.header.stamp = time_copy(stamp)
    return msg


def transform_from_msg(msg: Transform | TransformStamped) -> np.ndarray:
    """``geometry_msgs/Transform`` (or the transform of a ``TransformStamped``) → pose ``(7,)``."""
    tf = msg.transform if isinstance(msg, TransformStamped) else msg
    r = tf.rotation
    q = geometry.quat_from_ros([r.x, r.y, r.z, r.w])
    return np.concatenate([[tf.translation.x, tf.translation.y, tf.translation.z], q])


def tf_message(transforms: Sequence[TransformStamped]):
    """``tf2_msgs/TFMessage`` holding ``transforms``; raises ``RuntimeError`` when tf2_msgs is not installed."""
    if not HAVE_TF2_MSGS:
        raise RuntimeError(
            "tf2_msgs is not importable: build it into the environment (make venv) or install ROS 2 tf2_msgs"
        )
    return TFMessage(transforms=list(transforms))
