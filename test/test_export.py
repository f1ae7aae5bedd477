"""ONNX export: graphs, manifest, exporter settings, torch-vs-ONNX-Runtime parity (random models and the reference)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from model_fixtures import random_iapr, random_images, random_ms_transformer

from apr_localizer.backends.ort_session import make_session
from apr_localizer.checkpoints import ModelBundle, load_bundle
from apr_localizer.export import (
    FORBIDDEN_OPS,
    ExportError,
    convert_onnx_fp16,
    export_onnx,
    file_sha256,
    load_export,
    parity_report,
    weights_sha256,
)
from apr_localizer.graphs import APR_INPUTS, APR_OUTPUTS, MANIFEST_NAME, PARITY_NAME, REFINE_INPUTS

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def shared_bundle() -> ModelBundle:
    apr = random_ms_transformer(seed=0)
    return ModelBundle(apr=apr, iapr=random_iapr(seed=1, mstransformer=apr), scene_names=["a", "b", "c"])


@pytest.fixture(scope="module")
def separate_bundle() -> ModelBundle:
    return ModelBundle(apr=random_ms_transformer(seed=2), iapr=random_iapr(seed=3))


@pytest.fixture(scope="module")
def shared_export(shared_bundle, tmp_path_factory):
    return export_onnx(shared_bundle, tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def separate_export(separate_bundle, tmp_path_factory):
    return export_onnx(separate_bundle, tmp_path_factory.mktemp("separate"), batch_size=2)


def _ort(path, names, *args):
    sess = make_session(path, threads=2)
    out = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
    return {o.name: torch.from_numpy(v) for o, v in zip(sess.get_outputs(), out)}


def _static(model: onnx.ModelProto) -> bool:
    values = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    return all(d.HasField("dim_value") for v in values for d in v.type.tensor_type.shape.dim)


# ------------------------------------------------------------------------------------------------ files and manifest
def test_shared_encoder_export_has_apr_and_refine_only(shared_export):
    assert set(shared_export.files) == {"apr", "refine"}
    names = sorted(p.name for p in shared_export.out_dir.iterdir())
    assert names == ["apr.onnx", MANIFEST_NAME, "refine.onnx"]  # single-file ONNX: no external data files
    assert shared_export.exporter == "torchscript" and shared_export.opset == 17
    assert not shared_export.reused


def test_manifest_contents(shared_export, shared_bundle):
    m = json.loads(shared_export.manifest_path.read_text())
    assert m == shared_export.manifest
    assert m["exporter"] == "torchscript" and m["opset"] == 17 and m["batch_size"] == 1
    assert m["scene_names"] == ["a", "b", "c"] and m["shares_encoder"] is True
    assert m["preprocess"]["crop"] == 224 and m["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert "w-first" in m["quaternion_convention"] and "qw" in m["pose_convention"]
    assert m["source_model_sha256"] == weights_sha256(shared_bundle)
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["onnx"] == onnx.__version__
    for meta in m["graphs"].values():
        path = shared_export.out_dir / meta["file"]
        assert meta["sha256"] == file_sha256(path) and meta["bytes"] == path.stat().st_size
    apr = m["graphs"]["apr"]
    assert [(e["name"], e["shape"], e["dtype"]) for e in apr["inputs"]] == [
        ("image", [1, 3, 224, 224], "float32"),
        ("scene_override", [1], "int64"),
    ]
    assert [(e["name"], e["shape"], e["dtype"]) for e in apr["outputs"]] == [
        ("pose", [1, 7], "float32"),
        ("scene_log_probs", [1, 3], "float32"),
        ("scene", [1], "int64"),
        ("latent_t", [1, 256], "float32"),
        ("latent_rot", [1, 256], "float32"),
    ]
    refine = m["graphs"]["refine"]
    assert [e["name"] for e in refine["inputs"]] == list(REFINE_INPUTS)
    assert [(e["name"], e["shape"]) for e in refine["outputs"]] == [("refined_pose", [1, 7])]


def test_weights_hash_tracks_weights(shared_bundle, separate_bundle):
    assert weights_sha256(shared_bundle) == weights_sha256(shared_bundle)
    assert weights_sha256(shared_bundle) != weights_sha256(separate_bundle)
    apr = random_ms_transformer(seed=0)
    other = ModelBundle(apr=apr, iapr=random_iapr(seed=1, mstransformer=apr))
    assert weights_sha256(other) == weights_sha256(shared_bundle)  # same seeds, same weights
    with torch.no_grad():
        other.iapr.rel_x_token.add_(1e-3)
    assert weights_sha256(other) != weights_sha256(shared_bundle)


@pytest.mark.parametrize("which", ["shared_export", "separate_export"])
def test_graphs_are_checked_static_and_free_of_control_flow(which, request):
    export = request.getfixturevalue(which)
    for graph, path in export.files.items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        ops = Counter(n.op_type for n in model.graph.node)
        assert not set(ops) & FORBIDDEN_OPS, (graph, ops)
        assert "Shape" not in ops, "fixed-batch graphs must have their shape computations folded"
        assert _static(model)
        assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
        assert export.manifest["graphs"][graph]["exporter_nodes"] > len(model.graph.node)


def test_separate_encoder_export(separate_export, separate_bundle):
    assert set(separate_export.files) == {"apr", "encoder", "refine"}
    g = separate_export.manifest["graphs"]
    assert g["apr"]["sha256"] != g["encoder"]["sha256"]  # the encoder carries the iAPR's own weights
    assert g["encoder"]["inputs"][0]["shape"] == [2, 3, 224, 224]
    assert separate_export.manifest["shares_encoder"] is False
    images = random_images(2, seed=5)
    scene = torch.tensor([2, 0])
    got = _ort(separate_export.path("encoder"), APR_INPUTS, images, scene)
    with torch.no_grad():
        lt, lr = separate_bundle.iapr.query_latents(images, scene)
    torch.testing.assert_close(got["latent_t"], lt, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["latent_rot"], lr, rtol=1e-4, atol=1e-4)
    assert torch.equal(got["scene"], scene)


# ------------------------------------------------------------------------------------------------ parity
def test_ort_matches_torch_on_argmax_and_override_paths(shared_export, shared_bundle):
    apr = shared_bundle.apr
    for seed in (11, 12):
        x = random_images(1, seed=seed)
        with torch.no_grad():
            ref = apr(x)
            forced_scene = (ref["scene"] + 1) % 3
            ref_forced = apr(x, forced_scene)
        got = _ort(shared_export.path("apr"), APR_INPUTS, x, torch.tensor([-1]))
        got_forced = _ort(shared_export.path("apr"), APR_INPUTS, x, forced_scene)
        for r, g in ((ref, got), (ref_forced, got_forced)):
            assert torch.equal(r["scene"], g["scene"])
            for k in APR_OUTPUTS:
                if k != "scene":
                    torch.testing.assert_close(g[k], r[k], rtol=1e-4, atol=1e-4)
        assert torch.equal(got_forced["scene"], forced_scene)
        assert not torch.allclose(got_forced["pose"], got["pose"], atol=1e-4)  # the override selects other latents
        with torch.no_grad():
            refined = shared_bundle.iapr.step(ref["latent_t"], ref["latent_rot"], ref["pose"], ref["scene"])
        got_ref = _ort(
            shared_export.path("refine"), REFINE_INPUTS, ref["latent_t"], ref["latent_rot"], ref["pose"], ref["scene"]
        )
        torch.testing.assert_close(got_ref["refined_pose"], refined, rtol=1e-4, atol=1e-4)
        assert got_ref["refined_pose"][0, 3] >= 0 and abs(float(got_ref["refined_pose"][0, 3:].norm()) - 1) < 1e-5


def test_parity_report_structure(shared_export, shared_bundle):
    rep = parity_report(shared_bundle, shared_export.out_dir, n_images=2, seed=4, images=random_images(1, seed=9))
    assert rep["passed"] and rep["failures"] == []
    assert json.loads((shared_export.out_dir / PARITY_NAME).read_text()) == json.loads(json.dumps(rep))
    assert rep["n_images"] == {"random": 2, "real": 1} and rep["tolerance"] == 1e-4
    assert rep["exporter"] == "torchscript" and rep["opset"] == 17 and rep["providers"] == ["CPUExecutionProvider"]
    cases = {(c["graph"], c["inputs"], c["path"]): c for c in rep["cases"]}
    assert set(cases) == {
        (g, i, p) for i in ("random", "real") for g, p in (("apr", "argmax"), ("apr", "override"), ("refine", "step"))
    }
    for (graph, _, _), c in cases.items():
        assert c["passed"]
        if graph == "apr":
            assert set(c["max_abs_diff"]) == {"pose", "scene_log_probs", "latent_t", "latent_rot"}
            assert c["scene_agreement"] == 1.0 and c["max_abs_diff"]["pose"] <= 1e-4
        else:
            assert c["max_abs_diff"]["refined_pose"] <= 1e-4


def test_parity_report_with_batch_two_and_encoder(separate_export, separate_bundle):
    rep = parity_report(separate_bundle, separate_export.out_dir, n_images=1)  # one batch of 2, padded
    assert rep["passed"], rep["failures"]
    assert rep["batch_size"] == 2
    assert {c["graph"] for c in rep["cases"]} == {"apr", "encoder", "refine"}
    assert all(c["images"] == 1 for c in rep["cases"])


def test_parity_report_refuses_export_of_other_weights(shared_export, separate_bundle):
    with pytest.raises(ExportError, match="different weights"):
        parity_report(separate_bundle, shared_export.out_dir)


def test_parity_report_exports_when_needed(tmp_path):
    bundle = ModelBundle(apr=random_ms_transformer(seed=6))
    rep = parity_report(bundle, tmp_path / "new", n_images=1)
    assert rep["passed"] and (tmp_path / "new" / "apr.onnx").is_file()
    assert {c["graph"] for c in rep["cases"]} == {"apr"}  # no iAPR: no refine graph


def test_load_export_detects_corruption(shared_export, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shared_export.out_dir, copy)
    assert load_export(copy).files.keys() == shared_export.files.keys()
    data = bytearray((copy / "refine.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "refine.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256"):
        load_export(copy)
    (copy / "refine.onnx").unlink()
    with pytest.raises(ExportError, match="missing"):
        load_export(copy)
    with pytest.raises(ExportError, match="no ONNX export manifest"):
        load_export(tmp_path / "nothing")


def test_bad_export_settings(shared_bundle, tmp_path):
    with pytest.raises(ExportError, match="dynamo"):
        export_onnx(shared_bundle, tmp_path, opset=17, dynamo=True)
    with pytest.raises(ExportError, match="batch_size"):
        export_onnx(shared_bundle, tmp_path, batch_size=0)
    with pytest.raises(ExportError, match="opset 9"):
        export_onnx(shared_bundle, tmp_path, opset=9)


def test_fp16_conversion_keeps_io_and_layernorm_fp32(shared_export, shared_bundle, tmp_path):
    dst = convert_onnx_fp16(shared_export.path("apr"), tmp_path / "apr16.onnx")
    model = onnx.load(str(dst))
    onnx.checker.check_model(model)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64]
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    ln = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    fp16_inits = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert ln and not any(set(n.input) & fp16_inits for n in ln)
    x = random_images(1, seed=21)
    got = _ort(dst, APR_INPUTS, x, torch.tensor([-1]))
    with torch.no_grad():
        ref = shared_bundle.apr(x)
    assert got["pose"].dtype == torch.float32
    assert float((got["pose"] - ref["pose"]).abs().max()) < 5e-2


@pytest.mark.slow
def test_dynamo_export_opset18(shared_bundle, tmp_path):
    export = export_onnx(shared_bundle, tmp_path, dynamo=True)
    assert export.exporter == "dynamo" and export.opset == 18
    for path in export.files.values():
        model = onnx.load(str(path))
        assert not {n.op_type for n in model.graph.node} & FORBIDDEN_OPS
        assert _static(model)
    rep = parity_report(shared_bundle, tmp_path, n_images=2)
    assert rep["passed"], rep["failures"]


# ------------------------------------------------------------------------------------------------ reference checkpoint
@pytest.fixture(scope="module")
def reference(reference_dir):
    bundle = load_bundle(reference_dir / "checkpoints" / "ms_transformer_7scenes_t2-2_rot1-1.pth")
    inputs = torch.load(reference_dir / "inputs.pt", weights_only=True)
    outputs = torch.load(reference_dir / "ms_transformer.pt", weights_only=True)
    return bundle, inputs, outputs


def test_reference_checkpoint_export_and_parity(reference, tmp_path):
    bundle, inputs, ref = reference
    export = export_onnx(bundle, tmp_path)
    assert set(export.files) == {"apr"}
    assert export.manifest["scene_names"][0] == "chess"
    rep = parity_report(bundle, tmp_path, n_images=1, images=inputs["images"])
    assert rep["passed"], rep["failures"]
    real = [c for c in rep["cases"] if c["inputs"] == "real"]
    assert {c["path"] for c in real} == {"argmax", "override"} and all(c["images"] == 4 for c in real)
    # ONNX Runtime against the original implementation's outputs, image by image (batch 1 graph)
    sess = make_session(export.path("apr"), threads=2)
    for i in range(4):
        x = inputs["images"][i : i + 1].numpy()
        pose, _, scene, lt, _ = sess.run(None, {"image": x, "scene_override": np.array([-1])})
        assert int(scene[0]) == int(ref["scene_argmax"][i])
        torch.testing.assert_close(torch.from_numpy(pose[0]), ref["pose"][i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(lt[0]), ref["latent_x"][i], rtol=1e-4, atol=1e-4)
        forced = np.array([int(ref["given_scenes"][i])])
        pose_f, _, scene_f, _, _ = sess.run(None, {"image": x, "scene_override": forced})
        assert int(scene_f[0]) == int(forced[0])
        torch.testing.assert_close(torch.from_numpy(pose_f[0]), ref["pose_given_scene"][i], rtol=1e-4, atol=1e-4)
