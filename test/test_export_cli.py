"""apr-export: bundle + ONNX graphs + parity report (+ TensorRT-RTX engines) that the runtime picks up as written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import random_iapr, random_ms_transformer
from PIL import Image

from apr_localizer.checkpoints import read_metadata, save_model, save_official_checkpoint
from apr_localizer.localizer import Localizer, LocalizerOptions
from apr_training.cli.export import main as export_main
from apr_training.datasets.labels import LabelRow, write_labels
from apr_training.deploy import format_parity

pytest.importorskip("onnxruntime", reason="apr-export checks parity with ONNX Runtime")

SCENES = ["north", "south", "west"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Official checkpoints (APR + iAPR with its own encoder) and our bundle with a shared-encoder iAPR."""
    d = tmp_path_factory.mktemp("export_models")
    apr = random_ms_transformer(seed=21)
    iapr_own = random_iapr(seed=22, mstransformer=copy.deepcopy(apr))  # its own encoder object (no BN calibration)
    iapr_shared = random_iapr(seed=23, mstransformer=apr)
    return {
        "apr_pth": save_official_checkpoint(apr, d / "apr.pth"),
        "iapr_pth": save_official_checkpoint(iapr_own, d / "iapr.pth"),
        "bundle": save_model(d / "bundle.safetensors", apr, iapr_shared, scene_names=SCENES),
    }


def _frames(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(9)
    rows = []
    for i in range(n):
        rel = f"north/seq-01/frame-{i:06d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / rel)
        rows.append(LabelRow("north", "test", "seq-01", rel, (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)))
    return write_labels(root / "calib.csv", rows)


def test_export_official_checkpoints_bundle_onnx_parity(models, tmp_path, capsys):
    out = tmp_path / "deploy"
    argv = ["--model", str(models["apr_pth"]), "--iapr", str(models["iapr_pth"]), "--scene-names", ",".join(SCENES),
            "--out", str(out), "--parity-images", "1", "--threads", "2"]  # fmt: skip
    assert export_main(argv) == 0
    printed = capsys.readouterr().out
    assert "Parity torch vs ONNX Runtime (torchscript, opset 17" in printed and "PASSED" in printed

    info = json.loads((out / "export.json").read_text())
    assert info["model"] == "model.safetensors" and info["scene_names"] == SCENES
    assert info["components"] == ["apr", "iapr"] and info["onnx"]["node_default"] is True
    assert set(info["onnx"]["graphs"]) == {"apr", "encoder", "refine"}  # the iAPR has its own MS-Transformer
    for rel in info["onnx"]["graphs"].values():
        assert (out / rel).stat().st_size > 0
    parity = json.loads((out / info["parity"]["file"]).read_text())
    assert parity["passed"] and info["parity"]["passed"]
    assert {(c["graph"], c["path"]) for c in parity["cases"]} == {
        ("apr", "argmax"), ("apr", "override"), ("encoder", "argmax"), ("encoder", "override"), ("refine", "step")
    }  # fmt: skip
    meta = read_metadata(out / "model.safetensors")
    assert meta["scene_names"] == SCENES and meta["provenance"]["exported_by"].startswith("apr-export")
    readme = (out / "README.md").read_text()
    assert "model.safetensors" in readme and info["onnx"]["dir"] in readme and "cache_dir" in readme

    # the node's configuration: model.path = DIR/model.safetensors, cache_dir = DIR → the exported graphs are used
    opts = LocalizerOptions(backend="onnxruntime", device="cpu", threads=2, cache_dir=str(out))
    loc = Localizer.from_files(out / "model.safetensors", options=opts)
    assert loc.backend.export.reused and loc.backend.export.out_dir == out / info["onnx"]["dir"]
    ref = Localizer.from_files(
        models["apr_pth"], models["iapr_pth"], options=LocalizerOptions(backend="torch", device="cpu"),
        scene_names=SCENES,
    )  # fmt: skip
    rgb = np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    a, b = loc.localize(rgb), ref.localize(rgb)
    assert a.scene_name == b.scene_name and a.iterations == b.iterations == 3
    np.testing.assert_allclose(a.pose, b.pose, atol=1e-4)


def test_export_bundle_with_calibration_images_and_tensorrt_rtx(models, tmp_path, capsys):
    labels = _frames(tmp_path / "data")
    out = tmp_path / "deploy"
    argv = [
        "--model",
        str(models["bundle"]),
        "--out",
        str(out),
        "--parity-images",
        "1",
        "--threads",
        "2",
        "--calibration-labels",
        str(labels),
        "--data",
        str(tmp_path / "data"),
        "--calibration-count",
        "2",
    ]
    try:
        import tensorrt_rtx

        argv += ["--tensorrt", "--precision", "fp32"]
    except ImportError:  # TensorRT-RTX is in requirements.txt; without it only the ONNX part is checked
        tensorrt_rtx = None
    assert export_main(argv) == 0
    info = json.loads((out / "export.json").read_text())
    assert set(info["onnx"]["graphs"]) == {"apr", "refine"}  # shared encoder: no encoder graph
    parity = json.loads((out / info["parity"]["file"]).read_text())
    assert parity["n_images"] == {"random": 1, "real": 1} and parity["passed"]
    assert {c["inputs"] for c in parity["cases"]} == {"random", "real"}
    if tensorrt_rtx is not None:
        for graph in ("apr", "refine"):
            e = info["tensorrt"][graph]
            assert e["tensorrt_module"] == "tensorrt_rtx" and e["precision"] == "fp32"
            assert (out / e["file"]).stat().st_size == e["bytes"] > 0
    assert "Parity torch vs ONNX Runtime" in capsys.readouterr().out


def test_export_builds_each_tensorrt_engine_once_on_the_target(models, tmp_path, monkeypatch, capsys):
    """TensorRT 10.x generation (fake module, fake GPU): one build per graph, into the node's engine cache."""
    import sys

    import torch
    from fake_tensorrt import HostDevice, make_fake_tensorrt

    from apr_localizer.backends import tensorrt_backend

    trt = make_fake_tensorrt("10")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tensorrt_backend, "cuda_device", lambda d: HostDevice(torch.device("cpu"), "Fake Orin", (8, 7)))
    out = tmp_path / "deploy"
    argv = ["--model", str(models["bundle"]), "--out", str(out), "--parity-images", "1", "--threads", "2",
            "--tensorrt", "--precision", "fp16"]  # fmt: skip
    assert export_main(argv) == 0
    info = json.loads((out / "export.json").read_text())
    assert trt.stats["builds"] == 2 and info["node_engine_cache"] == str(out / "engines")
    cached = {json.loads(p.read_text())["graph"]: p.with_suffix(".engine") for p in (out / "engines").glob("*.json")}
    for graph, prec in (("apr", "fp16"), ("refine", "fp32")):
        assert info["tensorrt"][graph]["file"] == f"tensorrt/{graph}.{prec}.engine"
        assert (out / "tensorrt" / f"{graph}.{prec}.engine").samefile(cached[graph])  # linked, not rebuilt
    assert "TensorRT engines for this GPU cached in" in capsys.readouterr().out


