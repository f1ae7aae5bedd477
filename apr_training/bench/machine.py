"""Facts about the machine a benchmark ran on: CPU/GPU/library versions, cores, a practical fp32 GEMM peak."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["cpu_peak_gflops", "machine_info", "physical_cores", "time_runs"]


def time_runs(fn: Callable[[], Any], runs: int, sync: Callable[[], None]) -> list[float]:
    """Wall-clock milliseconds of ``runs`` calls of ``fn`` (each followed by ``sync``)."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def physical_cores() -> int:
    """Physical CPU cores (the default thread count of the engines)."""
    from apr_localizer.backends.torch_backend import physical_cores as cores

    return cores()


def machine_info() -> dict[str, Any]:
    """CPU, GPU and library versions for the report header."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("torchvision", "onnxruntime", "onnx", "tensorrt", "tensorrt_rtx", "cv2"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # not installed (or its native library is missing)
            info[mod] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_peak_gflops(threads: int, size: int = 1536, runs: int = 8) -> dict[str, float | None]:
    """Practical peak: fp32 GEMM GFLOP/s with ``threads`` threads; theoretical: FMA width × cores × clock."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(2):
            a @ b
        best = min(time_runs(lambda: a @ b, runs, lambda: None))
    finally:
        torch.set_num_threads(prev)
    theoretical = None
    try:
        text = Path("/proc/cpuinfo").read_text()
        mhz = max(float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz"))
        flags = next(line for line in text.splitlines() if line.startswith("flags"))
        # fp32 FLOP per cycle per core: two FMA pipes × lanes × 2 (AVX-512: 16 lanes, AVX2: 8 lanes)
        lanes = 16 if " avx512f" in flags else 8 if " avx2" in flags else 4
        theoretical = threads * mhz * 1e6 * 2 * lanes * 2 / 1e9
    except (OSError, StopIteration, ValueError):
        pass
    return {"gemm_gflops": 2 * size**3 / (best * 1e-3) / 1e9, "theoretical_gflops": theoretical}
