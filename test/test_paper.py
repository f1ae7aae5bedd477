"""Paper-format evaluation: thresholds, several test CSVs, the mean-of-medians row, published numbers beside ours."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apr_localizer.geometry import quat_multiply
from apr_training.datasets.labels import LabelError, LabelRow, write_labels
from apr_training.evaluation.metrics import per_scene_metrics
from apr_training.evaluation.paper import (
    PAPER_THRESHOLDS,
    detect_dataset,
    paper_rows,
    paper_table,
    parse_thresholds,
    read_label_csvs,
)


def test_parse_thresholds_units_and_errors():
    assert parse_thresholds("5cm/5deg, 0.25/2") == ((0.05, 5.0), (0.25, 2.0))
    assert parse_thresholds("0.5m/5°") == ((0.5, 5.0),)
    assert (0.05, 5.0) in PAPER_THRESHOLDS
    for bad in ("5cm", "x/5", "0/5", ""):
        with pytest.raises(ValueError, match="--thresholds"):
            parse_thresholds(bad)


def _rows(scene: str, n: int) -> list[LabelRow]:
    return [LabelRow(scene, "test", "seq-01", f"{scene}/f{i}.png", (float(i), 0.0, 0.0, 1.0, 0.0, 0.0, 0.0))
            for i in range(n)]  # fmt: skip


def test_several_csvs_merge_in_order_and_refuse_duplicates(tmp_path):
    a = write_labels(tmp_path / "abs_7scenes_pose.csv_fire_test.csv", _rows("fire", 3))
    b = write_labels(tmp_path / "abs_7scenes_pose.csv_chess_test.csv", _rows("chess", 2))
    table = read_label_csvs([a, b], tmp_path)
    assert table.scene == ["fire"] * 3 + ["chess"] * 2 and table.scenes == ["chess", "fire"]
    assert list(table.scene_id) == [1, 1, 1, 0, 0]
    model_order = read_label_csvs([a, b], tmp_path, scene_names=["fire", "chess", "heads"])
    assert list(model_order.scene_id) == [0, 0, 0, 1, 1]
    assert detect_dataset(table.scenes) == "7scenes" and detect_dataset(["ShopFacade"]) == "cambridge"
    assert detect_dataset(["lab"]) is None
    with pytest.raises(LabelError, match="listed in both"):
        read_label_csvs([a, a], tmp_path)


def _rotate_z(deg: float) -> np.ndarray:
    h = np.radians(deg) / 2
    return np.array([np.cos(h), 0.0, 0.0, np.sin(h)])


def test_paper_table_per_scene_mean_of_medians_and_published_numbers():
    # chess: 4 frames 3 cm / 2° off (inside 5 cm / 5°); fire: 2 frames 31 cm / 10° off (outside every fine bin)
    gt, est, scenes = [], [], []
    for scene, n, dt, dr in (("chess", 4, 0.03, 2.0), ("fire", 2, 0.31, 10.0)):
        for i in range(n):
            g = np.r_[i, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
            gt.append(g)
            est.append(np.r_[g[:3] + [dt, 0, 0], quat_multiply(g[3:], _rotate_z(dr))])
            scenes.append(scene)
    rep = per_scene_metrics(np.array(est), np.array(gt), scenes, name="MS-Transformer", thresholds=PAPER_THRESHOLDS)
    header, rows = paper_rows(rep, "7scenes")
    assert header[:4] == ["scene", "frames", "MS-Transformer (median)", "published MS-Transformer"]
    assert "0.05m/5deg" in header
    col = header.index("0.05m/5deg")
    chess, fire, avg = rows
    assert chess[:4] == ["chess", "4", "0.03 m / 2.00°", "0.11 m / 4.66°"] and chess[col] == "100.0 %"
    assert fire[:4] == ["fire", "2", "0.31 m / 10.00°", "0.24 m / 9.60°"] and fire[col] == "0.0 %"
    # the average row is the mean of the per-scene medians (0.17 m / 6°), not the pooled median
    assert avg[:4] == ["average (mean of medians)", "6", "0.17 m / 6.00°", "0.18 m / 7.28°"]
    assert avg[col] == "66.7 %"
    text = paper_table([rep], "7scenes", markdown=True)
    assert "| chess |" in text and "mean of the per-scene medians" in text
    iapr = per_scene_metrics(np.array(est), np.array(gt), scenes, name="+ iAPR (3 it.)", thresholds=PAPER_THRESHOLDS)
    assert "0.17 m / 6.69°" in paper_table([rep, iapr], "7scenes")  # the iAPR README average beside iAPR


def test_apr_eval_several_csvs_prints_the_paper_table(tmp_path, capsys):
    from model_fixtures import random_ms_transformer
    from PIL import Image

    from apr_localizer.checkpoints import save_model
    from apr_training.cli.eval import main as eval_main

    model = tmp_path / "model.safetensors"
    save_model(model, random_ms_transformer(num_scenes=2), scene_names=["chess", "fire"])
    rng = np.random.default_rng(0)
    csvs = []
    for scene in ("fire", "chess"):
        rows = _rows(scene, 2)
        for r in rows:
            (tmp_path / scene).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / r.img_path)
        csvs.append(str(write_labels(tmp_path / f"abs_7scenes_pose.csv_{scene}_test.csv", rows)))
    out = tmp_path / "eval"
    argv = ["--model", str(model), "--data", str(tmp_path), "--labels", *csvs, "--out", str(out), "--paper",
            "--backend", "torch", "--device", "cpu", "--no-plots", "--warmup", "0"]  # fmt: skip
    assert eval_main(argv) == 0
    printed = capsys.readouterr().out
    for text in (printed, (out / "paper.md").read_text()):
        assert "0.05m/5deg" in text and "average (mean of medians)" in text
        assert "0.11 m / 4.66°" in text and "0.18 m / 7.28°" in text  # chess and the average, published
    report = json.loads((out / "report.json").read_text())
    assert [s["scene"] for s in report["methods"][0]["scenes"]] == ["chess", "fire"]
    assert report["methods"][0]["overall"]["n"] == 4
    with pytest.raises(SystemExit):
        eval_main([*argv, "--thresholds", "5cm"])
    assert "--thresholds" in capsys.readouterr().err
