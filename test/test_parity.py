"""Parity with the original implementation: every tensor of ../shared/reference (tolerances from its README)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apr_localizer import geometry as g
from apr_localizer.checkpoints import load_official_checkpoint
from apr_localizer.models import IAPR, CameraPoseLoss, MSTransformer, PoseAutoEncoder, nerf_encoding, scene_nll_loss

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def ref(reference_dir):
    def ld(name):
        return torch.load(reference_dir / name, map_location="cpu", weights_only=True)

    return {
        "inp": ld("inputs.pt"),
        "ms": ld("ms_transformer.pt"),
        "pae": ld("pae.pt"),
        "loss": ld("losses.pt"),
        "ckpt_ms": reference_dir / "checkpoints" / "ms_transformer_7scenes_t2-2_rot1-1.pth",
        "ckpt_pae": reference_dir / "checkpoints" / "pae_multiscene_256.pth",
    }


@pytest.fixture(scope="module")
def ms(ref) -> MSTransformer:
    model = load_official_checkpoint(ref["ckpt_ms"])
    assert isinstance(model, MSTransformer)
    return model


@pytest.fixture(scope="module")
def pae(ref) -> PoseAutoEncoder:
    model = load_official_checkpoint(ref["ckpt_pae"])
    assert isinstance(model, PoseAutoEncoder)
    return model


@pytest.fixture(scope="module")
def outputs(ms, ref):
    images = ref["inp"]["images"]
    with torch.inference_mode():
        return {
            "enc": ms.encode(images),
            "out": ms(images),
            "forced": ms(images, scene=ref["inp"]["given_scenes"]),
            "gt_scene": ms(images, scene=ref["inp"]["gt_scenes"]),
        }


def test_depths_are_read_from_the_keys(ms):
    c = ms.config
    assert (c.t_encoder_layers, c.t_decoder_layers, c.rot_encoder_layers, c.rot_decoder_layers) == (2, 2, 1, 1)
    assert c.num_scenes == 7 and c.nheads == 8 and c.dim_feedforward == 256 and not c.per_scene_heads


def test_backbone_features(outputs, ref):
    enc = outputs["enc"]
    torch.testing.assert_close(enc["features_t"], ref["ms"]["backbone_reduction_4"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(enc["features_rot"], ref["ms"]["backbone_reduction_3"], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("local_t", "local_descs_t"),
        ("local_rot", "local_descs_rot"),
        ("scene_logits", "scene_logits"),
        ("scene_log_probs", "scene_log_distr"),
    ],
)
def test_transformer_intermediates(outputs, ref, ours, theirs):
    torch.testing.assert_close(outputs["enc"][ours], ref["ms"][theirs], **TOL)


def test_scene_argmax_exact(outputs, ref):
    assert torch.equal(outputs["out"]["scene"], ref["ms"]["scene_argmax"])


@pytest.mark.parametrize(("ours", "theirs"), [("pose", "pose"), ("latent_t", "latent_x"), ("latent_rot", "latent_q")])
def test_outputs(outputs, ref, ours, theirs):
    torch.testing.assert_close(outputs["out"][ours], ref["ms"][theirs], **TOL)
    torch.testing.assert_close(outputs["out"]["scene_log_probs"], ref["ms"]["scene_log_distr"], **TOL)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("pose", "pose_given_scene"), ("latent_t", "latent_x_given_scene"), ("latent_rot", "latent_q_given_scene")],
)
def test_forced_scene(outputs, ref, ours, theirs):
    assert torch.equal(outputs["forced"]["scene"], ref["ms"]["given_scenes"])
    torch.testing.assert_close(outputs["forced"][ours], ref["ms"][theirs], **TOL)
    # forcing changes only the selection, not the classifier's distribution
    torch.testing.assert_close(outputs["forced"]["scene_log_probs"], ref["ms"]["scene_log_distr"], **TOL)


def test_negative_forced_scene_means_argmax(ms, ref, outputs):
    with torch.inference_mode():
        out = ms(ref["inp"]["images"], scene=torch.tensor([-1, 5, -1, 4]))
    assert out["scene"].tolist() == [4, 5, 2, 4]
    torch.testing.assert_close(out["pose"][0], outputs["out"]["pose"][0], **TOL)
    torch.testing.assert_close(out["pose"][1], outputs["forced"]["pose"][1], **TOL)


@pytest.mark.parametrize("name", ["pe_x", "pe_q", "pe_scene"])
def test_pae_positional_encoding(ref, name):
    src = {
        "pe_x": ref["inp"]["pae_poses"][:, :3],
        "pe_q": ref["inp"]["pae_poses"][:, 3:],
        "pe_scene": ref["inp"]["pae_scenes"],
    }[name]
    torch.testing.assert_close(nerf_encoding(src), ref["pae"][name], **TOL)


def test_pae_latents(pae, ref):
    with torch.inference_mode():
        out = pae(ref["inp"]["pae_poses"], ref["inp"]["pae_scenes"])
    torch.testing.assert_close(out["latent_t"], ref["pae"]["latent_x"], **TOL)
    torch.testing.assert_close(out["latent_rot"], ref["pae"]["latent_q"], **TOL)


def test_pae_pipeline_and_training_objective(ms, pae, ref, outputs):
    r = ref["pae"]
    torch.testing.assert_close(outputs["out"]["pose"], r["pipeline_apr_pose"], **TOL)
    torch.testing.assert_close(outputs["out"]["scene"].float().unsqueeze(1), r["pipeline_scene"])
    with torch.inference_mode():
        lat = pae(outputs["out"]["pose"], outputs["out"]["scene"])
        decoded = ms.decode_pose(lat["latent_t"], lat["latent_rot"])
        pose_loss = CameraPoseLoss(True, 0.0, -3.0)(decoded, ref["inp"]["gt_poses"])[0]
    torch.testing.assert_close(lat["latent_t"], r["pipeline_latent_x"], **TOL)
    torch.testing.assert_close(lat["latent_rot"], r["pipeline_latent_q"], **TOL)
    torch.testing.assert_close(decoded, r["pipeline_pose_from_encoding"], **TOL)
    mse_q = ((outputs["out"]["latent_rot"] - lat["latent_rot"]) ** 2).mean().reshape(1)
    mse_x = ((outputs["out"]["latent_t"] - lat["latent_t"]) ** 2).mean().reshape(1)
    torch.testing.assert_close(mse_q, r["train_mse_q"], **TOL)
    torch.testing.assert_close(mse_x, r["train_mse_x"], **TOL)
    torch.testing.assert_close(pose_loss.reshape(1), r["train_pose_loss"], **TOL)
    torch.testing.assert_close((mse_q + mse_x + pose_loss).reshape(1), r["train_loss"], **TOL)


def test_losses(outputs, ref):
    lo, gt = ref["loss"], ref["inp"]["gt_poses"]
    pose = outputs["out"]["pose"]
    with torch.inference_mode():
        l7 = CameraPoseLoss(True, 0.0, -3.0)(pose, gt)[0].reshape(1)
        lc = CameraPoseLoss(True, -3.0, -6.5)(pose, gt)[0].reshape(1)
        lf = CameraPoseLoss(False, 1.0, 0.0)(pose, gt)[0].reshape(1)
        nll = scene_nll_loss(outputs["out"]["scene_log_probs"], ref["inp"]["gt_scenes"]).reshape(1)
        pairs = CameraPoseLoss(True, 0.0, -3.0)(ref["inp"]["err_est_poses"], ref["inp"]["err_gt_poses"])[0]
    torch.testing.assert_close(l7, lo["pose_loss_7scenes"], **TOL)
    torch.testing.assert_close(lc, lo["pose_loss_cambridge"], rtol=1e-5, atol=0)  # ≈1215: compare relatively
    torch.testing.assert_close(lf, lo["pose_loss_cambridge_finetune"], **TOL)
    torch.testing.assert_close(nll, lo["nll_scene_loss"], **TOL)
    torch.testing.assert_close(pairs.reshape(1), lo["pairs_pose_loss_7scenes"], **TOL)


def test_training_objective_with_gt_scene(outputs, ref):
    lo = ref["loss"]
    out = outputs["gt_scene"]
    torch.testing.assert_close(out["pose"], lo["pose_gt_scene"], **TOL)
    with torch.inference_mode():
        total = CameraPoseLoss(True, 0.0, -3.0)(out["pose"], ref["inp"]["gt_poses"])[0] + scene_nll_loss(
            out["scene_log_probs"], ref["inp"]["gt_scenes"]
        )
    torch.testing.assert_close(total.reshape(1), lo["train_loss_gt_scene"], **TOL)


def test_error_metrics(outputs, ref):
    lo = ref["loss"]
    pos, rot = g.pose_errors(outputs["out"]["pose"].double().numpy(), ref["inp"]["gt_poses"].double().numpy())
    np.testing.assert_allclose(pos, lo["pose_err_position_m"].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rot, lo["pose_err_orientation_deg"].numpy(), rtol=0, atol=1e-3)
    pos, rot = g.pose_errors(ref["inp"]["err_est_poses"].numpy(), ref["inp"]["err_gt_poses"].numpy())
    np.testing.assert_allclose(pos, lo["pairs_pose_err_position_m"].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rot, lo["pairs_pose_err_orientation_deg"].numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(rot, [25, 60, 30, 180, 90, 135], atol=0.05)
    # torch variant agrees
    rot_t = g.rotation_error_deg_torch(ref["inp"]["err_est_poses"][:, 3:], ref["inp"]["err_gt_poses"][:, 3:])
    np.testing.assert_allclose(rot_t.double().numpy(), rot, atol=2e-2)


def test_iapr_built_from_reference_parts_runs(ms, pae):
    """An iAPR assembled from the reference MS-Transformer and PAE loads through the official iAPR path."""
    from apr_localizer.checkpoints import from_official_state_dict, to_official_state_dict
    from apr_localizer.models import IAPRConfig

    iapr = IAPR(IAPRConfig(ms_transformer=ms.config, pae=pae.config), ms)
    iapr.pae.load_state_dict(pae.state_dict())
    back = from_official_state_dict(to_official_state_dict(iapr))
    assert isinstance(back, IAPR)
    assert back.mstransformer.config.rot_encoder_layers == 1
    for k, v in iapr.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
