"""Localizer (torch backend): equals the model run directly; options, encodings, refinement, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import random_iapr, random_ms_transformer
from PIL import Image

from apr_localizer import geometry as g
from apr_localizer.checkpoints import ModelBundle, save_model
from apr_localizer.imaging import encode_raw
from apr_localizer.localizer import Localizer, LocalizerOptions, ModelLoadError
from apr_localizer.preprocess import PreprocessConfig, preprocess


@pytest.fixture(scope="module")
def ref_model(reference_dir):
    return reference_dir / "checkpoints" / "ms_transformer_7scenes_t2-2_rot1-1.pth"


@pytest.fixture(scope="module")
def frames(reference_dir):
    return [np.asarray(Image.open(reference_dir / "raw_images" / f"raw_{i}.png").convert("RGB")) for i in range(4)]


def test_reference_checkpoint_matches_reference_outputs(ref_model, frames, reference_dir):
    ref = torch.load(reference_dir / "ms_transformer.pt", weights_only=True)
    loc = Localizer.from_files(ref_model, options=LocalizerOptions(backend="torch", device="cpu"))
    assert loc.scene_names[0] == "chess" and loc.backend_name == "torch" and loc.iterations == 0
    for i, frame in enumerate(frames):
        est = loc.localize(frame)
        raw = ref["pose"][i].double().numpy()
        np.testing.assert_allclose(est.apr_pose, raw, atol=1e-4)
        np.testing.assert_allclose(est.position, raw[:3], atol=1e-4)
        assert g.rotation_error_deg(est.orientation, raw[3:]) < 1e-2 and est.orientation[0] >= 0
        assert est.scene_id == int(ref["scene_argmax"][i])
        assert est.confidence == pytest.approx(float(ref["scene_log_distr"][i, est.scene_id].exp()), abs=1e-4)
        assert est.is_finite() and set(est.timings_ms) >= {"preprocess", "apr", "iapr", "postprocess", "total"}


def test_iapr_bundle_refines_and_matches_model(tmp_path):
    apr = random_ms_transformer(seed=41)
    iapr = random_iapr(seed=42, mstransformer=apr)
    path = save_model(tmp_path / "m.safetensors", apr, iapr, scene_names=["a", "b", "c"])
    loc = Localizer.from_files(path, options=LocalizerOptions(backend="torch", iapr_iterations=3))
    rgb = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    est = loc.localize(rgb)
    assert est.iterations == 3 and est.scene_name in ("a", "b", "c")
    x = preprocess(rgb, PreprocessConfig())
    with torch.inference_mode():
        out = apr(x)
        pose = out["pose"]
        for _ in range(3):
            pose = iapr.step(out["latent_t"], out["latent_rot"], pose, out["scene"])
    np.testing.assert_allclose(est.pose, pose[0].double().numpy(), atol=1e-4)  # BatchNorm folded in the backend
    assert not np.allclose(est.pose[:3], est.apr_pose[:3])
    assert loc.localize(rgb, iterations=0).iterations == 0


def test_separate_encoder_bundle_runs_the_encoder_graph(tmp_path):
    apr = random_ms_transformer(seed=51)
    iapr = random_iapr(seed=52)
    loc = Localizer(ModelBundle(apr=apr, iapr=iapr), LocalizerOptions(backend="torch", iapr_iterations=2))
    assert loc.backend.needs_encoder
    rgb = np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    est = loc.localize(rgb)
    with torch.inference_mode():
        out = apr(preprocess(rgb))
        ref = iapr.refine(preprocess(rgb), out["pose"], out["scene"], 2)["pose"]
    np.testing.assert_allclose(est.pose, ref[0].double().numpy(), atol=1e-4)


@pytest.mark.parametrize("encoding", ["bgr8", "rgba8", "bgra8"])
def test_other_encodings_give_the_same_estimate(ref_model, frames, encoding):
    loc = Localizer.from_files(ref_model, options=LocalizerOptions(backend="torch"))
    data, _ = encode_raw(frames[0], encoding)
    arr = np.frombuffer(data, np.uint8).reshape(frames[0].shape[0], frames[0].shape[1], -1)
    np.testing.assert_allclose(loc.localize(arr, encoding).pose, loc.localize(frames[0]).pose, atol=1e-9)


def test_bad_files_and_options_fail_with_one_sentence(tmp_path, ref_model):
    with pytest.raises(ModelLoadError, match="no such checkpoint file"):
        Localizer.from_files(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match=r"junk\.pth: cannot be read"):
        Localizer.from_files(tmp_path / "junk.pth")
    with pytest.raises(ModelLoadError, match="backend 'nope' is not one of"):
        Localizer.from_files(ref_model, options=LocalizerOptions(backend="nope"))
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        Localizer.from_files(ref_model, options=LocalizerOptions(backend="torch", device="cpu", precision="fp16"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device is available"):
            Localizer.from_files(ref_model, options=LocalizerOptions(backend="torch", device="cuda"))


def test_non_finite_model_output_is_reported(tmp_path):
    apr = random_ms_transformer(seed=61)
    with torch.no_grad():
        apr.regressor_head_rot.fc_o.weight.zero_()
        apr.regressor_head_rot.fc_o.bias.zero_()
    loc = Localizer(ModelBundle(apr=apr), LocalizerOptions(backend="torch"))
    est = loc.localize(np.zeros((64, 64, 3), np.uint8))
    assert not est.is_finite()


@pytest.mark.gpu
def test_cuda_torch_backend_matches_cpu(ref_model, frames):
    cpu = Localizer.from_files(ref_model, options=LocalizerOptions(backend="torch", device="cpu"))
    for precision, tol in (("fp32", 1e-3), ("fp16", 5e-2)):
        gpu = Localizer.from_files(
            ref_model, options=LocalizerOptions(backend="torch", device="cuda", precision=precision, cuda_graphs=True)
        )
        for f in frames:
            np.testing.assert_allclose(gpu.localize(f).pose[:3], cpu.localize(f).pose[:3], atol=tol)


def test_stage_timings_can_be_turned_off(ref_model, frames):
    """Per-stage timings synchronise the device after every stage; off, only the end-to-end numbers remain."""
    loc = Localizer.from_files(ref_model, options=LocalizerOptions(backend="torch", device="cpu", stage_timings=False))
    est = loc.localize(frames[0])
    assert "apr" not in est.timings_ms and {"preprocess", "total"} <= set(est.timings_ms)
    assert Localizer.from_files(ref_model, options=LocalizerOptions(backend="torch", device="cpu")).stage_timings


def test_int8_calibration_images_reach_the_backend(tmp_path, ref_model, frames):
    """``calibration_dir`` (node parameter ``int8_calibration_dir``) becomes the backend's preprocessed images."""
    for i, frame in enumerate(frames[:3]):
        Image.fromarray(frame).save(tmp_path / f"f{i}.png")
    opts = LocalizerOptions(backend="torch", device="cpu", calibration_dir=str(tmp_path), calibration_count=2)
    loc = Localizer.from_files(ref_model, options=opts)
    calib = loc.backend.options.calibration_images
    assert calib is not None and tuple(calib.shape) == (2, 3, 224, 224)
    torch.testing.assert_close(calib[0:1], loc.preprocess(frames[0]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no .png/.jpg images"):
        Localizer.from_files(ref_model, options=LocalizerOptions(backend="torch", calibration_dir=str(empty)))
