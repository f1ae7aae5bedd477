"""apr-bench node: publisher process → localizer_node → this-side subscriber, a short run with every JSON field.

Numbers are measured, never asserted beyond sanity (counts add up, latencies positive and ordered).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = "checkpoints/ms_transformer_7scenes_t2-2_rot1-1.pth"

PHASE_KEYS = {
    "phase",
    "rate_hz",
    "duration_s",
    "published",
    "publisher_wall_s",
    "publisher_lateness_ms",
    "publish_call_ms",
    "received",
    "received_fraction",
    "output_rate_hz",
    "end_to_end_ms",
    "backend_ms_median_in_process",
    "node_inference_ms_p50",
    "node_inference_ms_p90",
    "overhead_ms_median",
    "overhead_ms_median_vs_in_process",
    "node_latency_ms_p50",
    "node_frames_received",
    "node_frames_processed",
    "node_poses_published",
    "dropped_frames",
    "dropped_unprocessed",
    "dropped_in_transport",
    "node_rss_start_mb",
    "node_rss_end_mb",
    "node_rss_peak_mb",
    "node_rss_growth_pct",
    "node_rss_samples_mb",
    "node_cpu_percent",
}


def test_cli_rejects_bad_rates():
    from apr_training.cli.bench_node import main

    with pytest.raises(SystemExit):
        main(["--rates", "15,fast"])
    with pytest.raises(SystemExit):
        main(["--rates", "0"])


@pytest.mark.ros
@pytest.mark.slow
def test_short_node_bench_writes_every_field(tmp_path, reference_dir, ros_env):
    out = tmp_path / "node_bench.json"
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "apr_training.cli.bench_node", "--model", str(reference_dir / CHECKPOINT),
           "--rates", "15", "--duration", "3", "--flood-rate", "40", "--flood-duration", "2", "--warmup", "0",
           "--backend", "torch", "--device", "cpu", "--threads", "1", "--backend-runs", "3",
           "--log-dir", str(logs), "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=ros_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    node = report["node"]
    assert node["node_exit_code"] == 0 and node["node_backend"] == "torch" and node["node_device"] == "cpu"
    assert node["backend_in_process"]["backend"] == "torch"
    assert node["backend_in_process"]["localize_ms"]["median"] > 0
    assert node["image"] == {"width": 640, "height": 480, "encoding": "rgb8"}
    assert node["transport"]["fastdds_profile"].endswith("fastdds_shm_big.xml")
    assert node["node_startup_s"] > 0 and node["node_rss_active_mb"] > 50
    assert [p["phase"] for p in node["phases"]] == ["15 Hz", "flood 40 Hz"]
    for p in node["phases"]:
        assert set(p) == PHASE_KEYS, set(p) ^ PHASE_KEYS
        assert p["published"] == round(p["rate_hz"] * p["duration_s"])
        assert 0 < p["received"] <= p["published"]
        assert p["node_frames_received"] <= p["published"]
        # every frame sent either produced a pose or was dropped by the node, or is one of the last samples the
        # publisher's DDS history (depth 10) still held when the phase ended: a loss there has no later frame
        # whose sequence number could reveal it to the node
        assert p["published"] - p["received"] <= p["dropped_frames"] + 10
        e = p["end_to_end_ms"]
        assert e["n"] == p["received"] and 0 < e["median"] <= e["p90"] <= e["p99"] <= e["max"]
        assert p["node_inference_ms_p50"] > 0 and p["overhead_ms_median"] is not None
        assert p["node_rss_end_mb"] > 50 and p["node_rss_growth_pct"] is not None
        assert p["node_rss_peak_mb"] >= max(p["node_rss_start_mb"], p["node_rss_end_mb"]) - 1e-6
        assert len(p["node_rss_samples_mb"]) >= 2 and p["node_cpu_percent"] > 0
    assert "e2e med" in proc.stdout and "flood 40 Hz" in proc.stdout and "node exit code 0" in proc.stdout
    assert (logs / "node.log").is_file() and (logs / "node_params.yaml").is_file()
