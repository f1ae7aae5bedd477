"""Property tests for the one module that owns pose/quaternion conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transforms3d.quaternions as tq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from apr_localizer import geometry as g

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)
vec3 = arrays(np.float64, 3, elements=finite)
quat_raw = arrays(np.float64, 4, elements=st.floats(-1, 1, allow_nan=False, width=64)).filter(
    lambda q: np.linalg.norm(q) > 1e-3
)
pose = st.builds(lambda t, q: np.concatenate([t, q]), vec3, quat_raw)
SETTINGS = settings(max_examples=60, deadline=None)


def _same_rotation(q1, q2, atol=1e-9):
    dot = np.abs(np.dot(g.quat_normalize(q1), g.quat_normalize(q2)))
    assert g.rotation_error_deg(q1, q2) < 1e-5 or np.isclose(dot, 1, atol=atol)


@SETTINGS
@given(quat_raw)
def test_normalize_is_unit_and_canonical(q):
    n = g.quat_normalize(q)
    assert np.isclose(np.linalg.norm(n), 1.0) and n[0] >= -1e-12
    assert g.rotation_error_deg(n, q) < 1e-5


def test_normalize_rejects_zero_and_nan():
    for bad in ([0, 0, 0, 0], [np.nan, 0, 0, 1]):
        with pytest.raises(ValueError, match="finite and non-zero"):
            g.quat_normalize(bad)


@SETTINGS
@given(quat_raw)
def test_ros_order_round_trip(q):
    ros = g.quat_to_ros(q)
    assert ros[3] == q[0] and np.array_equal(ros[:3], q[1:])
    np.testing.assert_array_equal(g.quat_from_ros(ros), q)


@SETTINGS
@given(quat_raw)
def test_matrix_conversions_agree_with_transforms3d(q):
    m = g.quat_to_matrix(q)
    np.testing.assert_allclose(m, tq.quat2mat(q / np.linalg.norm(q)), atol=1e-12)
    np.testing.assert_allclose(g.matrix_to_quat(m), g.quat_normalize(tq.mat2quat(m)), atol=1e-9)
    np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)


@SETTINGS
@given(pose, pose)
def test_compose_inverse_round_trips(a, b):
    ab = g.pose_compose(a, b)
    np.testing.assert_allclose(g.pose_compose(g.pose_inverse(a), ab)[:3], b[:3], atol=1e-8)
    _same_rotation(g.pose_compose(g.pose_inverse(a), ab)[3:], b[3:])
    ident = g.pose_compose(a, g.pose_inverse(a))
    np.testing.assert_allclose(ident, [0, 0, 0, 1, 0, 0, 0], atol=1e-8)
    np.testing.assert_allclose(g.pose_to_matrix(ab), g.pose_to_matrix(a) @ g.pose_to_matrix(b), atol=1e-8)
    np.testing.assert_allclose(g.matrix_to_pose(g.pose_to_matrix(ab)), ab, atol=1e-8)


@SETTINGS
@given(pose, pose)
def test_relative_pose_convention(a, b):
    rel = g.relative_pose(a, b)
    np.testing.assert_allclose(rel[:3], b[:3] - a[:3], atol=1e-12)  # world-frame difference
    r_ab = g.quat_to_matrix(a[3:]).T @ g.quat_to_matrix(b[3:])
    np.testing.assert_allclose(g.quat_to_matrix(rel[3:]), r_ab, atol=1e-9)
    back = g.apply_relative(a, rel)
    np.testing.assert_allclose(back[:3], b[:3], atol=1e-9)
    _same_rotation(back[3:], b[3:])
    flipped = g.apply_relative(b, g.flip_relative(rel))  # rel(b→a) applied to b gives a
    np.testing.assert_allclose(flipped[:3], a[:3], atol=1e-9)
    _same_rotation(flipped[3:], a[3:])


@SETTINGS
@given(pose, pose)
def test_iapr_update_recovers_the_query(query, neighbour):
    """If the network predicts rel(query→neighbour) exactly, one update lands on the query pose."""
    rel = g.relative_pose(query, neighbour)
    new = g.iapr_update(neighbour, rel * np.array([1, 1, 1, 3.0, 3.0, 3.0, 3.0]))  # q̂ scale must not matter
    np.testing.assert_allclose(new[:3], query[:3], atol=1e-9)
    _same_rotation(new[3:], query[3:])
    assert new[3] >= -1e-12


@SETTINGS
@given(pose, pose)
def test_error_metric_symmetry_and_range(a, b):
    pa, ra = g.pose_errors(a, b)
    pb, rb = g.pose_errors(b, a)
    assert np.isclose(pa, pb) and np.isclose(ra, rb, atol=1e-6)
    assert 0 <= ra <= 180
    assert np.isclose(g.rotation_error_deg(a[3:], -a[3:]), 0, atol=1e-5)  # q and -q are the same rotation


def test_rotation_error_is_clamped_not_nan():
    q = np.array([0.70710678118654757, 0.70710678118654757, 0, 0])
    assert g.rotation_error_deg(q, q * (1 + 1e-16)) == 0.0
    t = torch.tensor([[1.0, 1e-8, 0, 0]])
    assert torch.isfinite(g.rotation_error_deg_torch(t, t)).all()


def test_quat_average_and_slerp():
    rng = np.random.default_rng(0)
    base = g.quat_normalize(rng.normal(size=4))
    noise = [g.quat_multiply(base, g.quat_normalize([1, *(0.01 * rng.normal(size=3))])) for _ in range(50)]
    noise = [q if i % 2 else -q for i, q in enumerate(noise)]  # sign flips must not matter
    assert g.rotation_error_deg(g.quat_average(np.array(noise)), base) < 0.5
    q0, q1 = g.quat_normalize([1, 0, 0, 0]), g.quat_normalize([0, 0, 0, 1])
    mid = g.quat_slerp(q0, q1, 0.5)
    assert np.isclose(g.rotation_error_deg(q0, mid), 90) and np.isclose(g.rotation_error_deg(mid, q1), 90)


def test_map_to_odom_composition():
    rng = np.random.default_rng(1)

    def rand_pose():
        return np.concatenate([rng.normal(size=3), g.quat_normalize(rng.normal(size=4))])

    map_T_odom, odom_T_base, base_T_cam = rand_pose(), rand_pose(), rand_pose()
    map_T_cam = g.pose_compose(g.pose_compose(map_T_odom, odom_T_base), base_T_cam)
    map_T_base = g.camera_to_base(map_T_cam, base_T_cam)
    got = g.map_to_odom(map_T_base, odom_T_base)
    np.testing.assert_allclose(g.pose_to_matrix(got), g.pose_to_matrix(map_T_odom), atol=1e-9)


def test_batched_functions():
    rng = np.random.default_rng(2)
    a = np.concatenate([rng.normal(size=(5, 3)), rng.normal(size=(5, 4))], axis=1)
    b = np.concatenate([rng.normal(size=(5, 3)), rng.normal(size=(5, 4))], axis=1)
    batched = g.pose_compose(a, b)
    for i in range(5):
        np.testing.assert_allclose(batched[i], g.pose_compose(a[i], b[i]), atol=1e-12)
    assert g.rotation_error_deg(a[:, 3:], b[:, 3:]).shape == (5,)


def test_rotation_vectors_round_trip_and_match_transforms3d():
    rng = np.random.default_rng(5)
    axes = rng.normal(size=(50, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = rng.uniform(0.0, np.pi, 50)
    q = np.array([tq.axangle2quat(a, t) for a, t in zip(axes, angles)])
    v = g.quat_to_rotvec(q)
    np.testing.assert_allclose(v, axes * angles[:, None], atol=1e-9)
    np.testing.assert_allclose(g.quat_to_rotvec(-q), v, atol=1e-9)  # q and -q: the same (shorter) rotation
    np.testing.assert_allclose(g.quat_from_rotvec(v), g.quat_normalize(q), atol=1e-9)
    np.testing.assert_allclose(g.quat_to_rotvec([1.0, 1e-18, 0.0, 0.0]), [2e-18, 0.0, 0.0])
