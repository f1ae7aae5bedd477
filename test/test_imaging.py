"""Sensor image decoding (apr_localizer.imaging): every encoding, padding, zero-copy, compressed images, bad input."""

from __future__ import annotations

import array
import io
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from apr_localizer.imaging import (
    DEFAULT_MAX_PIXELS,
    ENCODINGS,
    ImageDecodeError,
    ImageLimits,
    bytes_per_pixel,
    compressed_image_size,
    decode_compressed,
    decode_raw,
    encode_compressed,
    encode_raw,
)
from apr_localizer.preprocess import preprocess

EXACT = ("rgb8", "bgr8", "rgba8", "bgra8")
YUV = ("yuv422", "uyvy", "yuv422_yuy2", "yuyv")
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Byte-layout tests use 1-row images, which the default limits reject (min_side 2, aspect 8:1).
ANY_SIZE = ImageLimits(min_side=1, max_aspect=1000.0)


def _textured(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Random pixels plus 1-px stripes: every byte position matters, so order/stride bugs show."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    img[::3, :, 0] = 255
    img[:, ::2, 2] = 0
    return img


def _smooth(height: int = 240, width: int = 320) -> np.ndarray:
    """Gradients and a filled disc: a camera-like image for lossy-codec tolerances."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), (xx + yy) * 255 // (width + height - 2)], -1)
    img = np.ascontiguousarray(img.astype(np.uint8))
    cv2.circle(img, (width // 3, height // 2), height // 4, (200, 30, 60), -1)
    return img


@pytest.fixture(scope="module")
def frame(reference_dir) -> np.ndarray:
    """Load a 480x640 reference frame with stripes and checkerboards."""
    return np.asarray(Image.open(reference_dir / "raw_images" / "raw_1.png").convert("RGB"))


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)


# ---------------------------------------------------------------------------------------------- raw encodings


@pytest.mark.parametrize("encoding", EXACT)
def test_colour_encodings_round_trip_exactly(encoding: str) -> None:
    rgb = _textured()
    data, step = encode_raw(rgb, encoding)
    assert step == 64 * bytes_per_pixel(encoding) and len(data) == step * 48
    out = decode_raw(data, encoding, 64, 48, step)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


def test_channel_order_is_taken_from_the_encoding() -> None:
    # One red pixel written by hand in each byte layout must decode to red.
    layouts = {"rgb8": [255, 0, 0], "bgr8": [0, 0, 255], "rgba8": [255, 0, 0, 7], "bgra8": [0, 0, 255, 7]}
    for encoding, px in layouts.items():
        out = decode_raw(bytes(px * 2), encoding, 2, 1, 2 * len(px), limits=ANY_SIZE)
        np.testing.assert_array_equal(out, [[[255, 0, 0], [255, 0, 0]]], err_msg=encoding)


def test_mono8_equals_grey_conversion_of_the_original() -> None:
    rgb = _textured()
    data, step = encode_raw(rgb, "mono8")
    out = decode_raw(data, "mono8", 64, 48, step)
    np.testing.assert_array_equal(out, _grey(rgb))


@pytest.mark.parametrize("big_endian", [False, True])
def test_mono16_keeps_the_high_byte_in_either_byte_order(big_endian: bool) -> None:
    rng = np.random.default_rng(3)
    samples = rng.integers(0, 65536, (5, 6), dtype=np.uint16)
    data = samples.astype(">u2" if big_endian else "<u2").tobytes()
    out = decode_raw(data, "mono16", 6, 5, 12, is_bigendian=big_endian)
    expected = (samples >> 8).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[:, :, None], 3, axis=2))
    # and encode_raw(mono16) decodes to the mono8 result
    rgb = _textured()
    data16, step16 = encode_raw(rgb, "mono16", is_bigendian=big_endian)
    assert step16 == 128
    np.testing.assert_array_equal(decode_raw(data16, "mono16", 64, 48, step16, is_bigendian=big_endian), _grey(rgb))


@pytest.mark.parametrize("encoding", YUV)
def test_yuv422_round_trip_matches_opencv_and_the_original(encoding: str, frame: np.ndarray) -> None:
    rgb = _textured()
    data, step = encode_raw(rgb, encoding)
    assert step == 128
    out = decode_raw(data, encoding, 64, 48, step)
    code = cv2.COLOR_YUV2RGB_UYVY if encoding in ("yuv422", "uyvy") else cv2.COLOR_YUV2RGB_YUY2
    np.testing.assert_array_equal(out, cv2.cvtColor(np.frombuffer(data, np.uint8).reshape(48, 64, 2), code))
    # Pixel pairs with equal colour lose nothing to 4:2:2 subsampling: only rounding remains.
    paired = np.repeat(rgb[:, ::2], 2, axis=1)
    data, step = encode_raw(paired, encoding)
    assert np.abs(decode_raw(data, encoding, 64, 48, step).astype(int) - paired).max() <= 2
    # A real frame (with 1-px colour stripes) gives nearly the same model input.
    data, step = encode_raw(frame, encoding)
    decoded = decode_raw(data, encoding, frame.shape[1], frame.shape[0], step)
    diff = (preprocess(decoded) - preprocess(frame)).abs()
    assert diff.mean().item() < 0.02, diff.mean().item()


@pytest.mark.parametrize(
    ("encoding", "pair"),
    [
        ("yuv422", [90, 82, 240, 82]),
        ("uyvy", [90, 82, 240, 82]),
        ("yuv422_yuy2", [82, 90, 82, 240]),
        ("yuyv", [82, 90, 82, 240]),
    ],
)
def test_yuv422_byte_order(encoding: str, pair: list[int]) -> None:
    # BT.601 limited-range red is Y=82, U=90, V=240: UYVY stores U Y V Y, YUYV stores Y U Y V.
    out = decode_raw(bytes(pair * 2), encoding, 4, 1, 8, limits=ANY_SIZE)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 3, out
    white = decode_raw(
        bytes([128, 235, 128, 235] if encoding in ("yuv422", "uyvy") else [235, 128, 235, 128]),
        encoding,
        2,
        1,
        4,
        limits=ANY_SIZE,
    )
    np.testing.assert_array_equal(white, np.full((1, 2, 3), 255, np.uint8))


@FAST
@given(
    encoding=st.sampled_from(ENCODINGS),
    half_width=st.integers(1, 40),
    height=st.integers(1, 30),
    padding=st.integers(1, 19),
    big_endian=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_row_padding_gives_the_same_image(
    encoding: str, half_width: int, height: int, padding: int, big_endian: bool, seed: int
) -> None:
    width = 2 * half_width
    rgb = _textured(height, width, seed)
    tight, step = encode_raw(rgb, encoding, is_bigendian=big_endian)
    padded, padded_step = encode_raw(rgb, encoding, is_bigendian=big_endian, step=step + padding)
    assert padded_step == step + padding and len(padded) == padded_step * height
    # Garbage (not zeros) in the padding must not leak into the image.
    noisy = bytearray(padded)
    for row in range(height):
        noisy[row * padded_step + step : (row + 1) * padded_step] = b"\xa5" * padding
    expected = decode_raw(tight, encoding, width, height, step, is_bigendian=big_endian, limits=ANY_SIZE)
    got = decode_raw(noisy, encoding, width, height, padded_step, is_bigendian=big_endian, limits=ANY_SIZE)
    np.testing.assert_array_equal(got, expected)
    if encoding in EXACT:
        np.testing.assert_array_equal(got, rgb)


@pytest.mark.parametrize("padding", [0, 5])
@pytest.mark.parametrize("encoding", ["rgb8", "rgba8"])
def test_rgb_and_rgba_are_zero_copy_views(encoding: str, padding: int) -> None:
    rgb = _textured()
    data, step = encode_raw(rgb, encoding, step=64 * bytes_per_pixel(encoding) + padding)
    buf = bytearray(data)
    out = decode_raw(buf, encoding, 64, 48, step)
    assert np.shares_memory(out, np.frombuffer(buf, np.uint8))
    np.testing.assert_array_equal(out, rgb)
    buf[0] ^= 0xFF  # the view follows the message buffer
    assert out[0, 0, 0] == rgb[0, 0, 0] ^ 0xFF
    # From immutable bytes the view is read-only, and preprocessing still accepts it without warnings.
    ro = decode_raw(data, encoding, 64, 48, step)
    assert not ro.flags.writeable and np.shares_memory(ro, np.frombuffer(data, np.uint8))


def test_every_buffer_type_decodes_the_same() -> None:
    rgb = _textured()
    data, step = encode_raw(rgb, "bgr8", step=200)
    buffers = [
        data,
        bytearray(data),
        memoryview(data),
        np.frombuffer(data, np.uint8),
        array.array("B", data),
        np.frombuffer(data, np.uint8).reshape(48, 200),
    ]
    for buf in buffers:
        np.testing.assert_array_equal(decode_raw(buf, "bgr8", 64, 48, 200), rgb, err_msg=type(buf).__name__)
    assert decode_raw(data, "RGB8", 64, 48, 200).shape == (48, 64, 3)  # case-insensitive
    # Extra bytes after step*height are ignored.
    np.testing.assert_array_equal(decode_raw(data + b"\0" * 11, "bgr8", 64, 48, 200), rgb)


# ---------------------------------------------------------------------------------------------- compressed


def test_png_is_exact_and_jpeg_is_close(frame: np.ndarray) -> None:
    png = encode_compressed(frame, "png")
    assert compressed_image_size(png) == ("png", 640, 480)
    np.testing.assert_array_equal(decode_compressed(png, "png"), frame)
    smooth = _smooth()
    jpeg = encode_compressed(smooth, "jpeg", quality=95)
    assert compressed_image_size(jpeg) == ("jpeg", 320, 240)
    for fmt in ("jpeg", "rgb8; jpeg compressed bgr8", ""):
        out = decode_compressed(jpeg, fmt)
        assert out.shape == smooth.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - smooth).mean() < 3
    # Colour order and decoding agree with an independent decoder (PIL) on the stripy frame.
    jpeg = encode_compressed(frame, "jpeg", quality=95)
    pil = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    assert np.abs(decode_compressed(jpeg, "jpeg").astype(int) - pil).mean() < 0.5


def test_grey_16bit_and_alpha_pngs_become_rgb8() -> None:
    rgb = _textured()
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    ok, png = cv2.imencode(".png", grey)
    assert ok
    np.testing.assert_array_equal(decode_compressed(png.tobytes(), "mono8; png compressed mono8"), _grey(rgb))
    deep = np.random.default_rng(5).integers(0, 65536, (20, 30), dtype=np.uint16)
    ok, png16 = cv2.imencode(".png", deep)
    out = decode_compressed(png16.tobytes(), "png")
    np.testing.assert_array_equal(out[:, :, 1], (deep >> 8).astype(np.uint8))
    ok, png_a = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA))
    np.testing.assert_array_equal(decode_compressed(png_a.tobytes(), "png"), rgb)
    # array.array (what rclpy gives for uint8[]) works as input too
    np.testing.assert_array_equal(decode_compressed(array.array("B", png_a.tobytes()), "png"), rgb)


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"encoding": "rgb16"}, "not supported"),
        ({"encoding": "bayer_rggb8"}, "not supported"),
        ({"width": 0}, "empty"),
        ({"height": 0}, "empty"),
        ({"width": -4}, "empty"),
        ({"step": 100}, "step 100 is smaller than width*bytes_per_pixel 192"),
        ({"data": bytes(64 * 3 * 48 - 1)}, "truncated"),
        ({"data": b""}, "truncated"),
        ({"width": 10_000, "height": 5_000, "step": 30_000}, "exceeds the limit"),
        ({"encoding": "yuv422", "width": 63, "step": 126}, "odd"),
        ({"encoding": "yuyv", "width": 63, "step": 126}, "odd"),
        ({"data": [1, 2, 3]}, "not a byte buffer"),
        ({"data": np.array([object()] * 9216)}, "object array"),
        ({"width": "wide"}, "must be integers"),
    ],
)
def test_bad_raw_images_raise_image_decode_error(kwargs: dict, needle: str) -> None:
    args = {"data": bytes(64 * 3 * 48), "encoding": "rgb8", "width": 64, "height": 48, "step": 192} | kwargs
    with pytest.raises(ImageDecodeError) as info:
        decode_raw(**args)
    assert needle in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)


def test_oversized_images_are_rejected_before_looking_at_the_data() -> None:
    # 50 megapixels: rejected on the header fields alone (the data would be 150 MB; we pass 3 bytes).
    with pytest.raises(ImageDecodeError, match="50.0 megapixels"):
        decode_raw(b"abc", "rgb8", 10_000, 5_000, 30_000)
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 0.0"):
        decode_raw(bytes(12), "rgb8", 2, 2, 6, max_pixels=3)
    assert DEFAULT_MAX_PIXELS == 40_000_000
    with pytest.raises(ImageDecodeError, match="50.0 megapixels"):
        decode_compressed(_png_header_only(10_000, 5_000), "png")


@pytest.mark.parametrize(
    ("data", "fmt", "needle"),
    [
        (b"", "jpeg", "neither PNG nor JPEG"),
        (b"definitely not an image", "jpeg", "neither PNG nor JPEG"),
        (b"\x89PNG\r\n\x1a\n", "png", "IHDR"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "jpeg", "start-of-frame"),
        (None, "png", "does not match"),
        (None, "16UC1; compressedDepth", "not supported"),
    ],
)
def test_bad_compressed_images_raise_image_decode_error(data: bytes | None, fmt: str, needle: str) -> None:
    data = encode_compressed(_textured(), "jpeg") if data is None else data
    with pytest.raises(ImageDecodeError, match=needle):
        decode_compressed(data, fmt)


def test_truncated_and_corrupt_compressed_images() -> None:
    rgb = _textured()
    jpeg = encode_compressed(rgb, "jpeg")
    png = encode_compressed(rgb, "png")
    for data in (jpeg[: len(jpeg) // 2], jpeg[:300], png[: len(png) // 2], png[:40], _png_header_only(64, 48)):
        with pytest.raises(ImageDecodeError):
            decode_compressed(data)


@FAST
@given(data=st.binary(min_size=0, max_size=400), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]))
def test_random_compressed_bytes_only_raise_image_decode_error(data: bytes, prefix: bytes) -> None:
    try:
        out = decode_compressed(prefix + data)
    except ImageDecodeError:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


@FAST
@given(
    encoding=st.one_of(st.sampled_from(ENCODINGS), st.text(max_size=8)),
    width=st.integers(-3, 70),
    height=st.integers(-3, 70),
    step=st.integers(-3, 300),
    size=st.integers(0, 5000),
)
def test_random_raw_headers_only_raise_image_decode_error(
    encoding: str, width: int, height: int, step: int, size: int
) -> None:
    try:
        out = decode_raw(bytes(size), encoding, width, height, step)
    except ImageDecodeError:
        return
    assert out.shape == (height, width, 3) and out.dtype == np.uint8


def test_encoders_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        encode_raw(np.zeros((4, 4), np.uint8), "rgb8")
    with pytest.raises(ValueError, match="odd width"):
        encode_raw(np.zeros((4, 5, 3), np.uint8), "uyvy")
    with pytest.raises(ValueError, match="smaller than"):
        encode_raw(np.zeros((4, 4, 3), np.uint8), "rgb8", step=11)
    with pytest.raises(ImageDecodeError, match="not supported"):
        encode_raw(np.zeros((4, 4, 3), np.uint8), "rgb16")
    with pytest.raises(ValueError, match="not supported"):
        encode_compressed(np.zeros((4, 4, 3), np.uint8), "webp")
    with pytest.raises(ValueError, match="quality"):
        encode_compressed(np.zeros((4, 4, 3), np.uint8), "jpeg", quality=0)


def test_decoded_views_feed_preprocessing(frame: np.ndarray) -> None:
    """Zero-copy read-only views (rgba8 is even non-contiguous) give the same model input as the plain array."""
    expected = preprocess(frame)
    for encoding in ("rgb8", "rgba8"):
        data, step = encode_raw(frame, encoding, step=640 * bytes_per_pixel(encoding) + 8)
        view = decode_raw(data, encoding, 640, 480, step)
        assert not view.flags.writeable
        assert torch.equal(preprocess(view), expected)
