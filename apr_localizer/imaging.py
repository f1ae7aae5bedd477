"""Sensor image bytes → RGB ``uint8`` numpy arrays, and the inverse for tests and synthetic bags.

ROS-free (no ``rclpy`` import): :mod:`apr_localizer.ros_convert` passes ``msg.data``, ``msg.encoding``, ``msg.width``,
``msg.height``, ``msg.step`` and ``msg.is_bigendian`` of a ``sensor_msgs/Image`` to :func:`decode_raw`, and
``msg.data``/``msg.format`` of a ``sensor_msgs/CompressedImage`` to :func:`decode_compressed`.

Every decoder returns an ``(H, W, 3)`` ``uint8`` RGB array and raises :class:`ImageDecodeError` (a ``ValueError``) with
a one-sentence reason for anything it cannot decode; :class:`ImageSizeError` (a subclass) when the size is outside
:class:`ImageLimits`.

Hostile input: every size is checked against :class:`ImageLimits` (each side, the shorter side, the aspect ratio and the
pixel count) from the message fields or the PNG ``IHDR`` / JPEG ``SOFn`` header, before any pixel memory is allocated,
so a few bytes that declare a 1 x 40,000,000 frame cost nothing. A ``format`` string that names a codec must agree
with the magic bytes. libpng (through OpenCV) rejects truncated and CRC-damaged PNGs. libjpeg only warns about a JPEG
that runs out of scan data (an end marker appended to a truncated file, or a header that declares more pixels than the
data holds) and fills the rest with grey, so :func:`decode_compressed` decodes a second copy with filler bytes placed
before the end marker: a complete scan ignores them, a scan that ran out of data does not, and the image is rejected.
Strings from a message (encoding, format) are truncated and escaped before they appear in an error message.

``rgb8`` and ``rgba8`` are returned as zero-copy, read-only views of the input buffer (``rgba8`` as a non-contiguous
view that skips alpha); every other encoding needs a colour conversion and returns a fresh array.

YUV 4:2:2 uses OpenCV's conversions (BT.601, limited range: ``Y`` in 16..235), for decoding and encoding alike. ROS
``yuv422`` is UYVY (``U0 Y0 V0 Y1``) and ROS ``yuv422_yuy2`` is YUYV (``Y0 U0 Y1 V0``).
"""

from __future__ import annotations

import array
import math
import re
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_PIXELS",
    "ENCODINGS",
    "ImageDecodeError",
    "ImageLimits",
    "ImageSizeError",
    "bytes_per_pixel",
    "compressed_image_size",
    "decode_compressed",
    "decode_raw",
    "encode_compressed",
    "encode_raw",
    "quote",
]

BufferLike = bytes | bytearray | memoryview | np.ndarray | array.array

DEFAULT_MAX_PIXELS: Final[int] = 40_000_000
"""Largest accepted ``width * height``: bigger frames are rejected before any work is done on them."""

# encoding → (bytes per pixel, canonical name)
_ENCODINGS: Final[dict[str, tuple[int, str]]] = {
    "rgb8": (3, "rgb8"),
    "bgr8": (3, "bgr8"),
    "rgba8": (4, "rgba8"),
    "bgra8": (4, "bgra8"),
    "mono8": (1, "mono8"),
    "mono16": (2, "mono16"),
    "yuv422": (2, "uyvy"),
    "uyvy": (2, "uyvy"),
    "yuv422_yuy2": (2, "yuyv"),
    "yuyv": (2, "yuyv"),
}
ENCODINGS: Final[tuple[str, ...]] = tuple(_ENCODINGS)
"""The ``sensor_msgs/Image`` encodings that :func:`decode_raw` and :func:`encode_raw` handle."""

_PNG_MAGIC: Final[bytes] = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC: Final[bytes] = b"\xff\xd8\xff"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); 0xC4, 0xC8, 0xCC are not frames.
_JPEG_SOF: Final[frozenset[int]] = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


class ImageDecodeError(ValueError):
    """An image message cannot be decoded; the message is one sentence that says why."""


class ImageSizeError(ImageDecodeError):
    """An image size outside :class:`ImageLimits` (too large, too small or too elongated for the network)."""


