"""A storm of malformed Image/CompressedImage messages against a real localizer node process.

Only the node's public behaviour is used: the image topic, ``/diagnostics``, ``~/pose``, ``/tf`` and the lifecycle
services. For each transport (raw and compressed) a node is started with ``autostart``; then

1. every malformed kind is sent once and must be counted as exactly one rejected message (none is localized);
2. a storm of ``APR_FUZZ_STORM`` messages (default 120) cycling through the kinds is sent at ``APR_FUZZ_STORM_HZ``
   (default 200; 0 = as fast as possible) while the node's peak RSS is watched (``VmHWM`` after a reset through
   ``/proc/<pid>/clear_refs``, else sampled RSS): no pose may come out, no frame may fail inside the pipeline, every
   message must be accounted for, and the peak RSS may grow by less than 100 MB;
3. the node still localizes a real frame, and nothing it ever published has a non-finite value or a zero stamp.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from fuzz_support import jpeg_with_size, record, tiny_png
from geometry_msgs.msg import PoseStamped
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from apr_localizer import ros_convert
from apr_localizer.imaging import encode_compressed
from apr_training.ros_harness import WAIT_S, NodeProcess, RosHarness, diag_values, wait_until, write_params

pytestmark = pytest.mark.ros

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = "checkpoints/ms_transformer_7scenes_t2-2_rot1-1.pth"
CAMERA_FRAME = "cam_optical"
STORM = int(os.environ.get("APR_FUZZ_STORM", "120"))
STORM_HZ = float(os.environ.get("APR_FUZZ_STORM_HZ", "200"))
FLOOD_S = float(os.environ.get("APR_FUZZ_FLOOD_S", "0"))  # mixed valid/malformed flood; 0 = skipped (make fuzz: 60)
FLOOD_HZ = float(os.environ.get("APR_FUZZ_FLOOD_HZ", "100"))  # 0: as fast as possible (the transport drops most)
STORM_COUNTERS = ("rejected_messages", "frames_received", "frames_processed", "poses_published", "processing_errors",
                  "dropped_unprocessed", "dropped_in_transport")  # fmt: skip
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
try:
    from tf2_msgs.msg import TFMessage
except ImportError:  # pragma: no cover - the infra build provides it
    TFMessage = None


def _now() -> Time:
    return ros_convert.ns_to_time(time.time_ns())


def _raw(encoding: str, width: int, height: int, step: int, data_len: int) -> Image:
    msg = Image(height=height, width=width, encoding=encoding, step=step)
    msg.header.frame_id = CAMERA_FRAME
    msg.data = ros_convert.uint8_array(bytes(data_len))
    return msg


def _compressed(fmt: str, data: bytes) -> CompressedImage:
    msg = CompressedImage(format=fmt)
    msg.header.frame_id = CAMERA_FRAME
    msg.data = ros_convert.uint8_array(data)
    return msg


def _jpeg(h: int = 48, w: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    return encode_compressed(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "jpeg")


U32 = 2**32 - 1
RAW_KINDS: dict[str, Callable[[], Image]] = {
    "unknown encoding": lambda: _raw("16UC3", 64, 48, 64 * 6, 64 * 6 * 48),
    "64 KiB encoding with an ANSI escape": lambda: _raw("\x1b[31m" + "e" * 65536, 64, 48, 192, 192 * 48),
    "20000x1 (60 KB)": lambda: _raw("rgb8", 20_000, 1, 60_000, 60_000),
    "1x40,000,000 header": lambda: _raw("rgb8", 1, 40_000_000, 3, 16),
    "50 megapixel header": lambda: _raw("rgb8", 8660, 5774, 8660 * 3, 4096),
    "1x1": lambda: _raw("rgb8", 1, 1, 3, 3),
    "truncated data": lambda: _raw("rgb8", 640, 480, 1920, 1920 * 100),
    "step smaller than width": lambda: _raw("rgb8", 640, 480, 100, 1920 * 480),
    "odd width for yuv422": lambda: _raw("yuv422", 63, 48, 126, 126 * 48),
    "zero size": lambda: _raw("rgb8", 0, 0, 0, 0),
    "uint32 max height": lambda: _raw("mono8", 64, U32, 64, 64),
    "uint32 max step": lambda: _raw("rgb8", 64, 48, U32, 100),
}
COMPRESSED_KINDS: dict[str, Callable[[], CompressedImage]] = {
    "garbage bytes": lambda: _compressed("jpeg", b"\xff\xd8\xff\xe0 this is not a jpeg at all"),
    "empty data": lambda: _compressed("png", b""),
    "png magic only": lambda: _compressed("png", b"\x89PNG\r\n\x1a\n"),
    "tiff format with png data": lambda: _compressed("tiff", encode_compressed(np.zeros((48, 64, 3), np.uint8), "png")),
    "138-byte png of 1x1,000,000": lambda: _compressed("png", tiny_png(1, 1_000_000)),
    "truncated jpeg with an end marker": lambda: _compressed("jpeg", _jpeg()[: len(_jpeg()) // 2] + b"\xff\xd9"),
    "jpeg with a false size header": lambda: _compressed("jpeg", jpeg_with_size(_jpeg(), 128, 96)),
    "jpeg declaring 16384x16384": lambda: _compressed("jpeg", jpeg_with_size(_jpeg(), 16384, 16384)),
    "1x1 png": lambda: _compressed("png", encode_compressed(np.zeros((1, 1, 3), np.uint8), "png")),
    "compressedDepth format": lambda: _compressed("16UC1; compressedDepth", _jpeg()),
    "64 KiB format string": lambda: _compressed("\x1b[2J" + "f" * 65536, _jpeg()),
}


def _params(checkpoint: Path, topic: str, transport: str) -> dict[str, Any]:
    return {
        "autostart": True,
        "model": {"path": str(checkpoint)},
        "backend": "torch",
        "device": "cpu",
        "threads": 1,
        "image_topic": topic,
        "image_transport": transport,
        "qos": "reliable",
        "qos_depth": 10,
        "map_frame": "map",
        "camera_frame": "",
        "base_frame": "",
        "output_pose": "camera",
        "min_confidence": 0.0,
        "publish_tf": True,
        "tf_mode": "map_to_camera",
        "diagnostics_period_s": 0.25,
    }


class FuzzedNode:
    """One node process under fuzz, with the subscriptions and the publisher of this test process."""

    def __init__(self, tmp: Path, env: dict[str, str], harness: RosHarness, checkpoint: Path, transport: str):
        self.name = f"apr_fuzz_{transport}"
        self.transport = transport
        topic = f"/fuzz_{transport}/image"
        params = write_params(tmp / "params.yaml", _params(checkpoint, topic, transport), node_name=self.name)
        self.h = harness
        self.poses = harness.subscribe(PoseStamped, f"/{self.name}/pose", RELIABLE)
        self.tfs = harness.subscribe(TFMessage, "/tf", QoSProfile(depth=100)) if TFMessage is not None else []
        self.diags = harness.subscribe(DiagnosticArray, "/diagnostics", 50)
        msg_type, sub_topic = (Image, topic) if transport == "raw" else (CompressedImage, topic + "/compressed")
        self.pub = harness.publisher(msg_type, sub_topic, RELIABLE)
        self.proc = NodeProcess(
            [REPO_ROOT / "config" / "localizer.yaml", params], env, tmp / "node.log", node_name=self.name
        )
        harness.wait_subscribers(self.pub, timeout=90.0)

    def diag(self) -> dict[str, Any] | None:
        for m in reversed(self.h.snapshot(self.diags)):
            d = diag_values(m, self.name)
            if d is not None:
                return d
        return None

    def wait_diag(self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = WAIT_S) -> dict:
        def check() -> dict[str, Any] | None:
            self.proc.check_alive(what)
            d = self.diag()
            return d if d is not None and predicate(d) else None

        try:
            return wait_until(check, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last diagnostics: {self.diag()}; log: {self.proc.log_tail(8)}") from None

    def valid_frame(self, rgb: np.ndarray) -> Image | CompressedImage:
        if self.transport == "raw":
            return ros_convert.rgb_to_image(rgb, stamp=_now(), frame_id=CAMERA_FRAME)
        return ros_convert.rgb_to_compressed(rgb, "png", stamp=_now(), frame_id=CAMERA_FRAME)


@pytest.fixture(scope="module")
def frame(reference_dir) -> np.ndarray:
    from PIL import Image as PILImage

    return np.asarray(PILImage.open(reference_dir / "raw_images" / "raw_1.png").convert("RGB"))


@pytest.fixture(scope="module", params=["raw", "compressed"])
def fuzzed(request, tmp_path_factory, node_env, harness, reference_dir):
    node = FuzzedNode(
        tmp_path_factory.mktemp(f"fuzz_{request.param}"), node_env, harness, reference_dir / CHECKPOINT, request.param
    )
    try:
        yield node
    finally:
        code = node.proc.stop()
        log = node.proc.log()
    assert code == 0, log[-3000:]


class PeakRss:
    """Peak resident set of another process: VmHWM after a clear_refs reset, else sampled at 100 Hz."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.pid = pid
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.hwm = True
        except OSError:
            self.hwm = False
        self.base = self._hwm() if self.hwm else self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _hwm(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:
                return

    def growth_mb(self) -> float:
        self._stop.set()
        self._thread.join()
        if self.hwm:
            self.peak = max(self.peak, self._hwm())
        return (self.peak - self.base) / 2**20


def _kinds(node: FuzzedNode) -> dict[str, Callable[[], Any]]:
    return RAW_KINDS if node.transport == "raw" else COMPRESSED_KINDS


def test_each_malformed_kind_is_rejected_once_and_never_localized(fuzzed: FuzzedNode) -> None:
    base = fuzzed.wait_diag(lambda d: True, "diagnostics")
    rejected, published = int(base["rejected_messages"]), int(base["poses_published"])
    for k, (what, make) in enumerate(_kinds(fuzzed).items(), start=1):
        msg = make()
        msg.header.stamp = _now()
        fuzzed.pub.publish(msg)
        d = fuzzed.wait_diag(lambda d, n=rejected + k: int(d["rejected_messages"]) >= n, f"rejection of {what}")
        assert int(d["rejected_messages"]) == rejected + k, (what, d)
        reason = d["last_reject_reason"]
        assert reason and "\x1b" not in reason and len(reason) <= 1024, (what, reason[:300])
    d = fuzzed.diag()
    assert d is not None and int(d["poses_published"]) == published and int(d["processing_errors"]) == 0, d


def test_storm_of_malformed_messages_keeps_memory_flat_and_publishes_nothing(fuzzed: FuzzedNode, frame) -> None:
    kinds = list(_kinds(fuzzed).values())
    prepared = [make() for make in kinds]  # build once: the storm measures the node, not this process
    before = fuzzed.wait_diag(lambda d: True, "diagnostics")
    poses_before = fuzzed.h.count(fuzzed.poses)
    rss = PeakRss(fuzzed.proc.pid)
    t0 = time.monotonic()
    for i in range(STORM):
        if STORM_HZ > 0 and (wait := t0 + i / STORM_HZ - time.monotonic()) > 0:
            time.sleep(wait)
        msg = prepared[i % len(prepared)]
        msg.header.stamp = _now()
        fuzzed.pub.publish(msg)
    sent = STORM

    def accounted(d: dict[str, Any]) -> bool:
        seen = int(d["frames_received"]) + int(d["dropped_in_transport"])
        return seen >= int(before["frames_received"]) + int(before["dropped_in_transport"]) + int(0.95 * sent)

    after = fuzzed.wait_diag(accounted, "diagnostics accounting for the storm", timeout=60.0)
    time.sleep(0.5)  # let the worker finish the last queued message
    after = fuzzed.wait_diag(lambda d: True, "diagnostics after the storm")
    growth = rss.growth_mb()
    delta = {k: int(after[k]) - int(before[k]) for k in STORM_COUNTERS}
    print(f"\nstorm ({fuzzed.transport}): sent {sent}, {delta}, peak RSS growth {growth:.1f} MB (hwm={rss.hwm})")
    record(f"storm ({fuzzed.transport})", sent=sent, rate_hz=STORM_HZ, kinds=len(kinds), peak_rss_growth_mb=growth,
           **delta)  # fmt: skip
    assert fuzzed.proc.alive()
    assert delta["poses_published"] == 0 and fuzzed.h.count(fuzzed.poses) == poses_before, delta
    assert delta["processing_errors"] == 0, (delta, after["last_reject_reason"])
    assert delta["rejected_messages"] + delta["dropped_unprocessed"] >= delta["frames_received"] - 1, delta
    assert delta["frames_processed"] == 0 and delta["rejected_messages"] >= 1, delta  # the latest-frame mailbox
    # and the transport drop what the worker cannot take; everything the worker took was rejected
    assert growth < 100, f"peak RSS grew by {growth:.1f} MB during the storm"


def test_node_still_localizes_and_never_published_anything_wrong(fuzzed: FuzzedNode, frame) -> None:
    msg = fuzzed.valid_frame(frame)
    fuzzed.pub.publish(msg)
    wait_until(
        lambda: any(p.header.stamp == msg.header.stamp for p in fuzzed.h.snapshot(fuzzed.poses)),
        WAIT_S,
        "the pose of a valid frame after the storm",
    )
    assert fuzzed.h.lifecycle_state(fuzzed.name) == "active"
    for p in fuzzed.h.snapshot(fuzzed.poses):
        stamp_ns = ros_convert.time_to_ns(p.header.stamp)
        v = p.pose.position, p.pose.orientation
        values = [v[0].x, v[0].y, v[0].z, v[1].x, v[1].y, v[1].z, v[1].w]
        assert stamp_ns > 0 and all(math.isfinite(x) for x in values), p
    for tf_msg in fuzzed.h.snapshot(fuzzed.tfs):
        for t in tf_msg.transforms:
            tr, rot = t.transform.translation, t.transform.rotation
            assert ros_convert.time_to_ns(t.header.stamp) > 0, t
            assert all(math.isfinite(x) for x in (tr.x, tr.y, tr.z, rot.x, rot.y, rot.z, rot.w)), t


@pytest.mark.slow
@pytest.mark.skipif(FLOOD_S <= 0, reason="the mixed flood runs in make fuzz (APR_FUZZ_FLOOD_S > 0)")
def test_mixed_flood_keeps_memory_flat_and_accounts_for_every_frame(fuzzed: FuzzedNode, frame) -> None:
    """Every fourth message is a valid frame, the rest cycle through the malformed kinds, at FLOOD_HZ."""
    malformed = [make() for make in _kinds(fuzzed).values()]
    valid = fuzzed.valid_frame(frame)
    before = fuzzed.wait_diag(lambda d: True, "diagnostics")
    rss = PeakRss(fuzzed.proc.pid)
    t0, sent = time.monotonic(), 0
    while time.monotonic() - t0 < FLOOD_S:
        if (wait := t0 + sent / FLOOD_HZ - time.monotonic()) > 0:
            time.sleep(wait)
        msg = valid if sent % 4 == 0 else malformed[sent % len(malformed)]
        msg.header.stamp = _now()
        fuzzed.pub.publish(msg)
        sent += 1
    after = fuzzed.wait_diag(
        lambda d: (
            int(d["frames_received"]) + int(d["dropped_in_transport"])
            >= int(before["frames_received"]) + int(before["dropped_in_transport"]) + int(0.95 * sent)
        ),
        "diagnostics accounting for the flood",
        timeout=60.0,
    )
    growth = rss.growth_mb()
    delta = {k: int(after[k]) - int(before[k]) for k in STORM_COUNTERS}
    record(f"flood ({fuzzed.transport})", seconds=FLOOD_S, rate_hz=FLOOD_HZ, sent=sent, peak_rss_growth_mb=growth,
           **delta)  # fmt: skip
    assert fuzzed.proc.alive() and delta["processing_errors"] == 0, delta
    assert delta["poses_published"] >= 1, delta
    assert growth < 100, f"peak RSS grew by {growth:.1f} MB during the flood"


def test_frame_too_small_for_the_network_is_rejected(fuzzed: FuzzedNode) -> None:
    base = fuzzed.wait_diag(lambda d: True, "diagnostics")
    rgb = np.zeros((20, 20, 3), np.uint8)  # decodable (sides >= 2) but below ceil(crop / 8) = 28 pixels
    fuzzed.pub.publish(fuzzed.valid_frame(rgb))
    d = fuzzed.wait_diag(
        lambda d: (
            int(d["rejected_messages"]) + int(d["processing_errors"])
            > int(base["rejected_messages"]) + int(base["processing_errors"])
        ),
        "the 20x20 frame to be refused",
    )
    assert int(d["processing_errors"]) == int(base["processing_errors"]), d
    assert "too small" in d["last_reject_reason"], d
