"""Torch datasets, transforms, the scene-equalising sampler and the seeded loader (on tiny generated PNGs)."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from apr_localizer.geometry import flip_relative, relative_pose
from apr_localizer.preprocess import EvalTransform, PreprocessConfig, preprocess
from apr_training.datasets import (
    CameraPoseDataset,
    DecoderTransform,
    ImageStore,
    LabelRow,
    LabelTable,
    RelPoseDataset,
    SceneEqualizedSampler,
    TrainTransform,
    build_train_transform,
    generate_pairs,
    load_rgb,
    make_loader,
    read_labels,
    read_pairs,
    write_labels,
    write_pairs,
)

SCENES = {"alpha": 6, "beta": 3, "gamma": 1}


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 small PNGs (3 scenes, one of them grey) + a label CSV + a pairs CSV."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    rng = np.random.default_rng(0)
    rows = []
    for scene, n in SCENES.items():
        (root / scene).mkdir()
        for i in range(n):
            rel = f"{scene}/frame-{i:06d}.color.png"
            img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            if scene == "gamma":
                Image.fromarray(img[:, :, 0], mode="L").save(root / rel)  # grey PNG: expanded to RGB
            else:
                Image.fromarray(img).save(root / rel)
            q = rng.normal(size=4)
            q *= rng.uniform(0.98, 1.04) / np.linalg.norm(q)
            pos = np.array([i * 0.1, 0.05 * i, 0.0]) + rng.normal(0, 0.01, 3)
            rows.append(LabelRow(scene, "train", "seq-01", rel, tuple(np.r_[pos, q].tolist())))
    labels = LabelTable.from_rows(rows)
    write_labels(root / "train.csv", labels)
    pairs = generate_pairs(labels, max_distance_m=10.0, max_angle_deg=180.0, pairs_per_frame=3, seed=0)
    write_pairs(root / "pairs.csv", pairs)
    return root


# --------------------------------------------------------------------------------------------- CameraPoseDataset
def test_camera_pose_items_match_preprocess(dataset_dir: Path) -> None:
    labels = read_labels(dataset_dir / "train.csv")
    ds = CameraPoseDataset(labels)
    assert len(ds) == 10
    assert isinstance(ds.transform, EvalTransform)
    for i in (0, 7, 9):
        item = ds[i]
        rgb = np.asarray(Image.open(dataset_dir / labels.img_path[i]).convert("RGB"))
        assert torch.equal(item["image"], preprocess(rgb)[0])
        assert item["image"].shape == (3, 224, 224) and item["image"].dtype == torch.float32
        assert item["pose"].dtype == torch.float32 and item["pose"].shape == (7,)
        np.testing.assert_array_equal(item["pose"].numpy(), labels.pose[i].astype(np.float32))  # raw quaternion
        assert item["scene"].dtype == torch.int64 and int(item["scene"]) == labels.scene_id[i]
        assert item["index"] == i
    batch = next(iter(make_loader(ds, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 3, 224, 224)
    assert batch["pose"].shape == (4, 7) and batch["scene"].shape == (4,) and batch["scene"].dtype == torch.int64
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_camera_pose_dataset_reproduces_reference_images(reference_dir: Path, tmp_path: Path) -> None:
    """Label CSV → dataset → EvalTransform gives the reference model inputs bit-exactly."""
    rows = [LabelRow("chess", "test", "seq", f"raw_images/raw_{i}.png", (0, 0, 0, 1, 0, 0, 0)) for i in range(4)]
    labels = read_labels(write_labels(tmp_path / "ref.csv", rows), dataset_root=reference_dir)
    expected = torch.load(reference_dir / "inputs.pt", weights_only=True)["images"]
    ds = CameraPoseDataset(labels, transform=EvalTransform(PreprocessConfig(method="pil")))
    for i in range(4):
        assert torch.equal(ds[i]["image"], expected[i])


def test_cache_modes_give_identical_items(dataset_dir: Path) -> None:
    labels = read_labels(dataset_dir / "train.csv")
    plain = CameraPoseDataset(labels)
    encoded = CameraPoseDataset(labels, cache_in_ram=True)
    decoded = CameraPoseDataset(labels, cache_in_ram="decoded")
    assert encoded.images.cache == "encoded" and plain.images.nbytes == 0
    assert encoded.images.nbytes == sum((dataset_dir / p).stat().st_size for p in labels.img_path)
    assert decoded.images.nbytes == 10 * 48 * 64 * 3
    for i in range(len(labels)):
        ref = load_rgb(dataset_dir / labels.img_path[i])
        assert ref.shape == (48, 64, 3)
        np.testing.assert_array_equal(encoded.images.load(i), ref)
        np.testing.assert_array_equal(decoded.images.load(i), ref)
        assert torch.equal(decoded[i]["image"], plain[i]["image"])
    # the cache survives pickling (DataLoader workers under spawn)
    clone = pickle.loads(pickle.dumps(decoded))
    assert torch.equal(clone[3]["image"], plain[3]["image"])
    with pytest.raises(ValueError, match="cache_in_ram"):
        ImageStore([], cache="disk")


def test_missing_and_broken_images(dataset_dir: Path, tmp_path: Path) -> None:
    labels = read_labels(dataset_dir / "train.csv")
    with pytest.raises(FileNotFoundError, match="10 of 10 images .* are missing under dataset root"):
        CameraPoseDataset(labels, root=tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"bad\.png could not be decoded"):
        load_rgb(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rgb(tmp_path / "none.png")


# --------------------------------------------------------------------------------------------- RelPoseDataset
def test_rel_pose_dataset_swap_consistency_and_no_mutation(dataset_dir: Path) -> None:
    pairs = read_pairs(dataset_dir / "pairs.csv")
    assert len(pairs) > 5
    snapshot = {k: getattr(pairs, k).copy() for k in ("pose_a", "pose_b", "rel_ab", "scene_id_a", "scene_id_b")}
    ds = RelPoseDataset(pairs, transform=TrainTransform())
    torch.manual_seed(0)
    swaps = []
    for _ in range(3):
        for i in range(len(ds)):
            item = ds[i]
            swaps.append(item["swapped"])
            # rel(1→2) computed from the fed poses
            np.testing.assert_allclose(
                item["rel_pose"].numpy(), relative_pose(item["query_pose"].numpy(), item["pose"].numpy()), atol=2e-6
            )
            assert abs(float(item["pose"][3:].norm()) - 1.0) < 1e-6  # neighbour quaternion normalised
            side = "a" if item["swapped"] else "b"
            assert int(item["scene"]) == int(getattr(pairs, f"scene_id_{side}")[i])
            assert item["image"].shape == (3, 224, 224) and item["rel_pose"].dtype == torch.float32
    assert any(swaps) and not all(swaps)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(getattr(pairs, k), v)  # the caller's table is untouched
    np.testing.assert_array_equal(ds._rel_ab, snapshot["rel_ab"])  # and so are the dataset's arrays
    with pytest.raises(ValueError):
        ds._rel_ab[0, 0] = 1.0  # read-only: an in-place flip cannot happen


def test_rel_pose_dataset_fixed_swaps(dataset_dir: Path) -> None:
    pairs = read_pairs(dataset_dir / "pairs.csv")
    never = RelPoseDataset(pairs, swap_prob=0.0, normalize_neighbour=False)
    always = RelPoseDataset(pairs, swap_prob=1.0, cache_in_ram="decoded")
    for i in range(len(pairs)):
        n, a = never[i], always[i]
        assert not n["swapped"] and a["swapped"]
        np.testing.assert_allclose(n["rel_pose"].numpy(), pairs.rel_ab[i], atol=1e-6)
        np.testing.assert_allclose(a["rel_pose"].numpy(), flip_relative(pairs.rel_ab[i]), atol=1e-6)
        np.testing.assert_allclose(n["pose"].numpy(), pairs.pose_b[i], atol=1e-6)
        np.testing.assert_allclose(a["query_pose"].numpy(), pairs.pose_b[i], atol=1e-6)
        rgb_a = load_rgb(dataset_dir / pairs.img_path_a[i])
        rgb_b = load_rgb(dataset_dir / pairs.img_path_b[i])
        assert torch.equal(n["image"], preprocess(rgb_a)[0])
        assert torch.equal(a["image"], preprocess(rgb_b)[0])
    with pytest.raises(ValueError, match="swap_prob"):
        RelPoseDataset(pairs, swap_prob=1.5)


def test_loader_is_seeded(dataset_dir: Path) -> None:
    pairs = read_pairs(dataset_dir / "pairs.csv")
    ds = RelPoseDataset(pairs, transform=TrainTransform())

    def run(seed: int, workers: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)  # in the main process (workers=0) augmentation draws from the global generator
        loader = make_loader(ds, batch_size=4, shuffle=True, workers=workers, seed=seed)
        assert loader.pin_memory == torch.cuda.is_available()
        return [torch.cat([b["index"].float(), b["rel_pose"].flatten(), b["image"].flatten()[:500]]) for b in loader]

    first, again, other = run(1, 0), run(1, 0), run(2, 0)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(first, other))
    # two worker processes: reproducible from the loader seed alone (worker seeds derive from its generator)
    torch.manual_seed(123)
    w1 = [b["image"] for b in make_loader(ds, batch_size=4, shuffle=True, workers=2, seed=5)]
    torch.manual_seed(456)
    w2 = [b["image"] for b in make_loader(ds, batch_size=4, shuffle=True, workers=2, seed=5)]
    assert all(torch.equal(x, y) for x, y in zip(w1, w2))


# --------------------------------------------------------------------------------------------- sampler
def test_scene_equalized_sampler_length_and_distribution() -> None:
    scene_ids = np.repeat([0, 1, 2], [10, 4, 1])
    sampler = SceneEqualizedSampler(scene_ids, seed=3)
    assert len(sampler) == 30  # max count 10 x 3 scenes
    idx = np.array(list(sampler))
    assert len(idx) == 30 and set(range(15)) <= set(idx.tolist())
    counts = np.bincount(scene_ids[idx], minlength=3)
    assert counts.sum() == 30 and counts[0] == 10  # the largest scene gets no extra draws
    assert list(sampler) == idx.tolist()  # same epoch → same order
    sampler.set_epoch(1)
    assert list(sampler) != idx.tolist()
    totals = np.zeros(3)
    for epoch in range(200):
        sampler.set_epoch(epoch)
        totals += np.bincount(scene_ids[list(sampler)], minlength=3)
    np.testing.assert_allclose(totals / 200, [10, 10, 10], atol=0.6)
    ordered = SceneEqualizedSampler(scene_ids, shuffle=False)
    assert list(ordered)[:15] == list(range(15))


def test_scene_equalized_sampler_ddp_split_and_loader(dataset_dir: Path) -> None:
    scene_ids = np.repeat([0, 1, 2], [10, 4, 1])
    full = SceneEqualizedSampler(scene_ids, seed=9).epoch_indices()
    parts = [list(SceneEqualizedSampler(scene_ids, seed=9, num_replicas=4, rank=r)) for r in range(4)]
    assert all(len(p) == 8 for p in parts)
    merged = [parts[r][k] for k in range(8) for r in range(4)]
    assert merged[:30] == full.tolist() and merged[30:] == full[:2].tolist()
    with pytest.raises(ValueError, match="rank"):
        SceneEqualizedSampler(scene_ids, num_replicas=2, rank=2)

    ds = CameraPoseDataset(read_labels(dataset_dir / "train.csv"))
    sampler = SceneEqualizedSampler(ds, seed=0)
    assert len(sampler) == max(SCENES.values()) * len(SCENES)
    loader = make_loader(ds, batch_size=6, shuffle=True, sampler=sampler)
    scenes = torch.cat([b["scene"] for b in loader])
    assert len(scenes) == 18 and (torch.bincount(scenes) > 0).all()


# --------------------------------------------------------------------------------------------- transforms
def test_train_transform_random_crop_of_resized_image() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    t = TrainTransform(jitter=False)
    torch.manual_seed(0)
    out = t(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32 and out.is_contiguous()
    # the no-jitter output is a 224 window of the normalised Resize(256) image (within one grey level of PIL)
    pil = np.asarray(Image.fromarray(img).resize((341, 256), Image.Resampling.BILINEAR))
    mean = torch.tensor(PreprocessConfig().mean).view(3, 1, 1)
    std = torch.tensor(PreprocessConfig().std).view(3, 1, 1)
    u8 = ((out * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy().astype(int)
    pil = pil.astype(int)
    matches = [
        (dy, dx)
        for dy in range(256 - 224 + 1)
        for dx in range(341 - 224 + 1)
        if np.abs(pil[dy, dx : dx + 224] - u8[0]).max() <= 1
        and np.abs(pil[dy : dy + 224, dx : dx + 224] - u8).max() <= 1
    ]
    assert matches
    # deterministic under the torch seed, random otherwise
    torch.manual_seed(0)
    assert torch.equal(t(img), out)
    assert not all(torch.equal(t(img), out) for _ in range(5))


def test_train_transform_jitter_pickling_and_no_augment() -> None:
    img = np.random.default_rng(2).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    t = TrainTransform()
    clone = pickle.loads(pickle.dumps(t))
    torch.manual_seed(4)
    a = t(img)
    torch.manual_seed(4)
    b = clone(img)
    assert torch.equal(a, b)
    torch.manual_seed(4)
    assert not torch.equal(TrainTransform(jitter=False)(img), a)  # jitter changes colours
    ro = img.copy()
    ro.flags.writeable = False
    assert t(ro).shape == (3, 224, 224)
    assert t(torch.from_numpy(img).permute(2, 0, 1)).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="expected uint8"):
        t(img.astype(np.float32))
    small = PreprocessConfig(resize=128, crop=112)
    assert TrainTransform(small)(img).shape == (3, 112, 112)
    ev = build_train_transform(small, no_augment=True)
    assert isinstance(ev, EvalTransform) and ev.config == small
    assert torch.equal(ev(img), preprocess(img, small)[0])
    assert isinstance(build_train_transform(), TrainTransform)


def test_decoder_transform_matches_pil_geometry() -> None:
    img = np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    out = DecoderTransform()(img)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # Resize(72): 480x640 → 72x96, centre crop 64: top 4, left 16
    pil = np.asarray(Image.fromarray(img).resize((96, 72), Image.Resampling.BILINEAR))[4:68, 16:80]
    ref = torch.from_numpy(pil.copy()).permute(2, 0, 1).float() / 255
    assert float((out - ref).abs().max()) <= 1.01 / 255
    assert pickle.loads(pickle.dumps(DecoderTransform()))(img).shape == (3, 64, 64)


def test_sixteen_bit_and_rgba_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    deep = rng.integers(0, 65536, (12, 16), dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "deep.png"), deep)
    expected = np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(load_rgb(tmp_path / "deep.png"), expected)
    rgba = rng.integers(0, 256, (12, 16, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "rgba.png"), rgba[..., :3])
    jpg = tmp_path / "x.jpg"
    Image.fromarray(rgba[..., :3]).save(jpg, quality=95)
    assert load_rgb(jpg).shape == (12, 16, 3)


def test_grey_png_is_expanded(dataset_dir: Path) -> None:
    rgb = load_rgb(dataset_dir / "gamma/frame-000000.color.png")
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    direct = cv2.imread(str(dataset_dir / "gamma/frame-000000.color.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(rgb[..., 0], direct)


def test_resized_cache_is_bounded_memory_mapped_and_gives_identical_samples(dataset_dir: Path, tmp_path: Path) -> None:
    from apr_training.datasets.torch_datasets import ImageCacheOptions

    labels = read_labels(dataset_dir / "train.csv")
    cfg = PreprocessConfig(resize=36, crop=32)
    per_image = 36 * 48 * 3  # 64x48 frames at shorter side 36
    opts = ImageCacheOptions(36, tmp_path / "cache.npy", max_bytes=4 * per_image)  # room for 4 of 10 images
    for transform in (EvalTransform(cfg), TrainTransform(cfg)):
        plain = CameraPoseDataset(labels, transform=transform)
        cached = CameraPoseDataset(labels, transform=transform, cache_in_ram="resized", cache_options=opts)
        assert cached.images.cached_images == 4 and (tmp_path / "cache.npy").stat().st_size < 5 * per_image
        assert isinstance(cached.images._buffer, np.memmap)  # shared by workers and ranks through the page cache
        for i in range(len(labels)):
            torch.manual_seed(i)
            a = plain[i]["image"]
            torch.manual_seed(i)
            assert torch.equal(cached[i]["image"], a), i  # the transform's resize is an identity on cached images
    mtime = (tmp_path / "cache.npy").stat().st_mtime_ns
    CameraPoseDataset(labels, cache_in_ram="resized", cache_options=opts)
    assert (tmp_path / "cache.npy").stat().st_mtime_ns == mtime  # reused, not rebuilt
    pairs = read_pairs(dataset_dir / "pairs.csv")
    rel = RelPoseDataset(pairs, cache_in_ram="resized", cache_options=ImageCacheOptions(36, tmp_path / "p.npy"))
    assert rel.images.cached_images == len(rel.images)
    with pytest.raises(ValueError, match="cache_options"):
        CameraPoseDataset(labels, cache_in_ram="resized")