@dataclass(frozen=True)
class ImageLimits:
    """Sizes an image may have; checked before any pixel memory is allocated.

    Attributes:
        max_pixels: largest ``width * height`` (40 MP: twice an 8K frame).
        max_side: largest width or height (16384 px; PNG and JPEG allow 65535, no camera needs it).
        min_side: smallest width or height (2 px: a 1-pixel row or column is not an image). Preprocessing applies a
            stricter bound (see :func:`apr_localizer.preprocess.check_input_size`).
        max_aspect: largest ``long side / short side`` (8: the centre crop would keep under 1/8 of the frame, and
            resizing the short side to the network input must not inflate the long side without bound).
    """

    max_pixels: int = 40_000_000
    max_side: int = 16384
    min_side: int = 2
    max_aspect: float = 8.0

    def __post_init__(self) -> None:
        """Validate the limits (positive integers, ``max_aspect >= 1``)."""
        for name in ("max_pixels", "max_side", "min_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"ImageLimits.{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.min_side > self.max_side:
            raise ValueError(f"ImageLimits.min_side {self.min_side} must not exceed max_side {self.max_side}")
        aspect = float(self.max_aspect)
        if not math.isfinite(aspect) or aspect < 1.0:
            raise ValueError(f"ImageLimits.max_aspect must be a finite number >= 1, got {self.max_aspect!r}")
        object.__setattr__(self, "max_aspect", aspect)

    def check(self, width: int, height: int, what: str = "image", min_side: int | None = None) -> None:
        """Raise :class:`ImageSizeError` (one sentence naming ``what``) unless ``width`` x ``height`` is acceptable.

        ``min_side`` overrides :attr:`min_side` when it is larger (preprocessing asks for more than decoding).
        """
        lo = max(self.min_side, min_side or 0)
        if width <= 0 or height <= 0:
            raise ImageSizeError(f"{what} size {width}x{height} is empty; width and height must be positive")
        if max(width, height) > self.max_side:
            raise ImageSizeError(
                f"{what} size {width}x{height} has a side longer than the limit of {self.max_side} pixels"
            )
        if min(width, height) < lo:
            raise ImageSizeError(f"{what} size {width}x{height} is too small; both sides must be at least {lo} pixels")
        if max(width, height) > self.max_aspect * min(width, height):
            raise ImageSizeError(
                f"{what} size {width}x{height} has an aspect ratio of "
                f"{max(width, height) / min(width, height):.4g}:1, more elongated than the limit of "
                f"{self.max_aspect:g}:1"
            )
        if width * height > self.max_pixels:
            raise ImageSizeError(
                f"{what} size {width}x{height} ({width * height / 1e6:.1f} megapixels) exceeds the limit of "
                f"{self.max_pixels / 1e6:.1f} megapixels"
            )


DEFAULT_LIMITS: Final[ImageLimits] = ImageLimits(max_pixels=DEFAULT_MAX_PIXELS)
"""The limits used when a caller gives none."""


def _limits(limits: ImageLimits | None, max_pixels: int | None) -> ImageLimits:
    """``limits`` (default :data:`DEFAULT_LIMITS`) with ``max_pixels`` replaced when one is given."""
    limits = limits or DEFAULT_LIMITS
    if max_pixels is None or int(max_pixels) == limits.max_pixels:
        return limits
    return ImageLimits(int(max_pixels), limits.max_side, limits.min_side, limits.max_aspect)


def quote(value: object, limit: int = 40) -> str:
    """``repr`` of a message-supplied value, cut to about ``limit`` characters: safe to put into an error message.

    ``repr`` escapes control characters (an ANSI escape is shown as a backslash sequence), and the cut keeps a 64 KiB
    field out of logs and diagnostics.
    """
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    text = repr(value)
    if len(text) > limit + 2:
        text = text[:limit] + "..."
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def bytes_per_pixel(encoding: str) -> int:
    """Return the bytes per pixel of a supported ``sensor_msgs/Image`` encoding (2 for the 4:2:2 YUV formats)."""
    return _lookup(encoding)[0]


def _lookup(encoding: str) -> tuple[int, str]:
    try:
        return _ENCODINGS[encoding.strip().lower()]
    except (KeyError, AttributeError):
        raise ImageDecodeError(
            f"image encoding {quote(encoding)} is not supported; expected one of {', '.join(ENCODINGS)}"
        ) from None


def _as_uint8_buffer(data: BufferLike, what: str) -> np.ndarray:
    """View any buffer as a flat ``uint8`` array without copying (copies only a non-contiguous ndarray)."""
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject:
            raise ImageDecodeError(f"{what} data is an object array; a numeric byte buffer was expected")
        arr = data if data.flags.c_contiguous else np.ascontiguousarray(data)
        return arr.reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(
            f"{what} data of type {type(data).__name__} is not a byte buffer (bytes, bytearray, memoryview, "
            "array.array or numpy array expected)"
        ) from exc


def decode_raw(
    data: BufferLike,
    encoding: str,
    width: int,
    height: int,
    step: int,
    is_bigendian: bool = False,
    max_pixels: int | None = None,
    limits: ImageLimits | None = None,
) -> np.ndarray:
    """Decode the pixel buffer of a ``sensor_msgs/Image`` into an ``(height, width, 3)`` ``uint8`` RGB array.

    Args:
        data: the row-major pixel buffer (``msg.data``), ``step`` bytes per row, at least ``step * height`` bytes;
            extra trailing bytes are ignored.
        encoding: one of :data:`ENCODINGS` (case-insensitive).
        width, height: image size in pixels.
        step: bytes per row, at least ``width * bytes_per_pixel(encoding)``; the rest of a row is padding.
        is_bigendian: byte order of ``mono16`` samples (ignored for 8-bit encodings).
        max_pixels: overrides ``limits.max_pixels`` when given.
        limits: size limits checked before the data is touched (default :data:`DEFAULT_LIMITS`).

    Returns:
        ``(height, width, 3)`` ``uint8`` RGB. ``rgb8``/``rgba8`` give a read-only view sharing memory with ``data``
        (no copy); ``mono16`` keeps the high byte (``>> 8``); ``mono8``/``mono16`` are replicated to three channels.

    Raises:
        ImageDecodeError: unknown encoding, ``step`` too small, truncated data, or an odd width for a 4:2:2 YUV
            encoding; :class:`ImageSizeError` for a size outside ``limits``.
    """
    bpp, canonical = _lookup(encoding)
    try:
        width, height, step = int(width), int(height), int(step)
    except (TypeError, ValueError):
        raise ImageDecodeError(
            f"image width {quote(width)}, height {quote(height)} and step {quote(step)} must be integers"
        ) from None
    _limits(limits, max_pixels).check(width, height, f"{canonical} image")
    row_bytes = width * bpp
    if step < row_bytes:
        raise ImageDecodeError(
            f"image step {step} is smaller than width*bytes_per_pixel {row_bytes} for encoding {encoding} "
            f"(width {width})"
        )
    if bpp == 2 and canonical in ("uyvy", "yuyv") and width % 2:
        raise ImageDecodeError(f"image width {width} is odd; encoding {encoding} packs two pixels per 4 bytes")
    buf = _as_uint8_buffer(data, f"{encoding} image")
    needed = step * height
    if buf.size < needed:
        raise ImageDecodeError(
            f"image data has {buf.size} bytes but step*height = {step}*{height} = {needed} are needed for a "
            f"{width}x{height} {encoding} image (truncated message)"
        )
    # (height, step) rows → drop the padding → split each row into pixels: all views, no copy.
    rows = buf[:needed].reshape(height, step)[:, :row_bytes]
    pixels = rows.reshape(height, width, bpp)

    if canonical == "rgb8":
        return pixels
    if canonical == "rgba8":
        return pixels[:, :, :3]
    if canonical == "bgr8":
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    if canonical == "bgra8":
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGB)
    if canonical == "mono8":
        return cv2.cvtColor(pixels[:, :, 0], cv2.COLOR_GRAY2RGB)
    if canonical == "mono16":
        # ">> 8" of a 16-bit sample is its most significant byte: byte 0 when big-endian, byte 1 when little-endian.
        high = np.ascontiguousarray(pixels[:, :, 0 if is_bigendian else 1])
        return cv2.cvtColor(high, cv2.COLOR_GRAY2RGB)
    if canonical == "uyvy":
        return cv2.cvtColor(pixels, cv2.COLOR_YUV2RGB_UYVY)
    return cv2.cvtColor(pixels, cv2.COLOR_YUV2RGB_YUY2)  # yuyv


def compressed_image_size(data: BufferLike) -> tuple[str, int, int]:
    """Read ``(codec, width, height)`` from a PNG or JPEG header without decoding the pixels.

    Raises:
        ImageDecodeError: the bytes are neither PNG nor JPEG, or the header is truncated or malformed.
    """
    buf = _as_uint8_buffer(data, "compressed image")
    head = buf[:8].tobytes()
    if head == _PNG_MAGIC:
        if buf.size < 24 or buf[12:16].tobytes() != b"IHDR":
            raise ImageDecodeError("compressed image is a PNG whose IHDR header chunk is missing or truncated")
        width = int.from_bytes(buf[16:20].tobytes(), "big")
        height = int.from_bytes(buf[20:24].tobytes(), "big")
        return "png", width, height
    if head[:3] == _JPEG_MAGIC:
        return ("jpeg", *_jpeg_size(buf))
    raise ImageDecodeError(
        f"compressed image data ({buf.size} bytes, starting {head[:4].hex()}) is neither PNG nor JPEG"
    )


def _jpeg_size(buf: np.ndarray) -> tuple[int, int]:
    """Walk the JPEG marker segments up to the first start-of-frame and return its (width, height)."""
    n = buf.size
    pos = 2
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            break
        marker = int(buf[pos + 1])
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stand-alone markers carry no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        length = (int(buf[pos + 2]) << 8) | int(buf[pos + 3])
        if marker in _JPEG_SOF:
            if pos + 9 > n or length < 7:
                break
            height = (int(buf[pos + 5]) << 8) | int(buf[pos + 6])
            width = (int(buf[pos + 7]) << 8) | int(buf[pos + 8])
            return width, height
        pos += 2 + length
    raise ImageDecodeError("compressed image is a JPEG without a readable start-of-frame header (corrupt or truncated)")


def _jpeg_end_of_image(raw: bytes) -> int:
    """Offset of the end-of-image marker that ends a JPEG's scans (the first ``FFD9`` outside marker segments).

    Walks the marker segments by their lengths and the entropy-coded data of each scan (where ``FF00`` is a stuffed
    byte and ``FFD0``..``FFD7`` are restart markers), so an ``FFD9`` inside an EXIF thumbnail does not count. With a
    restart interval, every scan must hold exactly the restart markers its MCU count implies: fewer means the scan
    was cut (libjpeg skips filler between intervals, which the pixel probe cannot see), more means the header
    declares fewer pixels than the data holds. A progressive JPEG must refine every coefficient of every component
    to full precision (a file cut between two scans decodes without any warning).
    """
    n, pos = len(raw), 2
    frame: tuple[int, int, dict[int, tuple[int, int]]] | None = None
    interval = 0
    progressive = False
    refined: dict[int, set[int]] = {}  # component id -> coefficient indices coded to full precision (Al = 0)
    while pos + 1 < n:
        if raw[pos] != 0xFF:
            break
        marker = raw[pos + 1]
        if marker == 0xD9:
            if progressive and frame is not None and any(len(refined.get(c, ())) < 64 for c in frame[2]):
                raise ImageDecodeError(
                    "compressed image is a corrupt JPEG: its progressive scans stop before every coefficient is "
                    "complete (a file cut between two scans)"
                )
            return pos
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 1 if marker == 0xFF else 2
            continue
        if pos + 4 > n:
            break
        length = (raw[pos + 2] << 8) | raw[pos + 3]
        seg = raw[pos + 4 : pos + 2 + length]
        pos += 2 + length
        if marker in _JPEG_SOF and frame is None and len(seg) >= 6:
            comps = {seg[6 + 3 * k]: (seg[7 + 3 * k] >> 4, seg[7 + 3 * k] & 15) for k in range(min(seg[5], 4))
                     if 8 + 3 * k <= len(seg)}  # fmt: skip
            frame = ((seg[3] << 8) | seg[4], (seg[1] << 8) | seg[2], comps)
            progressive = marker in (0xC2, 0xC6, 0xCA, 0xCE)
            blocks = sum(_scan_mcus(frame, [c]) for c in comps)
            if n * 8 < blocks:  # every 8x8 block costs at least one bit of Huffman code
                raise ImageDecodeError(
                    f"compressed image is a corrupt JPEG: {n} bytes cannot hold the {blocks} blocks of its "
                    f"{frame[0]}x{frame[1]} header (a false size header)"
                )
        elif marker == 0xDD and len(seg) >= 2:
            interval = (seg[0] << 8) | seg[1]
        if marker != 0xDA:
            continue
        pos, restarts = _skip_entropy_data(raw, pos)
        if progressive and seg and len(seg) >= 4 + 2 * seg[0] and seg[3 + 2 * seg[0]] & 15 == 0:
            lo, hi = seg[1 + 2 * seg[0]], seg[2 + 2 * seg[0]]
            for k in range(seg[0]):
                refined.setdefault(seg[1 + 2 * k], set()).update(range(lo, min(hi, 63) + 1))
        if interval and frame is not None and seg:
            ids = [seg[1 + 2 * k] for k in range(seg[0]) if 2 + 2 * k <= len(seg)]
            expected = _ceil_div(_scan_mcus(frame, ids), interval) - 1
            if expected >= 0 and restarts != expected:
                raise ImageDecodeError(
                    f"compressed image is a corrupt JPEG: a scan has {restarts} restart markers where its "
                    f"{frame[0]}x{frame[1]} header implies {expected} (truncated data or a false size header)"
                )
    raise ImageDecodeError("compressed image is a JPEG without an end-of-image marker (truncated message)")


def _skip_entropy_data(raw: bytes, pos: int) -> tuple[int, int]:
    """Return (offset of the marker that ends the entropy-coded data at ``pos``, restart markers passed)."""
    n, restarts = len(raw), 0
    while True:
        pos = raw.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= n:
            return n, restarts
        nxt = raw[pos + 1]
        if nxt == 0x00:
            pos += 2
        elif 0xD0 <= nxt <= 0xD7:
            restarts += 1
            pos += 2
        elif nxt == 0xFF:
            pos += 1
        else:
            return pos, restarts


# DEFLATE codes at most 258 bytes per 2 bits (a length and a distance code): no stream expands by more than 1032:1.
_DEFLATE_MAX_RATIO: Final[int] = 1032
_PNG_CHANNELS: Final[dict[int, int]] = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _check_png_data_size(buf: np.ndarray, width: int, height: int) -> int:
    """Reject a PNG whose bytes are too few for its IHDR size even at DEFLATE's best ratio; returns -1."""
    depth = int(buf[24]) if buf.size > 25 else 8
    channels = _PNG_CHANNELS.get(int(buf[25]) if buf.size > 25 else 2, 4)
    raw = height * (1 + _ceil_div(width * channels * depth, 8))
    if buf.size * _DEFLATE_MAX_RATIO < raw:
        raise ImageDecodeError(
            f"compressed image is a corrupt PNG: {buf.size} bytes cannot hold the {raw} bytes of its {width}x{height} "
            "header even at zlib's best ratio (a false size header)"
        )
    return -1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _scan_mcus(frame: tuple[int, int, dict[int, tuple[int, int]]], scan_ids: list[int]) -> int:
    """MCUs in a scan (T.81 A.2): interleaved scans use the largest sampling factors, single ones the component's."""
    width, height, comps = frame
    if not comps:
        return 0
    hmax = max(h for h, _ in comps.values()) or 1
    vmax = max(v for _, v in comps.values()) or 1
    if len(scan_ids) == 1 and scan_ids[0] in comps:
        h, v = comps[scan_ids[0]]
        return _ceil_div(_ceil_div(width * h, hmax), 8) * _ceil_div(_ceil_div(height * v, vmax), 8)
    return _ceil_div(width, 8 * hmax) * _ceil_div(height, 8 * vmax)


def decode_compressed(
    data: BufferLike, format: str = "", max_pixels: int | None = None, limits: ImageLimits | None = None
) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG or PNG) into an ``(H, W, 3)`` ``uint8`` RGB array.

    The codec is taken from the bytes (magic numbers); ``format`` (``msg.format``, e.g. ``"jpeg"``,
    ``"rgb8; jpeg compressed bgr8"``, ``"png"``) may be empty; otherwise it must name the codec of the bytes (``"tiff"``
    with PNG bytes is rejected, and so is a format that names no codec). Grey images are replicated to three channels,
    alpha is dropped and 16-bit PNGs keep their high byte (``>> 8``). The header size is checked against ``limits``
    before the pixels are decoded, and a JPEG whose scan ends early (truncated, or a header that declares more pixels
    than the data) is rejected.

    Raises:
        ImageDecodeError: unsupported or mismatching format (e.g. ``compressedDepth``), bytes that are not a complete,
            decodable PNG/JPEG; :class:`ImageSizeError` for a header size outside ``limits``.
    """
    codec, width, height = compressed_image_size(data)
    _check_format(format, codec)
    _limits(limits, max_pixels).check(width, height, f"compressed {codec} image")
    buf = _as_uint8_buffer(data, "compressed image")
    eoi = _jpeg_end_of_image(buf.tobytes()) if codec == "jpeg" else _check_png_data_size(buf, width, height)
    img = _imdecode(buf, codec)
    if img.shape[0] != height or img.shape[1] != width:
        raise ImageDecodeError(
            f"compressed {codec} image decoded to {img.shape[1]}x{img.shape[0]} but its header says {width}x{height}"
        )
    if codec == "jpeg":
        _check_jpeg_scan_complete(buf, eoi, img)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageDecodeError(f"compressed {codec} image has sample type {img.dtype}; expected 8 or 16 bit")
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise ImageDecodeError(f"compressed {codec} image has {img.shape[2]} channels; expected 1, 3 or 4")


# Codec names a CompressedImage.format may contain besides ours; naming one of them with PNG/JPEG data is an error.
_CODEC_WORDS: Final[dict[str, str]] = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png"}
_OTHER_CODECS: Final[frozenset[str]] = frozenset(
    {
        "tiff",
        "tif",
        "bmp",
        "gif",
        "webp",
        "jp2",
        "j2k",
        "jpeg2000",
        "jxl",
        "avif",
        "heic",
        "heif",
        "exr",
        "hdr",
        "pbm",
        "pgm",
        "ppm",
        "pnm",
        "qoi",
        "raw",
        "theora",
        "h264",
        "h265",
        "hevc",
        "av1",
        "zstd",
        "rvl",
    }
)


def _check_format(format: str, codec: str) -> None:
    """Raise unless ``format`` is empty or names exactly the codec found in the data (``codec``), in 256 characters."""
    if not isinstance(format, str):
        raise ImageDecodeError(f"compressed image format must be a string, got {type(format).__name__}")
    words = set(re.findall(r"[a-z0-9]+", format.lower()))
    if "compresseddepth" in words:
        raise ImageDecodeError(
            f"compressed image format {quote(format)} (depth) is not supported; expected jpeg or png"
        )
    named = {_CODEC_WORDS[w] for w in words if w in _CODEC_WORDS} | (words & _OTHER_CODECS)
    if format.strip() and (not named or len(format) > 256):
        raise ImageDecodeError(
            f"compressed image format {quote(format)} names no codec; expected jpeg or png (or an empty format)"
        )
    if named and named != {codec}:
        raise ImageDecodeError(
            f"compressed image format {quote(format)} does not match its data, which is a {codec} (the format names "
            f"{', '.join(sorted(named))})"
        )


def _imdecode(buf: np.ndarray, codec: str) -> np.ndarray:
    """OpenCV decode (unchanged depth and channels); ImageDecodeError for anything it cannot decode."""
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageDecodeError(
            f"compressed {codec} image could not be decoded by OpenCV: {quote(exc.msg.strip(), 120)}"
        ) from None
    if img is None or img.size == 0:
        raise ImageDecodeError(f"compressed {codec} image ({buf.size} bytes) could not be decoded (corrupt data)")
    return img


# Filler for the JPEG scan-completeness probe: no 0xFF (would start a marker), not all zeros or all ones (which may
# decode like libjpeg's own zero fill with some Huffman tables).
_JPEG_PROBE_FILLER: Final[np.ndarray] = np.frombuffer(bytes((37 * i + 11) % 255 for i in range(256)), np.uint8)


def _check_jpeg_scan_complete(buf: np.ndarray, eoi: int, img: np.ndarray) -> None:
    """Reject a JPEG whose last scan ran out of data before the end-of-image marker at ``eoi``.

    libjpeg only warns when entropy-coded data ends early and fills the missing blocks, so the decode "succeeds":
    decoding again with filler bytes before the end marker tells the cases apart. A complete scan stops before the
    filler (libjpeg skips it as extraneous bytes) and gives identical pixels; a starved scan reads the filler as
    image data and gives different pixels (or fails).
    """
    probe = np.concatenate([buf[:eoi], _JPEG_PROBE_FILLER, buf[eoi:]])
    img2 = cv2.imdecode(probe, cv2.IMREAD_UNCHANGED)
    if img2 is None or img2.shape != img.shape or not np.array_equal(img2, img):
        raise ImageDecodeError(
            "compressed image is a corrupt JPEG: its scan data ends before the image is complete (a truncated file "
            "with an end marker, or a header that declares more pixels than the data holds)"
        )


def _check_rgb(rgb: np.ndarray, what: str) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"{what} expects an (H, W, 3) uint8 RGB array, got shape {rgb.shape} dtype {rgb.dtype}")
    return rgb


def encode_raw(
    rgb: np.ndarray, encoding: str, is_bigendian: bool = False, step: int | None = None
) -> tuple[bytes, int]:
    """Encode an ``(H, W, 3)`` ``uint8`` RGB array as ``sensor_msgs/Image`` data; the inverse of :func:`decode_raw`.

    Args:
        rgb: the image.
        encoding: one of :data:`ENCODINGS`. ``mono8`` uses OpenCV's RGB→grey weights; ``mono16`` stores
            ``grey * 257`` (so ``>> 8`` gives ``grey`` back); ``rgba8``/``bgra8`` store alpha 255; the YUV 4:2:2
            encodings use OpenCV's BT.601 limited-range conversion (the inverse of the decoder's).
        is_bigendian: byte order of ``mono16`` samples.
        step: bytes per row; ``None`` means ``width * bytes_per_pixel``; a larger value pads each row with zeros.

    Returns:
        ``(data, step)`` with ``len(data) == step * H``.

    Raises:
        ValueError: ``rgb`` is not an ``(H, W, 3)`` ``uint8`` array, ``step`` is too small, or the width is odd for
            a YUV 4:2:2 encoding.
        ImageDecodeError: unknown encoding (a ``ValueError`` too).
    """
    bpp, canonical = _lookup(encoding)
    rgb = _check_rgb(rgb, "encode_raw")
    height, width = rgb.shape[:2]
    if canonical in ("uyvy", "yuyv") and width % 2:
        raise ValueError(f"encode_raw cannot write {encoding} with odd width {width}; 4:2:2 needs pixel pairs")
    if canonical == "rgb8":
        pixels = rgb
    elif canonical == "bgr8":
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    elif canonical == "rgba8":
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA)
    elif canonical == "bgra8":
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
    elif canonical == "mono8":
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif canonical == "mono16":
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.uint16) * np.uint16(257)
        pixels = grey.astype(">u2" if is_bigendian else "<u2")
    elif canonical == "uyvy":
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_UYVY)
    else:
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_YUY2)
    rows = np.ascontiguousarray(pixels).view(np.uint8).reshape(height, width * bpp)
    row_bytes = width * bpp
    step = row_bytes if step is None else int(step)
    if step < row_bytes:
        raise ValueError(f"encode_raw step {step} is smaller than width*bytes_per_pixel {row_bytes} for {encoding}")
    if step > row_bytes:
        padded = np.zeros((height, step), dtype=np.uint8)
        padded[:, :row_bytes] = rows
        rows = padded
    return rows.tobytes(), step


def encode_compressed(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """Encode an ``(H, W, 3)`` ``uint8`` RGB array as JPEG or PNG bytes (``sensor_msgs/CompressedImage`` data).

    Args:
        rgb: the image.
        fmt: ``"jpeg"`` (or ``"jpg"``) or ``"png"``.
        quality: JPEG quality 1..100 (ignored for PNG, which is lossless).

    Raises:
        ValueError: bad array, unknown ``fmt`` or ``quality`` out of range.
    """
    rgb = _check_rgb(rgb, "encode_compressed")
    fmt_l = fmt.lower()
    if fmt_l in ("jpeg", "jpg"):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"encode_compressed quality {quality} is out of range; expected 1..100")
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif fmt_l == "png":
        ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, 3]
    else:
        raise ValueError(f"encode_compressed format {fmt!r} is not supported; expected 'jpeg' or 'png'")
    ok, out = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:  # pragma: no cover - OpenCV only fails here on internal errors
        raise ValueError(f"encode_compressed: OpenCV failed to encode a {rgb.shape[1]}x{rgb.shape[0]} {fmt} image")
    return out.tobytes()
