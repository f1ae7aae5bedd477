"""fp16 packaging keeps everything the runtime reads from a bundle's metadata."""

from __future__ import annotations

import numpy as np
from model_fixtures import random_ms_transformer

from apr_localizer.checkpoints import load_model, save_model
from apr_localizer.uncertainty import fit_calibration
from apr_training.package_model import package


def test_fp16_packaging_keeps_calibration_camera_and_convention(tmp_path):
    rng = np.random.default_rng(0)
    s = rng.random(200)
    cal = fit_calibration("step_size", s, 0.1 + s, 0.05 + 0.1 * s, bins=5)
    camera = {"fx": 300.0, "fy": 300.0, "cx": 160.0, "cy": 120.0, "width": 320, "height": 240}
    src = save_model(
        tmp_path / "src.safetensors",
        random_ms_transformer(seed=2),
        scene_names=["a", "b", "c"],
        uncertainty=cal,
        camera=camera,
        orientation="world_to_camera",
    )
    out = package(src, tmp_path / "dst.safetensors", fp16=True, command="make it")
    b = load_model(out)
    assert b.uncertainty == cal and b.camera == load_model(src).camera and b.orientation == "world_to_camera"
    assert b.scene_names == ["a", "b", "c"] and b.provenance["reproduce"] == "make it"
    assert out.stat().st_size < src.stat().st_size * 0.6
