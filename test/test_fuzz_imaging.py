"""The image fuzz campaign as tests: hostile sizes and bytes for apr_localizer.imaging and apr_localizer.preprocess.

Properties (hypothesis): whatever the header fields, bytes or array shape, decoding and preprocessing either succeed
with a result inside the documented limits or raise the documented error (:class:`ImageDecodeError`, or
:class:`ImageSizeError` for sizes), and never allocate more than 100 MB (tracemalloc peak, which sees Python and NumPy
buffers, OpenCV's results included). The must-show cases of issue 12 are measured as peak RSS growth in a fresh
process, which sees every allocation.

``APR_FUZZ_EXAMPLES`` sets the number of examples per property (default 40; ``make fuzz`` uses more).
"""

from __future__ import annotations

import io
import os
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import cv2
import numpy as np
import pytest
from fuzz_support import jpeg_with_size, measure_in_subprocess, record, tiny_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from apr_localizer.imaging import (
    DEFAULT_LIMITS,
    ENCODINGS,
    ImageDecodeError,
    ImageLimits,
    ImageSizeError,
    compressed_image_size,
    decode_compressed,
    decode_raw,
    encode_compressed,
)
from apr_localizer.preprocess import PREPROCESS_LIMITS, PreprocessConfig, check_input_size, crop_geometry, preprocess

EXAMPLES = int(os.environ.get("APR_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
MEMORY_BOUND = 100 * 1024 * 1024


@contextmanager
def bounded_memory(limit: int = MEMORY_BOUND) -> Iterator[None]:
    """Fail when the traced peak allocation inside the block exceeds ``limit`` bytes."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak traced allocation {peak / 1e6:.1f} MB"


def _only(errors: tuple[type[BaseException], ...], fn: Callable[[], Any]) -> Any:
    """Run ``fn``; return its result, or None when it raised one of ``errors`` (anything else propagates)."""
    try:
        return fn()
    except errors as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "\x1b" not in msg and len(msg) < 400, msg
        return None


def _within(limits: ImageLimits, width: int, height: int) -> bool:
    try:
        limits.check(width, height)
    except ImageSizeError:
        return False
    return True


# ------------------------------------------------------------------------------------------- must-show sizes
def test_issue_12_sizes_are_rejected_with_bounded_memory() -> None:
    """20000x1 Image, a 1x40,000,000 header and a ~140-byte 1x1,000,000 PNG: ImageSizeError, < 100 MB peak growth."""
    out = measure_in_subprocess(
        """
        cases = {
            "raw_20000x1": lambda: decode_raw(bytes(60_000), "rgb8", 20_000, 1, 60_000),
            "raw_1x40M_header": lambda: decode_raw(bytes(16), "rgb8", 1, 40_000_000, 3),
            "raw_40Mx1_header": lambda: decode_raw(bytes(16), "mono8", 40_000_000, 1, 40_000_000),
            "png_1x1M_tiny": lambda: decode_compressed(PNG, "png"),
            "png_1Mx1_tiny": lambda: decode_compressed(PNG_WIDE, "png"),
            "jpeg_1x65535_header": lambda: decode_compressed(JPEG_TALL, "jpeg"),
            "preprocess_20000x1": lambda: preprocess(np.zeros((1, 20_000, 3), np.uint8)),
            "preprocess_1x40M_view": lambda: preprocess(np.broadcast_to(np.zeros((1, 1, 3), np.uint8),
                                                                        (40_000_000, 1, 3))),
        }
        result["png_bytes"] = len(PNG)
        for name, fn in cases.items():
            try:
                fn()
                result[name] = "accepted"
            except ImageSizeError as exc:
                result[name] = "ImageSizeError"
            except BaseException as exc:
                result[name] = type(exc).__name__ + ": " + str(exc)[:200]
        """,
        setup="""
        import numpy as np
        from fuzz_support import tiny_png, jpeg_with_size
        from apr_localizer.imaging import ImageSizeError, decode_compressed, decode_raw, encode_compressed
        from apr_localizer.preprocess import preprocess
        PNG = tiny_png(1, 1_000_000)
        PNG_WIDE = tiny_png(1_000_000, 1)
        JPEG_TALL = jpeg_with_size(encode_compressed(np.zeros((16, 16, 3), np.uint8), "jpeg"), 1, 65535)
        """,
    )
    res = out["result"]
    record("issue 12 sizes (imaging/preprocess)", peak_rss_growth_mb=out["growth_mb"], results=dict(res))
    assert res.pop("png_bytes") < 160
    assert res == dict.fromkeys(res, "ImageSizeError"), res
    assert out["growth_mb"] < 100, out


def test_preprocess_bounds_follow_the_crop() -> None:
    cfg = PreprocessConfig(resize=256, crop=224)
    check_input_size(28, 28 * 8, cfg)  # ceil(224 / 8) = 28 and exactly 8:1 are fine
    with pytest.raises(ImageSizeError, match="at least 28 pixels"):
        check_input_size(27, 100, cfg)
    with pytest.raises(ImageSizeError, match="aspect ratio"):
        check_input_size(100, 801, cfg)
    with pytest.raises(ImageSizeError, match="aspect ratio"):
        preprocess(np.zeros((30, 250, 3), np.uint8), cfg)
    # limits are configurable per call
    loose = ImageLimits(min_side=1, max_aspect=20.0)
    assert preprocess(np.zeros((30, 250, 3), np.uint8), cfg, limits=loose).shape == (1, 3, 224, 224)


# ------------------------------------------------------------------------------------------- properties: raw
@FUZZ
@given(
    encoding=st.one_of(st.sampled_from(ENCODINGS), st.text(max_size=70)),
    width=st.one_of(st.integers(-5, 80), st.integers(0, 2**32)),
    height=st.one_of(st.integers(-5, 80), st.integers(0, 2**32)),
    step=st.one_of(st.integers(-5, 400), st.integers(0, 2**40)),
    size=st.integers(0, 20_000),
    big_endian=st.booleans(),
)
def test_any_raw_header_decodes_in_limits_or_raises_image_decode_error(
    encoding: str, width: int, height: int, step: int, size: int, big_endian: bool
) -> None:
    with bounded_memory():
        out = _only((ImageDecodeError,), lambda: decode_raw(bytes(size), encoding, width, height, step, big_endian))
    if out is not None:
        assert out.shape == (height, width, 3) and out.dtype == np.uint8
        assert _within(DEFAULT_LIMITS, width, height)


# ------------------------------------------------------------------------------------------- properties: bytes
def _pil_jpeg(rgb: np.ndarray, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _textured(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


_BASE = _textured(40, 56, 0)
SEEDS = {
    "jpeg": encode_compressed(_BASE, "jpeg"),
    "jpeg_progressive": _pil_jpeg(_BASE, progressive=True, optimize=True),
    "jpeg_restart": cv2.imencode(".jpg", _BASE, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])[1].tobytes(),
    "png": encode_compressed(_BASE, "png"),
    "png_grey16": cv2.imencode(".png", (_BASE[..., 0].astype(np.uint16) * 257))[1].tobytes(),
}
FORMATS = st.one_of(
    st.sampled_from(["", "jpeg", "png", "jpg", "tiff", "bmp", "rgb8; jpeg compressed bgr8", "16UC1; compressedDepth"]),
    st.text(max_size=100),
)


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Apply byte-level mutations: (kind, position, value) with kinds flip/set/insert/delete/truncate/dup."""
    out = bytearray(data)
    for kind, pos, value in ops:
        if not out:
            break
        i = pos % len(out)
        if kind == 0:
            out[i] ^= 1 << (value % 8)
        elif kind == 1:
            out[i] = value % 256
        elif kind == 2:
            out[i:i] = bytes([value % 256]) * (1 + value % 7)
        elif kind == 3:
            del out[i : i + 1 + value % 64]
        elif kind == 4:
            del out[i:]
        else:
            out[i:i] = out[max(i - 1 - value % 200, 0) : i]
    return bytes(out)


@FUZZ
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]), fmt=FORMATS)
def test_arbitrary_bytes_only_raise_image_decode_error(data: bytes, prefix: bytes, fmt: str) -> None:
    with bounded_memory():
        out = _only((ImageDecodeError,), lambda: decode_compressed(prefix + data, fmt))
    if out is not None:
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


