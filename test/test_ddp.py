"""Training that scales: DDP on CPU (gloo, 2 real processes under torchrun) and resume after a real SIGKILL.

* DDP: the two ranks train on different shards of the data (the epoch order is split across ranks); after the run
  they must hold bitwise identical parameters (``summary.json``'s ``rank_parameter_digests``, one SHA-256 prefix per
  rank), which is only possible when gradients are all-reduced. Checked for the MS-Transformer and for the iAPR,
  whose MS-Transformer has parts the loss never reaches (frozen by the task so DDP does not hang on them).
* Kill/resume: a run with a state checkpoint every step is SIGKILLed mid-way, resumed, and must end with the same
  weights as an uninterrupted run, with ``metrics.jsonl`` holding every epoch once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training import REPO, _free_port, _run, _write_dataset

pytestmark = pytest.mark.slow

TINY = """\
data: {batch_size: 2, workers: 0, resize: 36, crop: 32, no_augment: false, pair_max_distance_m: 10.0,
       pair_max_angle_deg: 180.0, pairs_per_frame: 3}
model: {t_encoder_layers: 1, t_decoder_layers: 1, rot_encoder_layers: 1, rot_decoder_layers: 1}
optim: {lr: 1.0e-3, n_epochs: 2, lr_scheduler_step_size: 100}
iapr: {rpr_dim_feedforward: 64, rpr_num_encoder_layers: 1}
run: {n_freq_print: 1, progress: false}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp_data")
    _write_dataset(root)
    (root / "tiny.yaml").write_text(TINY)
    return root


def _cli(trainer: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "apr_training.cli.train", trainer, "--data", str(data), "--labels", str(data / "train.csv"),
            "--out", str(out), "--config", str(data / "tiny.yaml"), "--device", "cpu", "--log-level", "WARNING",
            *extra]  # fmt: skip


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")


def _torchrun(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "summary.json").read_text())


def _trained_params_changed(out: Path, init_digest: str | None = None) -> None:
    digests = json.loads((out / "summary.json").read_text())["rank_parameter_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests  # identical weights on both ranks
    if init_digest is not None:
        assert digests[0] != init_digest  # and they trained


def test_ddp_ms_transformer_ranks_hold_identical_weights(data, tmp_path):
    out = tmp_path / "ms"
    summary = _torchrun(_cli("ms-transformer", data, out))
    assert summary["world_size"] == 2 and summary["steps"] == 4  # 8 frames / 2 ranks / batch 2 = 2 steps per epoch
    _trained_params_changed(out)
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["type"] == "epoch"] == [1, 2]
    state = torch.load(out / "last_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2  # every rank's RNG is saved ...
    r0, r1 = (r["torch"] for r in state["rng_per_rank"])
    assert not torch.equal(r0, r1)  # ... and they differ (dropout masks are not shared across ranks)
    # resuming with another world size is refused (the per-rank RNG states would not map)
    assert _run("ms-transformer", data, out, "--resume", "--epochs", "3", "--device", "cpu") == 1


def test_ddp_iapr_with_unused_apr_parts(data, tmp_path):
    ms = tmp_path / "teacher"
    assert _run("ms-transformer", data, ms, "--epochs", "1", "--device", "cpu", config=str(data / "tiny.yaml")) == 0
    out = tmp_path / "iapr"
    summary = _torchrun(_cli("iapr", data, out, "--teacher", str(ms / "last.safetensors")))
    assert summary["world_size"] == 2 and summary["steps"] >= 2
    _trained_params_changed(out)


def test_resume_after_sigkill_equals_uninterrupted_run(data, tmp_path):
    common = ["--epochs", "3", "--set", "run.checkpoint_every_steps=1", "--set", "data.no_augment=false"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    # every run in a subprocess with the same environment (thread count), so the arithmetic is the same
    done = subprocess.run([sys.executable, *_cli("ms-transformer", data, full, *common)], env=_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, *_cli("ms-transformer", data, killed, *common)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    metrics = killed / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if steps and max(steps) >= 6:  # epoch 2 of 3 (4 steps per epoch)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = subprocess.run([sys.executable, *_cli("ms-transformer", data, killed, *common, "--resume")],
                             env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(full / "last_state.pt", weights_only=True)
    b = torch.load(killed / "last_state.pt", weights_only=True)
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (12, 3)
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-6, rtol=0), k
    records = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2, 3]
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == sorted(set(steps))  # no step logged twice
