"""``apr-train pipeline`` end to end on a tiny dataset, killed once (SIGKILL during a stage) and resumed.

Stages: split by sequence → MS-Transformer → PAE → iAPR → calibration → packaging; the result loads in the Localizer.

Tiny models (transformers 1+1, 32x32 inputs, a few steps per trainer): accuracy is meaningless here, the contract
(stages, markers, resume, files, metadata) is what is checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from apr_training.train.pipeline import STAGES, format_report

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.batch_size=4", "data.workers=0", "data.resize=36", "data.crop=32", "data.cache_in_ram=false",
    "data.val_fraction=0.34", "data.pairs_per_frame=2", "model.t_encoder_layers=1", "model.t_decoder_layers=1",
    "model.rot_encoder_layers=1", "model.rot_decoder_layers=1", "iapr.rpr_dim_feedforward=64",
    "optim.warmup_steps=2", "run.n_freq_print=1", "run.checkpoint_every_steps=1",
]  # fmt: skip


def write_tiny_dataset(root: Path, scenes=("alpha", "beta"), seqs: int = 3, frames: int = 6, seed: int = 0) -> Path:
    """PNG frames (64x48) of ``scenes`` x ``seqs`` sequences along a turning walk, ``intrinsics.json``, train.csv."""
    rng = np.random.default_rng(seed)
    rows = ["scene,split,seq,img_path,t1,t2,t3,q1,q2,q3,q4"]
    for scene in scenes:
        base = rng.integers(0, 255, 3)
        for s in range(1, seqs + 1):
            (root / scene / f"seq-{s:02d}").mkdir(parents=True, exist_ok=True)
            for i in range(frames):
                yaw = 2 * np.pi * (i + s / seqs) / frames
                img = np.empty((48, 64, 3), np.uint8)
                img[:] = base
                x = int(28 + 24 * np.cos(yaw))
                img[10:38, max(0, x - 6) : x + 6] = (255 - base) // 2
                rel = f"{scene}/seq-{s:02d}/frame-{i:03d}.png"
                cv2.imwrite(str(root / rel), img)
                t = [np.cos(yaw), np.sin(yaw), 0.1 * s]
                q = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
                q = np.asarray(q) * (1 if q[0] >= 0 else -1)
                rows.append(",".join([scene, "train", f"seq-{s:02d}", rel] + [repr(float(v)) for v in [*t, *q]]))
    (root / "intrinsics.json").write_text(json.dumps({"width": 64, "height": 48, "fx": 50.0, "fy": 50.0,
                                                      "cx": 32.0, "cy": 24.0}))  # fmt: skip
    csv = root / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def _command(root: Path, csv: Path, out: Path, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "apr_training.cli.train", "pipeline", "--data", str(root), "--labels", str(csv),
           "--out", str(out), "--device", "cpu", "--max-steps", "6", "--no-progress"]  # fmt: skip
    for item in TINY:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Run the pipeline, SIGKILL it inside the MS-Transformer stage, check the refusal without --resume, resume."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    root = tmp_path / "data"
    csv = write_tiny_dataset(root)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_command(root, csv, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    state = out / "ms-transformer" / "last_state.pt"
    deadline = time.monotonic() + 600
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the pipeline ended before it could be killed: {proc.stderr.read()[-2000:]}"
    killed_in_stage = not (out / "stages" / "ms-transformer.json").exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_in_stage, "the kill should land inside the MS-Transformer stage"
    assert (out / "stages" / "split.json").exists() and not (out / "model.safetensors").exists()

    # a second run without --resume refuses to overwrite; with --resume it continues the stage from its state
    again = subprocess.run(_command(root, csv, out), cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "--resume" in again.stderr
    done = subprocess.run(_command(root, csv, out, resume=True), cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, out, done.stdout


def test_pipeline_killed_during_a_stage_resumes_and_loads(killed_and_resumed):
    root, out, stdout = killed_and_resumed
    starts = [json.loads(ln) for ln in (out / "ms-transformer" / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in starts if r.get("type") == "start"]
    assert [r["resumed"] for r in starts] == [False, True]
    assert all((out / "stages" / f"{s}.json").exists() for s in STAGES)
    assert "held-out validation frames" in stdout and "chosen:" in stdout

    # validation = whole held-out sequences, never trained on
    train = {tuple(ln.split(",")[:3:2]) for ln in (out / "split_train.csv").read_text().splitlines()[1:]}
    val = {tuple(ln.split(",")[:3:2]) for ln in (out / "split_val.csv").read_text().splitlines()[1:]}
    assert val and not (train & val)

    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"ms_transformer", "iapr_1", "iapr_2", "iapr_3"}
    assert {"auroc", "coverage_at_95_precision", "within_1sigma", "within_2sigma"} <= set(report["uncertainty"])
    assert report["chosen"] in {c["score"] for c in report["candidates"]}
    assert format_report(report).count("\n") >= 6

    from apr_localizer.checkpoints import load_model
    from apr_localizer.localizer import Localizer, LocalizerOptions

    bundle = load_model(out / "model.safetensors")
    assert bundle.uncertainty is not None and bundle.uncertainty.score == report["chosen"]
    assert bundle.camera is not None and bundle.camera["fx"] == 50.0
    loc = Localizer.from_files(out / "model.safetensors", options=LocalizerOptions(backend="torch", device="cpu"))
    est = loc.localize(cv2.cvtColor(cv2.imread(str(root / "alpha/seq-01/frame-000.png")), cv2.COLOR_BGR2RGB))
    assert est.is_finite() and est.sigma_position_m is not None and est.score_name == report["chosen"]
    loc.close()


def test_init_warm_restarts_the_ms_transformer_on_the_same_split(killed_and_resumed, tmp_path):
    """``--init``: more training time for a trained space starts from its MS-Transformer, on the same split."""
    root, out, _ = killed_and_resumed
    init = out / "ms-transformer" / "best.safetensors"
    more = tmp_path / "more"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*_command(root, root / "train.csv", more), "--init", str(init)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for split in ("split_train.csv", "split_val.csv"):  # validation stays held out from the initial model too
        assert (more / split).read_text() == (out / split).read_text()
    summary = json.loads((more / "ms-transformer" / "summary.json").read_text())
    assert summary["inputs"]["init"] == str(init)
    assert (more / "model.safetensors").is_file()


@pytest.mark.ros
def test_the_pipeline_model_runs_in_a_real_node(killed_and_resumed, tmp_path):
    """The node loads DIR/model.safetensors and publishes the calibrated sigma^2 the Localizer computes."""
    import random

    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from apr_localizer import ros_convert
    from apr_localizer.localizer import Localizer, LocalizerOptions
    from apr_training.ros_harness import WAIT_S, NodeProcess, RosHarness, wait_until, write_params

    root, out, _ = killed_and_resumed
    model = out / "model.safetensors"
    rgb = cv2.cvtColor(cv2.imread(str(root / "beta/seq-02/frame-003.png")), cv2.COLOR_BGR2RGB)
    loc = Localizer.from_files(model, options=LocalizerOptions(backend="torch", device="cpu", threads=1))
    est = loc.localize(rgb)
    loc.close()
    session = int(os.environ["ROS_DOMAIN_ID"])
    domain = random.SystemRandom().choice([d for d in range(1, 101) if d != session])
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_DOMAIN_ID=str(domain),
               ROS_LOG_DIR=str(tmp_path / "ros_log"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
               FASTDDS_DEFAULT_PROFILES_FILE=str(REPO / "config" / "fastdds_shm_big.xml"))  # fmt: skip
    name, topic = "apr_pipeline", "/pipe/cam/image_raw"
    params = {"autostart": True, "model": {"path": str(model)}, "backend": "torch", "device": "cpu", "threads": 1,
              "image_topic": topic, "output_pose": "camera", "base_frame": "",
              "gating": {"max_sigma_position_m": 0.0, "max_sigma_orientation_deg": 0.0}}  # fmt: skip
    params_file = write_params(tmp_path / "params.yaml", params, node_name=name)
    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
    harness = RosHarness(domain, name="pipeline_driver")
    node = NodeProcess(params_file, env, tmp_path / "node.log", extra_args=["-r", f"__node:={name}"])
    try:
        poses = harness.subscribe(PoseWithCovarianceStamped, f"/{name}/pose_with_covariance", reliable)
        pub = harness.publisher(Image, topic, reliable)
        harness.wait_subscribers(pub, timeout=120.0)
        stamp = ros_convert.ns_to_time(1_700_000_000_000_000_000)

        def send_and_look():
            pub.publish(ros_convert.rgb_to_image(rgb, stamp=stamp, frame_id="cam"))
            return next(iter(harness.snapshot(poses)), None)

        msg = wait_until(send_and_look, WAIT_S, "a pose from the pipeline's model", 0.3)
        cov = np.diag(np.asarray(msg.pose.covariance).reshape(6, 6))
        want = [est.sigma_position_m**2] * 3 + [est.sigma_orientation_rad**2] * 3
        np.testing.assert_allclose(cov, want, rtol=1e-4)
        np.testing.assert_allclose(ros_convert.pose_from_msg(msg.pose.pose)[:3], est.pose[:3], atol=1e-4)
    finally:
        code = node.stop()
        harness.close()
    assert code == 0, node.log()