@FUZZ
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    ops=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 10**6), st.integers(0, 10**6)), max_size=4),
    size=st.one_of(st.none(), st.tuples(st.integers(0, 70_000), st.integers(0, 70_000))),
    fmt=FORMATS,
)
def test_mutated_png_and_jpeg_decode_in_limits_or_raise_image_decode_error(
    seed: str, ops: list[tuple[int, int, int]], size: tuple[int, int] | None, fmt: str
) -> None:
    data = SEEDS[seed]
    if size is not None:
        data = tiny_png(*size) if seed.startswith("png") else jpeg_with_size(data, min(size[0], 65535),
                                                                             min(size[1], 65535))  # fmt: skip
    data = _mutate(data, ops)
    with bounded_memory():
        out = _only((ImageDecodeError,), lambda: decode_compressed(data, fmt))
    if out is not None:
        _, width, height = compressed_image_size(data)
        assert out.shape == (height, width, 3) and out.dtype == np.uint8
        assert _within(DEFAULT_LIMITS, width, height)


@FUZZ
@given(
    h=st.integers(2, 96),
    w=st.integers(2, 96),
    seed=st.integers(0, 2**16),
    quality=st.integers(1, 100),
    progressive=st.booleans(),
    optimize=st.booleans(),
    subsampling=st.sampled_from([0, 1, 2]),
    flat=st.booleans(),
)
def test_valid_jpegs_are_never_rejected_as_corrupt(
    h: int, w: int, seed: int, quality: int, progressive: bool, optimize: bool, subsampling: int, flat: bool
) -> None:
    """The scan-completeness probe must not reject real encoder output (flat images included)."""
    if not _within(DEFAULT_LIMITS, w, h):
        return
    rgb = np.full((h, w, 3), seed % 256, np.uint8) if flat else _textured(h, w, seed)
    data = _pil_jpeg(rgb, quality=quality, progressive=progressive, optimize=optimize, subsampling=subsampling)
    out = decode_compressed(data, "jpeg")
    assert out.shape == (h, w, 3)


