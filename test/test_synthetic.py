"""Synthetic benchmark: scene generation, ray-cast geometry, trajectories, dataset writer and the apr-synth CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import math

import numpy as np
import pytest
from PIL import Image

from apr_localizer import geometry
from apr_training.cli.synth import synth_main
from apr_training.datasets.labels import LABEL_COLUMNS
from apr_training.synthetic import scenes as scenes_mod
from apr_training.synthetic.render import Intrinsics, project_points, render_buffers, render_frame
from apr_training.synthetic.scenes import SCENE_STYLES, Lighting, make_scene, vary_lighting
from apr_training.synthetic.trajectory import TrajectoryParams, camera_rotation, sequence_trajectory
from apr_training.synthetic.writer import frame_lightings, render_sequence, write_dataset

W, H = 64, 48
K = Intrinsics(fx=50.0, fy=50.0, cx=32.0, cy=24.0)  # integer principal point: the optical axis hits pixel (24, 32)
AMBIENT_ONLY = Lighting(ambient=(1.0, 1.0, 1.0), lights=(), exposure=1.0, shadows=False)


def _look(position, yaw, pitch=0.0, roll=0.0) -> np.ndarray:
    q = geometry.matrix_to_quat(camera_rotation(yaw, pitch, roll))
    return np.concatenate([np.asarray(position, dtype=np.float64), q])


def _look_at(position, target) -> np.ndarray:
    d = np.asarray(target, dtype=np.float64) - np.asarray(position, dtype=np.float64)
    return _look(position, math.atan2(d[1], d[0]), math.atan2(d[2], math.hypot(d[0], d[1])))


def _start_pose(scene, seq=1) -> np.ndarray:
    return sequence_trajectory(scene, seq, 5.0).pose_at(0.0)[0]


# ------------------------------------------------------------------------------------------------ scenes
def test_at_least_four_distinct_scenes():
    assert len(SCENE_STYLES) >= 4
    means = []
    for name in SCENE_STYLES:
        s = make_scene(name, 0)
        assert s.name == name and len(s.boxes) >= 3  # room + furniture
        assert s.atlas.dtype == np.float32 and s.atlas.min() >= 0.0 and s.atlas.max() <= 1.0
        means.append(render_frame(s, _start_pose(s), K, W, H).reshape(-1, 3).mean(0))
    means = np.array(means)
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert dist[~np.eye(len(means), dtype=bool)].min() > 3.0  # every pair of scenes looks different on average


# The demo model (scripts/train_demo_model.sh: office, kitchen, library, warehouse with seed 0) was trained on frames
# rendered from exactly these layouts and lights; a change to scene generation silently invalidates it. Change these
# fingerprints only together with re-rendering the data and retraining the demo model.
FROZEN_SCENES = {
    "office": "f48da084f2ed07c2",
    "kitchen": "bda102cc7f42cb4f",
    "library": "59540cb280d83cb5",
    "warehouse": "01c2df1067ff4ea5",
}


def _fingerprint(scene) -> str:
    def r(values):
        return tuple(round(float(v), 6) for v in values)

    parts = [(b.kind, r(b.center), r(b.half), round(b.yaw, 6)) for b in scene.boxes]
    lt = scene.lighting
    parts.append(
        (
            r(lt.ambient),
            tuple((r(p.position), r(p.colour), round(p.intensity, 6), round(p.falloff, 6)) for p in lt.lights),
        )
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(FROZEN_SCENES))
def test_demo_scene_layouts_are_frozen(name):
    # lighting is drawn after all textures from the same generator, so it also catches changed texture draws
    assert _fingerprint(make_scene(name, 0)) == FROZEN_SCENES[name]


def test_lighting_variation_draws_are_frozen():
    # the demo data drew per-frame lighting with vary_lighting(scene.lighting, rng) (amount 1)
    lt = vary_lighting(make_scene("office", 0).lighting, np.random.default_rng(123))
    np.testing.assert_allclose(lt.ambient, [0.35081926448913314, 0.3801274939834728, 0.3725119839169108], rtol=1e-9)
    np.testing.assert_allclose(
        lt.lights[0].position, [-2.2839235704254, 1.5412154881447289, 2.595932814805771], rtol=1e-9
    )
    assert lt.lights[1].intensity == pytest.approx(0.9704353988372635, rel=1e-9)
    assert lt.exposure == pytest.approx(1.0897375385860248, rel=1e-9)


def test_unknown_scene_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown synthetic scene 'nowhere'; known scenes are: office"):
        make_scene("nowhere", 0)


def test_scene_generation_and_rendering_are_deterministic():
    fresh = scenes_mod._build("kitchen", 3)  # bypass the per-process cache
    cached = make_scene("kitchen", 3)
    assert fresh.boxes == cached.boxes
    np.testing.assert_array_equal(fresh.atlas, cached.atlas)
    pose = _start_pose(cached)
    a = render_buffers(fresh, pose, K, W, H)
    b = render_buffers(cached, pose, K, W, H)
    assert a.rgb.tobytes() == b.rgb.tobytes()
    assert a.depth.tobytes() == b.depth.tobytes()
    np.testing.assert_array_equal(a.surface_id, b.surface_id)

    other = make_scene("kitchen", 4)
    assert other.boxes != cached.boxes
    assert not np.array_equal(render_frame(other, _start_pose(other), K, W, H), a.rgb)


def test_camera_outside_the_room_is_an_error():
    s = make_scene("office", 0)
    pose = _look(s.room_max + 1.0, 0.0)
    with pytest.raises(ValueError, match="outside the room of scene 'office'"):
        render_frame(s, pose, K, W, H)


# ------------------------------------------------------------------------------------------------ geometry
def _free_wall_view(scene, distance=1.2):
    """Camera ``distance`` m in front of the +x wall looking straight at it, with no furniture in between."""
    hi = scene.room_max
    for y in np.linspace(scene.room_min[1] + 0.5, hi[1] - 0.5, 41):
        for z in (1.5, 2.0, 1.0):
            seg = np.linspace([hi[0] - distance, y], [hi[0], y], 50)
            blocked = False
            for b in scene.objects:
                zs = b.corners()[:, 2]
                if b.footprint_distance(seg[:, 0], seg[:, 1]).min() < 0.05 and zs.min() - 0.05 < z < zs.max() + 0.05:
                    blocked = True
            if not blocked:
                return np.array([hi[0] - distance, y, z])
    raise AssertionError("no free view of the +x wall")


@pytest.mark.parametrize("name", ["office", "warehouse"])
def test_known_wall_point_on_the_optical_axis(name):
    s = make_scene(name, 0)
    cam = _free_wall_view(s, 1.2)
    pose = _look(cam, 0.0)  # looking along +x
    point = np.array([s.room_max[0], cam[1], cam[2]])
    uv, z = project_points(point, pose, K)
    np.testing.assert_allclose(uv[0], [K.cx, K.cy], atol=1e-9)
    r = render_buffers(s, pose, K, W, H, AMBIENT_ONLY)
    row, col = int(K.cy), int(K.cx)
    assert r.depth[row, col] == pytest.approx(z[0], abs=1e-5)
    assert r.surface_id[row, col] == s.surface_id(0, "+x")
    albedo = s.albedo_at([s.surface_id(0, "+x")], point[None])[0]
    np.testing.assert_allclose(r.rgb[row, col], np.round(albedo * 255), atol=1)


def test_known_point_on_a_furniture_top_face():
    s = make_scene("office", 0)
    bi, box = next((i, b) for i, b in enumerate(s.boxes) if i > 0 and b.kind == "desk_top")
    top = box.center[2] + box.half[2]
    # a point on the top face off its centre, seen obliquely from above
    c, sn = math.cos(box.yaw), math.sin(box.yaw)
    local = np.array([0.3 * box.half[0], -0.2 * box.half[1]])
    point = np.array([box.center[0] + c * local[0] - sn * local[1], box.center[1] + sn * local[0] + c * local[1], top])
    cam = point + np.array([0.4, -0.3, 0.8])
    pose = _look_at(cam, point + np.array([0.05, 0.02, 0.0]))  # not the optical axis
    uv, z = project_points(point, pose, K)
    # snap to the pixel centre and move the point along that pixel's ray back onto the face plane
    u, v = np.round(uv[0]).astype(int)
    rot = geometry.quat_to_matrix(pose[3:])
    ray = rot @ np.array([(u - K.cx) / K.fx, (v - K.cy) / K.fy, 1.0])
    depth = (top - cam[2]) / ray[2]
    hit = cam + depth * ray
    uv2, z2 = project_points(hit, pose, K)
    np.testing.assert_allclose(uv2[0], [u, v], atol=1e-9)
    assert z2[0] == pytest.approx(depth)
    r = render_buffers(s, pose, K, W, H, AMBIENT_ONLY)
    assert r.surface_id[v, u] == s.surface_id(bi, "+z")
    assert r.depth[v, u] == pytest.approx(depth, rel=1e-5)
    albedo = s.albedo_at([s.surface_id(bi, "+z")], hit[None])[0]
    np.testing.assert_allclose(r.rgb[v, u], np.round(albedo * 255), atol=1)


@pytest.mark.parametrize("name", ["library", "studio"])
def test_every_pixel_back_projects_onto_its_surface(name):
    s = make_scene(name, 0)
    traj = sequence_trajectory(s, 2, 20.0)
    for pose in traj.pose_at([0.0, 7.0, 14.0]):
        r = render_buffers(s, pose, K, W, H)
        vv, uu = np.mgrid[0:H, 0:W]
        cam_pts = np.stack([(uu - K.cx) / K.fx * r.depth, (vv - K.cy) / K.fy * r.depth, r.depth], -1).reshape(-1, 3)
        world = cam_pts @ geometry.quat_to_matrix(pose[3:]).T + pose[:3]
        sid = r.surface_id.reshape(-1)
        box, face = sid // 6, sid % 6
        axis, sign = face // 2, np.where(face % 2 == 0, -1.0, 1.0)
        b = s.box_arrays()
        rel = world - b["center"][box]
        cs, sn = b["cos"][box], b["sin"][box]
        local = np.stack([cs * rel[:, 0] + sn * rel[:, 1], -sn * rel[:, 0] + cs * rel[:, 1], rel[:, 2]], 1)
        on_plane = np.take_along_axis(local, axis[:, None], 1)[:, 0]
        half = np.take_along_axis(b["half"][box], axis[:, None], 1)[:, 0]
        np.testing.assert_allclose(on_plane, sign * half, atol=2e-4)
        # and inside the face rectangle
        assert (np.abs(local) <= b["half"][box] + 2e-4).all()
        assert (r.depth > 0).all() and np.isfinite(r.depth).all()


def test_lighting_changes_colour_but_not_geometry():
    s = make_scene("gallery", 0)
    pose = _start_pose(s)
    rng = np.random.default_rng(0)
    a = render_buffers(s, pose, K, W, H, s.lighting)
    b = render_buffers(s, pose, K, W, H, vary_lighting(s.lighting, rng, 1.0))
    assert not np.array_equal(a.rgb, b.rgb)
    np.testing.assert_array_equal(a.depth, b.depth)
    np.testing.assert_array_equal(a.surface_id, b.surface_id)
    dark = Lighting(ambient=(0.0, 0.0, 0.0), lights=(), exposure=1.0)
    assert render_frame(s, pose, K, W, H, dark).max() == 0
    assert vary_lighting(s.lighting, rng, 0.0) == s.lighting
    assert Lighting.from_dict(json.loads(json.dumps(s.lighting.to_dict()))) == s.lighting


def test_render_frame_with_depth_and_intrinsics_dict():
    s = make_scene("office", 0)
    k = Intrinsics.from_hfov(80, 60, 60.0)
    assert k.cx == 39.5 and k.fx == pytest.approx(40.0 / math.tan(math.radians(30.0)))
    assert Intrinsics.from_dict(k.to_dict(80, 60)) == k
    rgb, depth = render_frame(s, _start_pose(s), k, 80, 60, with_depth=True)
    assert rgb.shape == (60, 80, 3) and rgb.dtype == np.uint8
    assert depth.shape == (60, 80) and depth.dtype == np.float32


# ------------------------------------------------------------------------------------------------ trajectories
@pytest.mark.parametrize("name", list(SCENE_STYLES))
def test_trajectories_stay_clear_and_are_smooth(name):
    s = make_scene(name, 0)
    params = TrajectoryParams()
    traj = sequence_trajectory(s, 1, 40.0, seed=0, params=params)
    dt = 0.01
    poses = traj.pose_at(np.arange(0.0, 40.0, dt))
    lo, hi = s.room_min, s.room_max
    assert (poses[:, :2] > lo[:2] + params.wall_margin - 1e-6).all()
    assert (poses[:, :2] < hi[:2] - params.wall_margin + 1e-6).all()
    assert (poses[:, 2] >= params.height[0]).all() and (poses[:, 2] <= params.height[1]).all()
    assert s.point_clearance(poses[:, :2]).min() >= params.margin - 1e-6
    vel = np.linalg.norm(np.diff(poses[:, :3], axis=0), axis=1) / dt
    acc = np.linalg.norm(np.diff(poses[:, :3], n=2, axis=0), axis=1) / dt**2
    assert vel.max() <= params.speed * (1 + params.speed_variation) + 0.02
    assert acc.max() < 1.0  # m/s^2
    rate = geometry.rotation_error_deg(poses[1:, 3:], poses[:-1, 3:]) / dt
    assert rate.max() <= params.max_angular_rate_deg + 1.0
    # roughly horizontal: the optical axis stays within the pitch range, the image x axis within a few degrees of level
    rot = geometry.quat_to_matrix(poses[:, 3:])
    pitch = np.degrees(np.arcsin(rot[:, 2, 2]))
    assert pitch.min() >= params.pitch_deg[0] - 0.5 and pitch.max() <= params.pitch_deg[1] + 0.5
    assert np.degrees(np.abs(np.arcsin(rot[:, 2, 0]))).max() <= params.roll_amplitude_deg + 0.5
    np.testing.assert_allclose(np.linalg.norm(poses[:, 3:], axis=1), 1.0, atol=1e-12)


def test_train_and_test_trajectories_differ_but_cover_the_same_space():
    s = make_scene("warehouse", 0)
    a = sequence_trajectory(s, 1, 60.0).pose_at(np.arange(0, 60, 0.5))
    a2 = sequence_trajectory(s, 1, 60.0).pose_at(np.arange(0, 60, 0.5))
    b = sequence_trajectory(s, 3, 60.0).pose_at(np.arange(0, 60, 0.5))
    np.testing.assert_array_equal(a, a2)
    assert np.linalg.norm(a[:, :3] - b[:, :3], axis=1).mean() > 0.5
    # every test position is near some training position
    near = np.linalg.norm(b[:, None, :2] - a[None, :, :2], axis=-1).min(axis=1)
    assert np.median(near) < 1.0


def test_camera_rotation_is_the_optical_frame():
    r = camera_rotation(0.0, 0.0, 0.0)
    np.testing.assert_allclose(r[:, 2], [1, 0, 0], atol=1e-12)  # optical z = forward = map +x
    np.testing.assert_allclose(r[:, 0], [0, -1, 0], atol=1e-12)  # optical x = right
    np.testing.assert_allclose(r[:, 1], [0, 0, -1], atol=1e-12)  # optical y = down
    up = camera_rotation(math.pi / 2, math.radians(10), 0.0)
    assert up[2, 2] == pytest.approx(math.sin(math.radians(10)))  # looks up by the pitch


# ------------------------------------------------------------------------------------------------ writer / CLI
def test_write_dataset_layout_labels_and_pixels(tmp_path):
    out = tmp_path / "ds"
    summary = write_dataset(
        out,
        scenes=["office", "gallery"],
        train_seqs=1,
        test_seqs=1,
        frames_per_seq=3,
        width=W,
        height=H,
        seed=5,
        workers=2,
        save_depth=True,
        progress=False,
        command="test",
    )
    assert summary["frames"] == {"train": 6, "test": 6}
    assert json.loads((out / "dataset.json").read_text())["command"] == "test"
    intr = json.loads((out / "intrinsics.json").read_text())
    assert (intr["width"], intr["height"]) == (W, H)
    k = Intrinsics.from_dict(intr)
    with open(out / "synthetic_train.csv", newline="") as f:
        train = list(csv.reader(f))
    with open(out / "synthetic_test.csv", newline="") as f:
        test = list(csv.reader(f))
    assert tuple(train[0]) == LABEL_COLUMNS == tuple(test[0])
    assert {r[2] for r in train[1:]} == {"seq-01"} and {r[2] for r in test[1:]} == {"seq-02"}
    assert {r[1] for r in train[1:]} == {"train"} and {r[1] for r in test[1:]} == {"test"}
    row = test[1 + 4]  # gallery, seq-02, frame 1
    assert row[:4] == ["gallery", "test", "seq-02", "gallery/seq-02/frame-000001.color.png"]
    pose = np.array([float(v) for v in row[4:]])
    np.testing.assert_allclose(
        np.loadtxt(out / "gallery/seq-02/frame-000001.pose.txt"), geometry.pose_to_matrix(pose), atol=1e-8
    )
    img = np.asarray(Image.open(out / row[3]))
    scene = make_scene("gallery", 5)
    light = frame_lightings("gallery", 5, 2, 3, 1.0)[1]
    r = render_buffers(scene, pose, k, W, H, light)
    np.testing.assert_array_equal(img, r.rgb)
    depth_mm = np.asarray(Image.open(out / "gallery/seq-02/frame-000001.depth.png"))
    np.testing.assert_allclose(depth_mm / 1000.0, r.depth, atol=6e-4)
    # the same frames as a sequence rendered in this process (workers=2 above)
    frames = list(render_sequence("gallery", 2, 3, W, H, fps=10.0, seed=5))
    np.testing.assert_allclose(frames[1][1], pose, atol=1e-12)
    np.testing.assert_array_equal(frames[1][2], img)

    from apr_training.datasets.labels import read_labels

    table = read_labels(out / "synthetic_train.csv")
    assert table.scenes == ["gallery", "office"] and len(table) == 6
    assert (table.pose[:, 3] >= 0).all()

    with pytest.raises(FileExistsError, match="already holds a synthetic dataset"):
        write_dataset(out, scenes=["office"], frames_per_seq=1, width=W, height=H, workers=1, progress=False)


def test_cli_dataset_bench_and_help(tmp_path, capsys):
    assert (
        synth_main(
            [
                "dataset",
                "--out",
                str(tmp_path / "d"),
                "--scenes",
                "studio",
                "--train-seqs",
                "1",
                "--test-seqs",
                "1",
                "--frames",
                "2",
                "--size",
                "48x32",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert len((tmp_path / "d" / "synthetic_test.csv").read_text().splitlines()) == 3
    assert "apr-synth dataset" in json.loads((tmp_path / "d" / "dataset.json").read_text())["command"]
    assert (
        synth_main(
            ["bench", "--scenes", "office", "--sizes", "48x32", "--frames", "2", "--json", str(tmp_path / "b.json")]
        )
        == 0
    )
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["results"][0]["scene"] == "office" and res["frames_per_s_per_core"]["48x32"] > 0
    assert "frames/s" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        synth_main(["--help"])
    assert e.value.code == 0
    assert "dataset" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        synth_main(["dataset", "--out", str(tmp_path), "--scenes", "nowhere"])
    assert e.value.code == 2
    assert (
        synth_main(
            [
                "dataset",
                "--out",
                str(tmp_path / "d"),
                "--scenes",
                "studio",
                "--frames",
                "1",
                "--size",
                "48x32",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "pass overwrite=True" in capsys.readouterr().err
