"""Quaternion convention of a model: a world-to-camera model (upstream Cambridge labels) still yields camera-to-map."""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import random_ms_transformer

from apr_localizer import geometry as g
from apr_localizer.checkpoints import CheckpointError, load_model, save_model, save_official_checkpoint
from apr_localizer.localizer import Localizer, LocalizerOptions, ModelLoadError


@pytest.fixture(scope="module")
def apr():
    return random_ms_transformer(seed=31)


def test_world_to_camera_model_is_published_camera_to_map(tmp_path, apr):
    rgb = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    ours = save_model(tmp_path / "c2w.safetensors", apr)
    upstream = save_model(tmp_path / "w2c.safetensors", apr, orientation="world_to_camera")
    assert load_model(ours).orientation == "camera_to_world"
    assert load_model(upstream).orientation == "world_to_camera"
    opts = LocalizerOptions(backend="torch", device="cpu")
    a = Localizer.from_files(ours, options=opts).localize(rgb)
    b = Localizer.from_files(upstream, options=opts).localize(rgb)
    np.testing.assert_allclose(b.pose[:3], a.pose[:3])
    # the same regressed quaternion read as R_world<-camera vs R_camera<-world: inverse rotations
    np.testing.assert_allclose(g.quat_multiply(a.orientation, b.orientation), [1, 0, 0, 0], atol=1e-9)
    assert b.orientation[0] >= 0


def test_official_checkpoint_orientation_override(tmp_path, apr):
    path = tmp_path / "cambridge.pth"
    save_official_checkpoint(apr, path)
    rgb = np.full((240, 320, 3), 90, np.uint8)
    opts = LocalizerOptions(backend="torch", device="cpu")
    a = Localizer.from_files(path, options=opts).localize(rgb)
    b = Localizer.from_files(path, options=opts, orientation="world_to_camera").localize(rgb)
    np.testing.assert_allclose(b.orientation, g.quat_conjugate(a.orientation))
    with pytest.raises(ModelLoadError, match="orientation convention"):
        Localizer.from_files(path, options=opts, orientation="sideways")


def test_bad_orientation_is_refused(tmp_path, apr):
    with pytest.raises(CheckpointError, match="orientation"):
        save_model(tmp_path / "x.safetensors", apr, orientation="sideways")
