"""Label CSV reader/writer: round trips, scene-id mapping, bad rows and missing images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apr_training.datasets import (
    LABEL_COLUMNS,
    LabelError,
    LabelRow,
    LabelTable,
    read_labels,
    validate_images,
    write_labels,
)

HEADER = ",".join(LABEL_COLUMNS)

# Rows in the layout of the shipped 7-Scenes / Cambridge CSVs (the first is model_spec.md §4.1's example; the
# Cambridge quaternion has norm 1.0431, as in the shipped files).
SHIPPED = f"""{HEADER}
chess,test,seq-03,chess/seq-03/frame-000000.color.png,-0.0513,-0.7848,-0.7011,0.9823,-0.1831,0.0323,-0.0204
heads,test,seq-01,heads/seq-01/frame-000000.color.png,-0.14959289999999997,-0.13273859999999998,0.1803477,0.9748127000000001,-0.1244482,-0.1844874,0.0147385
ShopFacade,test,seq3,ShopFacade/seq3/frame00001.png,-12.561518,-7.815853999999999,1.968957,0.6368199999999999,0.6207630000000001,-0.332124,0.314337
KingsCollege,train,seq1,KingsCollege/seq1/frame00001.png,1.0,2.0,3.0,0.75,0.5,0.5,0.4
"""


def _write(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _table(n: int = 6, seed: int = 0) -> LabelTable:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        scene = ["stairs", "chess", "fire"][i % 3]
        q = rng.normal(size=4) * rng.uniform(0.9, 1.1)
        q = q if q[0] >= 0 else -q  # files hold w >= 0
        rows.append(LabelRow(scene, "train" if i % 2 else "test", f"seq-0{i % 2}", f"{scene}/f{i}.png",
                             tuple(np.r_[rng.normal(size=3) * 10, q].tolist())))  # fmt: skip
    return LabelTable.from_rows(rows)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    table = _table(9)
    path = write_labels(tmp_path / "sub" / "out.csv", table)
    assert path.read_text().splitlines()[0] == HEADER
    back = read_labels(path)
    assert back.scene == table.scene and back.split == table.split and back.seq == table.seq
    assert back.img_path == table.img_path
    np.testing.assert_array_equal(back.pose, table.pose)  # repr floats: bit-exact
    np.testing.assert_array_equal(back.scene_id, table.scene_id)
    assert back.pose.dtype == np.float64 and back.scene_id.dtype == np.int64
    assert back.root == path.parent and back.source == path
    # writing an iterable of rows gives the same file
    again = write_labels(tmp_path / "rows.csv", list(table.rows()))
    assert again.read_text() == path.read_text()


def test_shipped_layout_and_raw_quaternions(tmp_path: Path) -> None:
    t = read_labels(_write(tmp_path, SHIPPED), dataset_root=tmp_path / "data")
    assert len(t) == 4
    assert t.root == tmp_path / "data"
    np.testing.assert_array_equal(t.pose[0], [-0.0513, -0.7848, -0.7011, 0.9823, -0.1831, 0.0323, -0.0204])
    # Cambridge quaternions are kept as written (norm != 1); unit_poses normalises them
    assert np.linalg.norm(t.pose[3, 3:]) == pytest.approx(np.sqrt(0.75**2 + 0.5**2 + 0.5**2 + 0.4**2))
    unit = t.unit_poses()
    np.testing.assert_allclose(np.linalg.norm(unit[:, 3:], axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(unit[:, :3], t.pose[:, :3])
    assert t.image_path(2) == tmp_path / "data" / "ShopFacade/seq3/frame00001.png"


def test_bom_crlf_and_blank_lines_accepted(tmp_path: Path) -> None:
    text = "\ufeff" + SHIPPED.replace("\n", "\r\n") + "\r\n"
    p = tmp_path / "crlf.csv"
    p.write_bytes(text.encode("utf-8"))
    assert len(read_labels(p)) == 4


def test_scene_ids_default_sorted(tmp_path: Path) -> None:
    t = read_labels(_write(tmp_path, SHIPPED))
    assert t.scenes == sorted(["chess", "heads", "ShopFacade", "KingsCollege"])
    assert [t.scenes[i] for i in t.scene_id] == t.scene
    assert set(t.scene_indices()) == {0, 1, 2, 3}


SEVEN = ["chess", "fire", "heads", "office", "pumpkin", "redkitchen", "stairs"]


def test_single_scene_csv_uses_model_order(tmp_path: Path) -> None:
    rows = "".join(f"fire,test,seq-01,fire/seq-01/frame-{i:06d}.color.png,0,0,0,1,0,0,0\n" for i in range(3))
    text = HEADER + "\n" + rows
    p = _write(tmp_path, text)
    assert read_labels(p).scene_id.tolist() == [0, 0, 0]  # the upstream trap
    t = read_labels(p, scene_names=SEVEN)
    assert t.scene_id.tolist() == [1, 1, 1]
    assert t.scenes == SEVEN


def test_unknown_scene_names_row(tmp_path: Path) -> None:
    p = _write(tmp_path, SHIPPED, "seven.csv")
    with pytest.raises(LabelError, match=r"row 2 of seven\.csv: scene 'heads' is not one of the model's scenes"):
        read_labels(p, scene_names=["chess", "fire"])
    with pytest.raises(LabelError, match="duplicate"):
        read_labels(p, scene_names=["chess", "chess"])


GOOD = "fire,train,seq-01,fire/a.png,0.1,0.2,0.3,1,0,0,0"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("fire,train,seq-01,fire/b.png,0.1,0.2,0.3,1,0,0", "has 10 columns; expected 11"),
        ("fire,train,seq-01,fire/b.png,0.1,abc,0.3,1,0,0,0", "column 't2' is 'abc'; expected a number"),
        ("fire,train,seq-01,fire/b.png,0.1,0.2,nan,1,0,0,0", "column 't3' is 'nan'; expected a finite number"),
        ("fire,train,seq-01,fire/b.png,0.1,0.2,0.3,0,0,0,0", "quaternion q1..q4 is zero"),
        ("fire,train,seq-01,,0.1,0.2,0.3,1,0,0,0", "column 'img_path' is empty"),
    ],
)
def test_bad_row_names_file_and_row(tmp_path: Path, bad: str, message: str) -> None:
    p = _write(tmp_path, f"{HEADER}\n{GOOD}\n{GOOD}\n{bad}\n{GOOD}\n", "broken.csv")
    with pytest.raises(LabelError) as info:
        read_labels(p)
    text = str(info.value)
    assert f"row 3 of {p} (line 4)" in text
    assert message in text


def test_bad_header_empty_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match="expected exactly scene,split,seq,img_path"):
        read_labels(_write(tmp_path, "scene,img_path,x,y\n" + GOOD + "\n", "h.csv"))
    with pytest.raises(LabelError, match="is empty"):
        read_labels(_write(tmp_path, "", "empty.csv"))
    with pytest.raises(FileNotFoundError, match="nope.csv does not exist"):
        read_labels(tmp_path / "nope.csv")
    # header only: an empty table
    t = read_labels(_write(tmp_path, HEADER + "\n", "header_only.csv"))
    assert len(t) == 0 and t.pose.shape == (0, 7) and t.scenes == []


def test_validate_images(tmp_path: Path) -> None:
    rows = [LabelRow("s", "train", "q", f"s/img{i}.png", (0, 0, 0, 1, 0, 0, 0)) for i in range(8)]
    p = write_labels(tmp_path / "l.csv", rows)
    (tmp_path / "s").mkdir()
    for i in (0, 2):
        (tmp_path / "s" / f"img{i}.png").write_bytes(b"x")
    t = read_labels(p)
    with pytest.raises(FileNotFoundError) as info:
        validate_images(t)
    msg = str(info.value)
    assert "6 of 8 images" in msg and str(p) in msg and "img1.png" in msg and "and 1 more" in msg
    assert "img0.png" not in msg
    for i in range(8):
        (tmp_path / "s" / f"img{i}.png").write_bytes(b"x")
    assert validate_images(t) == [tmp_path / "s" / f"img{i}.png" for i in range(8)]
    with pytest.raises(FileNotFoundError):
        validate_images(t, root=tmp_path / "elsewhere")


def test_take_where_and_from_rows_forms() -> None:
    t = _table(6)
    sub = t.where(split="train", scene="chess")
    assert all(s == "chess" for s in sub.scene) and all(s == "train" for s in sub.split)
    assert sub.scenes == t.scenes  # ids unchanged
    picked = t.take([5, 0])
    assert picked.img_path == [t.img_path[5], t.img_path[0]]
    np.testing.assert_array_equal(picked.pose, t.pose[[5, 0]])
    with pytest.raises(IndexError):
        t.take([6])
    as_dict = {"scene": "a", "split": "train", "seq": "s", "img_path": "a/1.png"}
    as_dict.update(zip(LABEL_COLUMNS[4:], range(1, 8)))
    as_csv_tuple = ("b", "train", "s", "b/1.png", 1, 2, 3, 1, 0, 0, 0)
    as_short = ("a", "test", "s", "a/2.png", [0, 0, 0, 1, 0, 0, 0])
    built = LabelTable.from_rows([as_dict, as_csv_tuple, as_short], scene_names=["b", "a"])
    assert built.scene_id.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(built.pose[0], np.arange(1, 8))
    with pytest.raises(ValueError, match="expected 7"):
        LabelTable.from_rows([("a", "t", "s", "p", [1, 2, 3])])


def test_negative_w_is_rejected_on_read_and_negated_on_write(tmp_path: Path) -> None:
    p = _write(tmp_path, f"{HEADER}\n{GOOD}\nfire,train,seq-01,fire/b.png,0.1,0.2,0.3,-0.6,0,0.8,0\n", "neg.csv")
    with pytest.raises(LabelError) as info:
        read_labels(p)
    assert f"row 2 of {p} (line 3)" in str(info.value) and "expected w >= 0" in str(info.value)
    rows = [LabelRow("fire", "train", "seq-01", "fire/b.png", (0.1, 0.2, 0.3, -0.6, 0.0, 0.8, 0.0))]
    back = read_labels(write_labels(tmp_path / "fixed.csv", rows))
    np.testing.assert_array_equal(back.pose[0], [0.1, 0.2, 0.3, 0.6, -0.0, -0.8, -0.0])
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temporary left
