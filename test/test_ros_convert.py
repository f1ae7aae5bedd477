"""ros_convert: quaternion order, covariance layout, stamps, transforms, Image/CompressedImage → RGB (no DDS)."""

from __future__ import annotations

import array

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseWithCovarianceStamped, TransformStamped
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CompressedImage, Image

from apr_localizer import geometry, ros_convert
from apr_localizer.imaging import ImageDecodeError

# 90 degrees about z, w-first: (cos 45, 0, 0, sin 45)
S = np.sqrt(0.5)
POSE = np.array([1.0, -2.0, 3.5, S, 0.0, 0.0, S])


def _rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _wire(msg):
    """Round trip through CDR, as a subscriber would receive it (data fields become array.array)."""
    return deserialize_message(serialize_message(msg), type(msg))


# --------------------------------------------------------------------------------------------- time
def test_time_helpers_round_trip_and_copy():
    ns = 1_700_000_123_456_789_012
    t = ros_convert.ns_to_time(ns)
    assert (t.sec, t.nanosec) == (1_700_000_123, 456_789_012)
    assert ros_convert.time_to_ns(t) == ns
    c = ros_convert.time_copy(t)
    assert c == t and c is not t
    with pytest.raises(ValueError, match="negative"):
        ros_convert.ns_to_time(-1)


# --------------------------------------------------------------------------------------------- poses
def test_pose_to_msg_puts_w_last():
    msg = ros_convert.pose_to_msg(POSE)
    assert (msg.position.x, msg.position.y, msg.position.z) == (1.0, -2.0, 3.5)
    o = msg.orientation
    np.testing.assert_allclose([o.x, o.y, o.z, o.w], [0.0, 0.0, S, S], atol=1e-15)
    np.testing.assert_allclose(ros_convert.pose_from_msg(msg), POSE, atol=1e-15)


def test_pose_to_msg_normalises_and_canonicalises():
    p = np.array([0.0, 0.0, 0.0, -2.0, 0.0, -2.0, 0.0])  # non-unit, w < 0
    o = ros_convert.pose_to_msg(p).orientation
    np.testing.assert_allclose([o.x, o.y, o.z, o.w], [0.0, S, 0.0, S], atol=1e-15)


@pytest.mark.parametrize("bad", [np.full(7, np.nan), np.r_[0, 0, np.inf, 1, 0, 0, 0], np.zeros(6)])
def test_pose_to_msg_rejects_non_finite_and_wrong_shape(bad):
    with pytest.raises(ValueError):
        ros_convert.pose_to_msg(bad)


def test_pose_stamped_copies_stamp_and_frame():
    stamp = Time(sec=12, nanosec=34)
    msg = ros_convert.pose_stamped(POSE, "map", stamp)
    stamp.sec = 99  # the message must not share the caller's stamp
    assert msg.header.frame_id == "map"
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (12, 34)
    np.testing.assert_allclose(ros_convert.pose_from_msg(msg.pose), POSE, atol=1e-15)


# --------------------------------------------------------------------------------------------- covariance
def test_covariance_layout_is_row_major_diagonal():
    cov = ros_convert.covariance_from_diagonal([1, 2, 3], [4, 5, 6], scale_by_confidence=False)
    assert cov.shape == (36,)
    np.testing.assert_array_equal(cov[[0, 7, 14, 21, 28, 35]], [1, 2, 3, 4, 5, 6])
    assert np.count_nonzero(cov) == 6
    np.testing.assert_array_equal(cov.reshape(6, 6), np.diag([1, 2, 3, 4, 5, 6]))


