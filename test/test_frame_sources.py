"""One frame runner over every frame source: a label CSV and a ROS 2 bag of the same frames give identical poses.

Both sources feed :func:`apr_training.evaluation.runner.run_frames`, which runs :meth:`Localizer.run_steps` (the
node's loop); the reference is ``run_steps`` called directly on the same RGB arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import random_iapr, random_ms_transformer
from PIL import Image

from apr_localizer import geometry
from apr_localizer.checkpoints import save_model
from apr_localizer.localizer import Localizer, LocalizerOptions
from apr_training.bags import io as bagio
from apr_training.bags.ground_truth import load_ground_truth
from apr_training.datasets.labels import LabelRow, read_labels, write_labels
from apr_training.evaluation.runner import BagSource, LabelSource, run_frames

SCENES = ["alpha", "beta", "gamma"]
N = 5
ITERATIONS = 2
T0 = 1_700_000_000_000_000_000
PERIOD = 100_000_000
SOURCES = ("labels", "bag")


@pytest.fixture(scope="module")
def frames_data(tmp_path_factory):
    """Write the same N frames as PNG files + label CSV and as a bag (rgb8 images + PoseStamped ground truth)."""
    d = tmp_path_factory.mktemp("sources")
    apr = random_ms_transformer(seed=21)
    model = save_model(d / "model.safetensors", apr, random_iapr(seed=22, mstransformer=apr), scene_names=SCENES)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(N)]
    poses = [np.concatenate([rng.normal(size=3), geometry.quat_normalize(rng.normal(size=4))]) for _ in range(N)]
    rows = []
    for i, (rgb, pose) in enumerate(zip(images, poses)):
        rel = f"alpha/seq-01/frame-{i:06d}.color.png"
        (d / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(d / "data" / rel)
        rows.append(LabelRow("alpha", "test", "seq-01", rel, tuple(pose.tolist())))
    labels = write_labels(d / "data" / "test.csv", rows)
    frames = [bagio.PosedImage(T0 + i * PERIOD, rgb, pose) for i, (rgb, pose) in enumerate(zip(images, poses))]
    bag = d / "bag"
    bagio.write_bag(bag, frames, "mcap", camera_info_topic=None, tf=None)
    return {
        "model": model,
        "images": images,
        "poses": np.stack(poses),
        "labels": labels,
        "root": d / "data",
        "bag": bag,
    }


@pytest.fixture(scope="module")
def localizer(frames_data):
    loc = Localizer.from_files(frames_data["model"], options=LocalizerOptions(backend="torch", device="cpu", threads=1))
    yield loc
    loc.close()


def _source(kind: str, data):
    if kind == "labels":
        return LabelSource(read_labels(data["labels"], data["root"], scene_names=SCENES))
    gt = load_ground_truth(data["bag"], "pose:/ground_truth/pose", tolerance_s=0.0)
    return BagSource(data["bag"], "/camera/image_raw", gt)


@pytest.mark.parametrize("kind", SOURCES)
def test_every_source_gives_the_poses_of_the_one_loop(kind, frames_data, localizer):
    run = run_frames(localizer, _source(kind, frames_data), ITERATIONS, progress=False)
    assert len(run) == run.frames_read == N and run.without_gt == 0
    np.testing.assert_array_equal(run.index, np.arange(N))
    np.testing.assert_allclose(run.gt, frames_data["poses"], atol=1e-12)
    for i, rgb in enumerate(frames_data["images"]):
        steps = localizer.run_steps(rgb, ITERATIONS)
        for k, est in enumerate(steps):
            np.testing.assert_array_equal(run.poses[k, i], est.pose)
        assert run.pred_scene[i] == steps[0].scene_id and run.confidence[i] == pytest.approx(steps[0].confidence)
    assert set(run.timings) >= {run.load_stage, "preprocess", "apr", "step1", "step2", "postprocess"}
    lat = run.latency(ITERATIONS)
    assert list(lat) == [run.load_stage, "preprocess", "apr", "iapr", "postprocess", "total"]
    assert np.all(lat["total"] > 0)


def test_both_sources_agree_and_bag_frames_without_ground_truth_are_counted(frames_data, localizer):
    runs = {kind: run_frames(localizer, _source(kind, frames_data), ITERATIONS, progress=False) for kind in SOURCES}
    np.testing.assert_array_equal(runs["labels"].poses, runs["bag"].poses)
    # ground truth 50 ms away from every image: nothing within 20 ms, every frame counted, none localized
    bag = frames_data["bag"].parent / "late_bag"
    frames = [bagio.PosedImage(T0 + i * PERIOD, rgb, None) for i, rgb in enumerate(frames_data["images"])]
    with bagio.BagWriter(bag, "sqlite3") as bw:
        for f, pose in zip(frames, frames_data["poses"]):
            bw.write("/img", bagio.make_image(f.rgb, f.stamp_ns, "cam"), f.stamp_ns)
            late = f.stamp_ns + PERIOD // 2
            bw.write("/gt", bagio.make_pose_stamped(pose, late), late)
    source = BagSource(bag, "/img", load_ground_truth(bag, "pose:/gt", tolerance_s=0.02), stride=2)
    run = run_frames(localizer, source, 0, progress=False)
    assert len(run) == 0 and run.frames_read == 3 and run.without_gt == 3
