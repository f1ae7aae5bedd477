"""Helpers for the hostile-input tests: peak-memory measurement in a fresh process, hostile file builders.

``record`` appends a measurement to ``$APR_FUZZ_REPORT_DIR/records.json`` (when set: ``make fuzz``), from which
``test/fuzz_report.py`` writes the campaign report.

``measure_in_subprocess`` runs a snippet in a new Python process and reports the growth of the peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` right before the snippet, so the imports do not count) together
with whatever the snippet stored in ``result``. It sees every allocation (NumPy, OpenCV, torch, safetensors), unlike
tracemalloc, which only sees Python's and NumPy's.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORDS = "records.json"


def record(name: str, **data: Any) -> None:
    """Add one named measurement to the campaign report (a no-op unless ``APR_FUZZ_REPORT_DIR`` is set)."""
    from apr_localizer.fileio import atomic_write_text

    directory = os.environ.get("APR_FUZZ_REPORT_DIR")
    if not directory:
        return
    path = Path(directory) / RECORDS
    records = json.loads(path.read_text()) if path.is_file() else []
    records.append({"name": name, **data})
    atomic_write_text(path, json.dumps(records, indent=1, default=str))


_CHILD = r"""
import json, os, resource, sys, time, traceback
sys.path[:0] = [{repo!r}, {test!r}]

def _hwm_kb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

{setup}
result = {{}}
reset = _reset_hwm()
base = _hwm_kb()
t0 = time.perf_counter()
try:
{snippet}
except BaseException as exc:
    result["uncaught"] = type(exc).__name__ + ": " + str(exc)[:300]
elapsed = time.perf_counter() - t0
print("@@RESULT@@" + json.dumps({{"growth_mb": (_hwm_kb() - base) / 1024.0, "hwm_reset": reset,
                                   "elapsed_s": elapsed, "result": result}}))
"""


def measure_in_subprocess(snippet: str, setup: str = "", timeout: float = 180.0) -> dict[str, Any]:
    """Run ``setup`` then ``snippet`` in a fresh interpreter; return growth_mb, elapsed_s and the snippet's ``result``.

    ``snippet`` may fill the dict ``result`` with JSON-serialisable values; an exception escaping it is reported as
    ``result["uncaught"]``.
    """
    code = _CHILD.format(
        repo=str(REPO_ROOT),
        test=str(REPO_ROOT / "test"),
        setup=textwrap.dedent(setup),
        snippet=textwrap.indent(textwrap.dedent(snippet), "    "),
    )
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT
    )
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@") :])
    raise AssertionError(f"measurement child failed (rc {proc.returncode}): {proc.stderr[-2000:]}")


# ------------------------------------------------------------------------------------------- hostile images
def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def tiny_png(width: int, height: int, payload: bytes | None = None, level: int = 9) -> bytes:
    """Return a syntactically valid RGB PNG declaring ``width`` x ``height`` with a tiny compressed body.

    With the default body (zlib of 64 KiB of zeros) a 1 x 1,000,000 declaration is about 140 bytes.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(bytes(65536) if payload is None else payload, level)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the start-of-frame size of a JPEG (a false size header)."""
    for sof in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        i = jpeg.find(sof)
        if i >= 0:
            out = bytearray(jpeg)
            out[i + 5 : i + 7] = height.to_bytes(2, "big")
            out[i + 7 : i + 9] = width.to_bytes(2, "big")
            return bytes(out)
    raise ValueError("no start-of-frame marker")


# ------------------------------------------------------------------------------------------- hostile model files
def safetensors_bytes(header: dict | bytes, data: bytes = b"", declared_len: int | None = None) -> bytes:
    """Return safetensors bytes: header (dict → JSON) and data section; ``declared_len`` lies about the length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if declared_len is None else declared_len
    return struct.pack("<Q", n) + raw + data