def test_covariance_scales_with_inverse_confidence():
    cov = ros_convert.covariance_from_diagonal([0.25] * 3, [0.01] * 3, confidence=0.5)
    np.testing.assert_allclose(cov.reshape(6, 6).diagonal(), [0.5] * 3 + [0.02] * 3)
    floored = ros_convert.covariance_from_diagonal([1.0] * 3, [1.0] * 3, confidence=0.0, min_scale_confidence=0.01)
    np.testing.assert_allclose(floored.reshape(6, 6).diagonal(), [100.0] * 6)
    nan_conf = ros_convert.covariance_from_diagonal([1.0] * 3, [1.0] * 3, confidence=float("nan"))
    assert np.all(np.isfinite(nan_conf))


@pytest.mark.parametrize(
    ("pos", "rot"),
    [
        ([1, 2], [1, 2, 3]),
        ([1, 2, 3], [1, -1, 1]),
        ([np.nan, 1, 1], [1, 1, 1]),
        ([1.8e308, 1, 1], [1, 1, 1]),  # finite, but infinite once divided by a confidence below 1
        ([1, 1, 1], [np.inf, 1, 1]),
    ],
)
def test_covariance_rejects_bad_variances(pos, rot):
    with pytest.raises(ValueError):
        ros_convert.covariance_from_diagonal(pos, rot, confidence=0.5)


def test_pose_with_covariance_stamped_survives_the_wire():
    cov = ros_convert.covariance_from_diagonal([0.1, 0.2, 0.3], [0.4, 0.5, 0.6], confidence=0.8)
    msg = _wire(ros_convert.pose_with_covariance_stamped(POSE, cov, "map", Time(sec=5, nanosec=6)))
    assert isinstance(msg, PoseWithCovarianceStamped)
    assert msg.header.frame_id == "map" and (msg.header.stamp.sec, msg.header.stamp.nanosec) == (5, 6)
    np.testing.assert_allclose(np.asarray(msg.pose.covariance), cov)
    np.testing.assert_allclose(ros_convert.pose_from_msg(msg.pose.pose), POSE, atol=1e-15)
    with pytest.raises(ValueError, match="36"):
        ros_convert.pose_with_covariance_stamped(POSE, np.zeros(35), "map", Time())


# --------------------------------------------------------------------------------------------- transforms
def test_transform_stamped_is_child_pose_in_parent():
    stamp = Time(sec=7, nanosec=8)
    msg = ros_convert.transform_stamped(POSE, "map", "camera_optical", stamp)
    assert isinstance(msg, TransformStamped)
    assert (msg.header.frame_id, msg.child_frame_id) == ("map", "camera_optical")
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (7, 8)
    r = msg.transform.rotation
    np.testing.assert_allclose([r.x, r.y, r.z, r.w], [0.0, 0.0, S, S], atol=1e-15)
    np.testing.assert_allclose(ros_convert.transform_from_msg(msg), POSE, atol=1e-15)
    # the transform maps child coordinates into the parent: the camera's +x axis points along map +y
    m = geometry.pose_to_matrix(ros_convert.transform_from_msg(msg.transform))
    np.testing.assert_allclose(m @ [1.0, 0.0, 0.0, 1.0], [1.0, -1.0, 3.5, 1.0], atol=1e-12)


def test_tf_message_holds_transforms():
    if not ros_convert.HAVE_TF2_MSGS:
        with pytest.raises(RuntimeError, match="tf2_msgs"):
            ros_convert.tf_message([])
        pytest.skip("tf2_msgs is not built into this environment")
    tfs = [ros_convert.transform_stamped(POSE, "map", f"c{i}", Time(sec=i)) for i in range(2)]
    msg = _wire(ros_convert.tf_message(tfs))
    assert [t.child_frame_id for t in msg.transforms] == ["c0", "c1"]


# --------------------------------------------------------------------------------------------- images
def test_rgb8_image_is_a_zero_copy_view_of_the_received_buffer():
    rgb = _rgb()
    msg = _wire(ros_convert.rgb_to_image(rgb, "rgb8", stamp=Time(sec=1), frame_id="cam"))
    assert isinstance(msg.data, array.array)
    out = ros_convert.image_to_rgb(msg)
    np.testing.assert_array_equal(out, rgb)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))