def test_export_library_takes_an_options_dataclass(models, tmp_path):
    from apr_training.deploy import ExportOptions, export_deployment

    status, info = export_deployment(ExportOptions(model=models["bundle"], out=tmp_path / "d", parity_images=1))
    assert status == 0 and info["parity"]["passed"] and info["onnx"]["node_default"]
    assert json.loads((tmp_path / "d" / "export.json").read_text()) == info


def test_export_bad_input(models, tmp_path, capsys):
    assert export_main(["--model", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export_main(["--model", str(models["bundle"]), "--out", str(tmp_path / "o"), "--tensorrt", "--precision",
                     "int8"])  # fmt: skip
    assert e.value.code == 2 and "--calibration-labels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main(["--model", str(models["bundle"]), "--out", str(tmp_path / "o"), "--calibration-labels", "x.csv"])


def test_format_parity_table():
    report = {
        "passed": False,
        "failures": ["refine/random/step"],
        "tolerance": 1e-4,
        "exporter": "torchscript",
        "opset": 17,
        "cases": [
            {"graph": "apr", "inputs": "random", "path": "argmax", "images": 4, "passed": True,
             "max_abs_diff": {"pose": 1.5e-6, "scene_log_probs": 3e-6, "latent_t": 2e-6}, "scene_agreement": 1.0},
            {"graph": "refine", "inputs": "random", "path": "step", "images": 4, "passed": False,
             "max_abs_diff": {"refined_pose": 2e-3}},
        ],
    }  # fmt: skip
    text = format_parity(report)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["Graph", "Inputs", "Path"]
    assert "1.50e-06" in lines[2] and "3.00e-06" in lines[2] and "100%" in lines[2] and lines[2].endswith("pass")
    assert "2.00e-03" in lines[3] and lines[3].endswith("FAIL")
    assert "FAILED: refine/random/step" in text