@FUZZ
@given(keep=st.floats(0.05, 0.97), seed=st.sampled_from(["jpeg", "jpeg_progressive", "jpeg_restart"]))
def test_truncated_jpegs_with_an_end_marker_are_rejected(keep: float, seed: str) -> None:
    data = SEEDS[seed]
    cut = data[: max(int(len(data) * keep), 4)]
    with pytest.raises(ImageDecodeError):
        decode_compressed(cut + b"\xff\xd9", "jpeg")


def test_format_must_name_the_codec_of_the_data() -> None:
    png, jpeg = SEEDS["png"], SEEDS["jpeg"]
    for fmt, data in (("tiff", png), ("bmp", jpeg), ("png", jpeg), ("jpeg", png), ("rgb8; jpeg compressed bgr8", png)):
        with pytest.raises(ImageDecodeError, match="does not match its data"):
            decode_compressed(data, fmt)
    for fmt in ("bgr8", "garbage", "png" + " " * 300):
        with pytest.raises(ImageDecodeError, match="names no codec"):
            decode_compressed(png, fmt)
    for fmt, data in (("", png), ("png", png), ("rgb8; jpeg compressed bgr8", jpeg), ("JPG", jpeg)):
        assert decode_compressed(data, fmt).shape == (40, 56, 3)
    with pytest.raises(ImageDecodeError) as info:
        decode_compressed(png, "tiff\x1b[31m" + "x" * 70_000)
    assert "\x1b" not in str(info.value) and len(str(info.value)) < 400


def test_false_size_header_and_one_pixel_images_are_rejected() -> None:
    with pytest.raises(ImageDecodeError, match="corrupt JPEG"):
        decode_compressed(jpeg_with_size(SEEDS["jpeg"], 112, 80), "jpeg")  # declares twice the size
    with pytest.raises(ImageDecodeError, match="restart markers"):  # restart intervals: the count must fit the size
        decode_compressed(jpeg_with_size(SEEDS["jpeg_restart"], 28, 20), "jpeg")  # declares half the size
    with pytest.raises(ImageDecodeError):  # 112x80 declared, rows of a 56x40 image in the data
        decode_compressed(tiny_png(112, 80, payload=bytes(169 * 40)), "png")
    one = np.zeros((1, 1, 3), np.uint8)
    for data in (encode_compressed(one, "png"), encode_compressed(one, "jpeg")):
        with pytest.raises(ImageSizeError, match="1x1"):
            decode_compressed(data)
    with pytest.raises(ImageSizeError, match="1x1"):
        decode_raw(bytes(3), "rgb8", 1, 1, 3)
    with pytest.raises(ImageDecodeError) as info:
        decode_raw(bytes(3), "\x1b[2J" + "e" * 65536, 1, 1, 3)
    assert "\x1b" not in str(info.value) and len(str(info.value)) < 400


# ------------------------------------------------------------------------------------------- properties: preprocess
@FUZZ
@given(
    height=st.one_of(st.integers(1, 600), st.integers(1, 50_000_000)),
    width=st.one_of(st.integers(1, 600), st.integers(1, 50_000_000)),
    crop=st.sampled_from([32, 64, 224]),
    extra=st.integers(0, 64),
)
def test_preprocess_never_resizes_to_a_giant_image(height: int, width: int, crop: int, extra: int) -> None:
    """Any shape: ImageSizeError before resizing, or a resize target of at most resize x 8 * resize pixels."""
    cfg = PreprocessConfig(resize=crop + extra, crop=crop)
    view = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (height, width, 3))  # no memory, any shape
    try:
        check_input_size(height, width, cfg)
        accepted = True
    except ImageSizeError:
        accepted = False
    if not accepted:
        with bounded_memory(), pytest.raises(ImageSizeError):
            preprocess(view, cfg)
        return
    assert _within(PREPROCESS_LIMITS, width, height)
    (rh, rw), _ = crop_geometry(height, width, cfg)
    assert rh * rw <= cfg.resize * cfg.resize * PREPROCESS_LIMITS.max_aspect + cfg.resize
    if height * width <= 400_000:
        with bounded_memory():
            assert preprocess(view, cfg).shape == (1, 3, crop, crop)