def test_padded_rows_stay_zero_copy():
    rgb = _rgb(10, 6)
    data, step = ros_convert.imaging.encode_raw(rgb, "rgb8", step=6 * 3 + 14)
    msg = Image(height=10, width=6, encoding="rgb8", step=step)
    msg.data = array.array("B", data)
    out = ros_convert.image_to_rgb(msg)
    np.testing.assert_array_equal(out, rgb)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))


@pytest.mark.parametrize("encoding", ["bgr8", "rgba8", "bgra8"])
def test_colour_encodings_decode_exactly(encoding):
    rgb = _rgb(seed=3)
    msg = _wire(ros_convert.rgb_to_image(rgb, encoding))
    assert msg.encoding == encoding
    np.testing.assert_array_equal(ros_convert.msg_to_rgb(msg), rgb)


def test_mono8_decodes_to_grey_rgb():
    rgb = _rgb(seed=4)
    out = ros_convert.image_to_rgb(_wire(ros_convert.rgb_to_image(rgb, "mono8")))
    assert out.shape == rgb.shape
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_reference_frame_round_trips(reference_dir):
    from PIL import Image as PILImage

    rgb = np.asarray(PILImage.open(reference_dir / "raw_images" / "raw_0.png").convert("RGB"))
    msg = _wire(ros_convert.rgb_to_image(rgb, "rgb8"))
    assert (msg.height, msg.width, msg.step) == (480, 640, 1920)
    np.testing.assert_array_equal(ros_convert.image_to_rgb(msg), rgb)
    png = _wire(ros_convert.rgb_to_compressed(rgb, "png", stamp=Time(sec=3), frame_id="cam"))
    assert isinstance(png, CompressedImage) and png.format == "png" and png.header.frame_id == "cam"
    np.testing.assert_array_equal(ros_convert.msg_to_rgb(png), rgb)
    jpeg = _wire(ros_convert.rgb_to_compressed(rgb, "jpeg", quality=95))
    decoded = ros_convert.compressed_to_rgb(jpeg)
    assert decoded.shape == rgb.shape
    assert np.abs(decoded.astype(int) - rgb.astype(int)).mean() < 8.0  # lossy; these frames are texture-heavy


def _raw(encoding="rgb8", width=64, height=48, step=None, data_len=None) -> Image:
    step = width * 3 if step is None else step
    msg = Image(height=height, width=width, encoding=encoding, step=step)
    msg.data = array.array("B", bytes(step * height if data_len is None else data_len))
    return msg


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (_raw(encoding="16UC3"), "not supported"),
        (_raw(data_len=100), "truncated"),
        (_raw(width=0, height=0, step=0), "empty"),
        (_raw(step=10), "step"),
        (_raw(width=8660, height=5774, step=8660 * 3, data_len=16), "megapixels"),  # 50 MP header, no pixels
    ],
    ids=["unknown-encoding", "truncated", "zero-size", "step-smaller-than-width", "50-megapixel"],
)
def test_malformed_images_raise_image_decode_error(msg, match):
    with pytest.raises(ImageDecodeError, match=match):
        ros_convert.msg_to_rgb(msg)


@pytest.mark.parametrize("payload", [b"", b"garbage bytes, not an image", b"\x89PNG\r\n\x1a\n" + bytes(5)])
def test_garbage_compressed_image_raises_image_decode_error(payload):
    msg = CompressedImage(format="jpeg")
    msg.data = array.array("B", payload)
    with pytest.raises(ImageDecodeError):
        ros_convert.msg_to_rgb(msg)


def test_max_pixels_is_honoured():
    msg = _wire(ros_convert.rgb_to_image(_rgb(48, 64), "rgb8"))
    with pytest.raises(ImageDecodeError, match="megapixels"):
        ros_convert.image_to_rgb(msg, max_pixels=64 * 48 - 1)


def test_rgb_to_image_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        ros_convert.rgb_to_image(np.zeros((4, 4), np.uint8))
