"""The torch backend's CUDA paths: CUDA graphs over the whole APR + iAPR loop, fp32 without TF32, fp16/bf16 autocast.

The CPU tests check what can be checked without a GPU (the captured loop body equals the generic loop, the TF32
switches are restored); the gpu-marked tests compare the full pose (position, orientation error in degrees, scene,
scene confidence) of a model WITH an iAPR, with and without CUDA graphs.
"""

from __future__ import annotations

import math

import pytest
import torch
from model_fixtures import random_iapr, random_images, random_ms_transformer

from apr_localizer import geometry as g
from apr_localizer.backends.base import Backend, BackendOptions, Steps
from apr_localizer.backends.torch_backend import TorchBackend, _tf32
from apr_localizer.checkpoints import ModelBundle

torch.set_num_threads(2)


@pytest.fixture(scope="module", params=["shared-encoder", "own-encoder"])
def bundle(request) -> ModelBundle:
    apr = random_ms_transformer(seed=0)
    iapr = random_iapr(seed=1, mstransformer=apr if request.param == "shared-encoder" else None)
    return ModelBundle(apr=apr, iapr=iapr)


def _compare(a: Steps, b: Steps, pos_tol: float, deg_tol: float, conf_tol: float) -> None:
    """Full-pose agreement of two runs: every step's position and orientation, the scene and its confidence."""
    assert torch.equal(a.scene.cpu(), b.scene.cpu())
    assert len(a.poses) == len(b.poses)
    for pa, pb in zip(a.poses, b.poses):
        pa, pb = pa.double().cpu(), pb.double().cpu()
        assert float((pa[:, :3] - pb[:, :3]).abs().max()) <= pos_tol
        assert float(g.rotation_error_deg_torch(pa[:, 3:], pb[:, 3:]).max()) <= deg_tol
    conf_a, conf_b = (s.scene_log_probs.max(dim=1).values.exp().cpu() for s in (a, b))
    assert float((conf_a - conf_b).abs().max()) <= conf_tol


# ------------------------------------------------------------------------------------------------ CPU
def test_tf32_switches_are_set_for_the_block_and_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with _tf32(False):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    with _tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_captured_loop_body_equals_the_generic_loop(bundle):
    """The body a CUDA graph captures (APR, own encoder, N steps in one function) computes Backend.run_steps."""
    be = TorchBackend(bundle, BackendOptions(device="cpu", threads=2))
    x = random_images(1, seed=3).contiguous(memory_format=torch.channels_last)
    ref = Backend.run_steps(be, x, 3)
    with torch.inference_mode():
        out = be._steps_body(x, torch.full((1,), -1, dtype=torch.int64), 3)
    got = Steps(list(out[:4]), out[4], out[5], out[6], out[7])
    _compare(got, ref, 0.0, 1e-4, 0.0)  # acos(1 - eps): ~2e-6 degrees for identical quaternions
    _compare(be.run_steps(x, 3), ref, 0.0, 1e-4, 0.0)  # without cuda_graphs: the generic loop itself


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_graph_loop_matches_eager_full_pose(bundle, precision):
    """APR + 3 iAPR steps as ONE CUDA graph vs the same precision eagerly: the same poses, scene and confidence."""
    opts = {"device": "cuda", "precision": precision}
    eager = TorchBackend(bundle, BackendOptions(**opts))
    graphs = TorchBackend(bundle, BackendOptions(**opts, cuda_graphs=True))
    for seed in range(3):
        x = random_images(1, seed=seed).cuda()
        a, b = graphs.run_steps(x, 3), eager.run_steps(x, 3)
        assert all(p.is_cuda and torch.isfinite(p).all() for p in a.poses)
        _compare(a, b, 1e-3, 0.05, 1e-3)
        timed = graphs.run_steps(x, 3, timed=True)  # one graph per stage: every step's pose kept, not overwritten
        _compare(timed, b, 1e-3, 0.05, 1e-3)
        assert set(timed.timings_ms) >= {"apr", "step1", "step3"}
    assert ("steps", 3) in graphs._graphs  # one graph for the whole loop


@pytest.mark.gpu
def test_cuda_fp32_without_tf32_matches_the_cpu(bundle):
    """fp32 on CUDA is fp32 (TF32 off): the full pose agrees with the CPU within fp32 rounding."""
    x = random_images(1, seed=7)
    gpu = TorchBackend(bundle, BackendOptions(device="cuda", cuda_graphs=True)).run_steps(x.cuda(), 3)
    cpu = TorchBackend(bundle, BackendOptions(device="cpu", threads=2)).run_steps(x, 3)
    _compare(gpu, cpu, 1e-3, 0.05, 1e-3)


@pytest.mark.gpu
def test_cuda_graph_outputs_stay_valid_after_the_next_replay(bundle):
    be = TorchBackend(bundle, BackendOptions(device="cuda", precision="fp16", cuda_graphs=True))
    first = be.run_steps(random_images(1, seed=1).cuda(), 2)
    kept = [p.clone() for p in first.poses]
    be.run_steps(random_images(1, seed=2).cuda(), 2)
    assert all(torch.equal(k, p) for k, p in zip(kept, first.poses))


@pytest.mark.gpu
def test_low_precision_stays_close_to_fp32(bundle):
    """fp16/bf16 autocast against fp32 on a random model: the same clear scene, orientation within a few degrees."""
    x = random_images(1, seed=5).cuda()
    ref = TorchBackend(bundle, BackendOptions(device="cuda")).run_steps(x, 3)
    clear = float(ref.scene_log_probs.max().exp()) > 0.6  # a near-tie of random weights may flip in low precision
    for precision, deg in (("fp16", 5.0), ("bf16", 15.0)):
        got = TorchBackend(bundle, BackendOptions(device="cuda", precision=precision, cuda_graphs=True)).run_steps(x, 3)
        if not torch.equal(got.scene, ref.scene):
            assert not clear, precision
            continue  # another scene's pose heads: nothing to compare
        err = float(g.rotation_error_deg_torch(got.pose.double(), ref.pose.double()).max())
        assert math.isfinite(err) and err <= deg, (precision, err)
