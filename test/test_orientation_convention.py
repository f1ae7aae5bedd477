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


def test_label_tables_know_their_convention(tmp_path):
    """``dataset.json`` beside a CSV (or in the data root) says what its quaternions mean; GT is compared as c2w."""
    import json

    from apr_training.datasets.labels import LabelError, LabelRow, read_labels, write_labels
    from apr_training.evaluation.runner import LabelSource

    q = g.quat_normalize(np.array([0.9, 0.1, -0.3, 0.2]))
    csv = write_labels(tmp_path / "t.csv", [LabelRow("s", "test", "seq1", "a.png", (1.0, 2.0, 3.0, *q))])
    assert read_labels(csv).orientation == "camera_to_world"
    np.testing.assert_array_equal(read_labels(csv).camera_to_world_pose(), read_labels(csv).pose)
    (tmp_path / "dataset.json").write_text(json.dumps({"orientation": "world_to_camera"}))
    table = read_labels(csv)
    assert table.orientation == "world_to_camera" and table.take([0]).orientation == "world_to_camera"
    np.testing.assert_allclose(table.camera_to_world_pose()[0], [1, 2, 3, *g.quat_conjugate(q)])
    np.testing.assert_allclose(LabelSource(table).gt[0], [1, 2, 3, *g.quat_conjugate(q)])
    (tmp_path / "dataset.json").write_text(json.dumps({"orientation": "upside_down"}))
    with pytest.raises(LabelError, match="orientation must be one of"):
        read_labels(csv)
