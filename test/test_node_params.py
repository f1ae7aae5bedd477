"""node_params: every parameter's check accepts its default and refuses what would break a timer or callback."""

from __future__ import annotations

import numpy as np
import pytest

from apr_localizer import node_params as np_
from apr_localizer.node_params import PARAMS, config_from_values, cross_check, validate


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: p.name)
def test_every_default_is_valid(param):
    assert validate(param.name, param.default) is None


@pytest.mark.parametrize(
    "name",
    ["camera/image_raw", "/camera/image_raw", "~/pose", "~", "{ns}/x", "a_1/b_2"],
)
def test_valid_topic_names(name):
    assert np_.topic_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "bad topic!!", "a//b", "a/", "1abc", "a/~b", "~x", "x" * 300, "a/b-c", "a\n"])
def test_invalid_topic_names(name):
    assert np_.topic_name_problem(name) is not None
    reason = validate("image_topic", name)
    assert reason is not None and reason.startswith("parameter image_topic") and len(reason) < 300


@pytest.mark.parametrize("frame", ["", "/map", "a b", "x" * 65536, "cam\n", "fr!ame"])
def test_invalid_frame_ids_are_refused_and_echoes_truncated(frame):
    reason = validate("map_frame", frame)
    assert reason is not None and len(reason) < 300


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_rate_hz", 0.002),  # a 500 s wait: refused (0 = unlimited is fine)
        ("max_rate_hz", -1.0),
        ("max_rate_hz", float("nan")),
        ("covariance.position", [1.8e308, 0.1, 0.1]),
        ("covariance.position", [0.1, float("inf"), 0.1]),
        ("covariance.orientation", [-1.0, 0.1, 0.1]),
        ("base_to_camera.quat_xyzw", [1e200, 1e200, 0.0, 0.0]),  # norm overflows
        ("base_to_camera.quat_xyzw", [0.0, 0.0, 0.0, 0.0]),
        ("base_to_camera.xyz", [0.0, float("nan"), 0.0]),
        ("min_confidence", 1.5),
        ("relocalize.timeout_s", 600.0),
        ("qos_depth", 0),
        ("iapr_iterations", True),
        ("tf_mode", "map_to_nowhere"),
        ("device", "cuda:x"),
        ("scenes.frames", "chess"),
        ("scenes.frames", "chess:/abs"),
        ("scenes.alignment", "chess: 1 2 3"),
        ("scenes.alignment", "chess: 0 0 0 0 0 0 0"),
    ],
)
def test_values_that_would_break_the_node_are_refused_with_one_sentence(name, value):
    reason = validate(name, value)
    assert reason is not None and reason.startswith(f"parameter {name}") and "\n" not in reason


def test_config_snapshot_and_scene_tables():
    cfg = config_from_values(
        {
            "image_topic": "cam/image",
            "image_transport": "compressed",
            "scenes.frames": "chess: chess_map, fire:fire_map",
            "scenes.allowed": "chess, fire",
            "scenes.alignment": "chess: 1 2 3 0 0 0 1",
            "base_to_camera.quat_xyzw": [0.0, 0.0, 0.0, 2.0],
        }
    )
    assert cfg.subscribed_topic == "cam/image/compressed" and cfg.camera_info == "cam/camera_info"
    assert cfg.scene_frames == {"chess": "chess_map", "fire": "fire_map"}
    assert cfg.allowed_scenes == ("chess", "fire")
    np.testing.assert_allclose(cfg.scene_alignment["chess"], [1, 2, 3, 1, 0, 0, 0])
    np.testing.assert_allclose(cfg.base_t_camera_override, [0, 0, 0, 1, 0, 0, 0])
    assert cfg.publish_tf is False and cfg.tf_mode == "map_to_odom" and cfg.output_pose == "base"
    assert cross_check(cfg) is None
    assert "base_frame" in cross_check(config_from_values({"base_frame": ""}))
    assert cross_check(config_from_values({"base_frame": "", "output_pose": "camera"})) is None


def test_echoed_values_are_quoted_and_bounded():
    msg = np_.validate("image_topic", "x" * 65536)  # echoed through imaging.quote: bounded, escaped
    assert msg is not None and len(msg) < 300 and "65536 characters" in msg
    assert "\\x1b" in np_.validate("backend", "\x1b[31m")
