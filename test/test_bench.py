"""apr-bench runs on a CPU-only machine and writes a complete JSON report (numbers are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from model_fixtures import random_iapr, random_ms_transformer

from apr_localizer.checkpoints import DEFAULT_PREPROCESS, ModelBundle
from apr_training.bench.backends import bench_backend, input_size, summarize


def test_summarize():
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["n"] == 5 and s["p99"] > s["p90"] >= s["median"]
    assert summarize([]) == {"n": 0}


def test_backend_bench_takes_the_input_size_from_the_bundle():
    # the demo model is exported at 128 px: the benchmark must feed what the bundle's graphs take, not 224 px
    apr = random_ms_transformer(seed=3)
    bundle = ModelBundle(apr, random_iapr(seed=4, mstransformer=apr), preprocess={**DEFAULT_PREPROCESS, "crop": 96})
    assert input_size(bundle) == 96 and input_size(ModelBundle(apr)) == 224
    res = bench_backend(bundle, "torch", "fp32", "cpu", 1, 2, runs=2, rounds=1, warmup=0, threads=1,
                        seed_loop=False, cache_dir=None)  # fmt: skip
    assert {"apr graph", "iapr iteration", "apr + 2 iapr"} <= set(res["stages"])
    assert res["stages"]["apr + 2 iapr"]["n"] == 2


@pytest.mark.slow
def test_apr_bench_json_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "apr_training.cli.bench",
        "--arch",
        "small",
        "--backends",
        "torch,onnxruntime,tensorrt",
        "--runs",
        "2",
        "--rounds",
        "1",
        "--warmup",
        "1",
        "--iterations",
        "2",
        "--threads",
        "1",
        "--profile",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["torch"] and report["threads"] == 1
    torch_res = next(r for r in report["results"] if r["backend"] == "torch")
    stages = torch_res["stages"]
    seed = "seed loop: apr + 2 x (ms-transformer + iapr)"
    assert {"apr graph", "iapr iteration", "apr + 2 iapr", seed} <= set(stages)
    assert all(stages[k]["median"] > 0 for k in stages)
    assert 0 < torch_res["ratio_vs_seed_loop"] < 1
    assert report["efficiency"]["apr_gflop"] > 1 and report["efficiency"]["gemm_gflops"] > 0
    assert report["profile_torch_apr"] and report["peak_rss_mb"] > 0
    assert {"decode rgb8", "decode jpeg", "preprocess pil", "preprocess torch"} <= set(report["decode_preprocess"])
    # TensorRT cannot run without a GPU: it is reported as skipped with a reason, never a crash
    assert any(s["backend"] == "tensorrt" and s["reason"] for s in report["skipped"]) or any(
        r["backend"] == "tensorrt" for r in report["results"]
    )
    assert "apr graph" in proc.stdout
