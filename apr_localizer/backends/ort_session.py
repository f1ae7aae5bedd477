"""The one place ONNX Runtime sessions are created (the onnxruntime backend and the export parity report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .torch_backend import physical_cores

__all__ = ["make_session"]


def make_session(path: str | Path, threads: int = 0, providers: list | None = None) -> Any:
    """Create an ``onnxruntime.InferenceSession`` for the apr_localizer graphs.

    ``threads`` intra-op threads (0 = physical cores), 1 inter-op thread, sequential execution and every graph
    optimisation; ``providers`` default to the CPU provider.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads) or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: a missing CUDA provider is reported by us
    # No busy-waiting of the intra-op pool between runs: spinning threads steal the cores from preprocessing, the
    # refinement loop and the ROS executor (measured: PIL preprocessing 6.5 ms → 54 ms right after a spinning run).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
