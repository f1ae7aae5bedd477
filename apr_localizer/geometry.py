"""Pose and quaternion conventions: the one module that knows them.

Internal pose vector: ``[x, y, z, qw, qx, qy, qz]`` (w-first, Hamilton), camera-to-map: the position of the camera
in the map and the camera's orientation in the map, as in the 7-Scenes/Cambridge label CSVs. ROS messages use
``x, y, z, w``: convert only at the boundary with :func:`quat_to_ros` / :func:`quat_from_ros`.

Every numpy function accepts batches (``(..., 4)`` quaternions, ``(..., 7)`` poses) and computes in float64.
Torch variants (suffix ``_torch``) are used inside models, losses and exported graphs.

iAPR relative-pose convention (model_spec.md §7.2): for poses a, b

* ``t_ab = t_b - t_a`` (a world-frame difference, not rotated into camera a),
* ``R_ab = R_a^T R_b``,
* so ``t_b = t_a + t_ab`` and ``R_b = R_a R_ab``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ORIENTATIONS",
    "apply_relative",
    "camera_to_base",
    "map_to_odom",
    "flip_relative",
    "iapr_update",
    "iapr_update_torch",
    "matrix_to_pose",
    "matrix_to_quat",
    "pose_compose",
    "pose_errors",
    "pose_inverse",
    "pose_to_matrix",
    "position_error",
    "quat_average",
    "quat_conjugate",
    "quat_from_ros",
    "quat_from_rotvec",
    "quat_multiply",
    "quat_multiply_torch",
    "quat_normalize",
    "quat_normalize_torch",
    "quat_slerp",
    "quat_to_matrix",
    "quat_to_ros",
    "quat_to_rotvec",
    "relative_pose",
    "rotation_error_deg",
    "rotation_error_deg_torch",
    "to_camera_to_world",
]

#: What a model's (or a label file's) quaternion means: ``camera_to_world`` (the internal convention above; 7-Scenes,
#: synthetic, bags) or ``world_to_camera`` (upstream Cambridge Landmarks labels, VisualSFM): conjugate to convert.
ORIENTATIONS: tuple[str, ...] = ("camera_to_world", "world_to_camera")

_EPS = 1e-12


def _as64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def to_camera_to_world(pose, orientation: str) -> np.ndarray:
    """Poses ``(..., 7)`` whose quaternions follow ``orientation`` (:data:`ORIENTATIONS`) → camera-to-world.

    ``world_to_camera`` quaternions are conjugated (a copy); ``camera_to_world`` poses are returned as they are.
    """
    p = _as64(pose)
    if orientation == "camera_to_world":
        return p
    if orientation != "world_to_camera":
        raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    return np.concatenate([p[..., :3], quat_conjugate(p[..., 3:])], axis=-1)


# --------------------------------------------------------------------------------------------- quaternions (numpy)
def quat_normalize(q, canonical: bool = True) -> np.ndarray:
    """Normalise w-first quaternion(s) ``(..., 4)``; with ``canonical`` the sign makes ``w >= 0`` (unique form).

    A zero or non-finite quaternion raises ``ValueError`` (it has no orientation).
    """
    q = _as64(q)
    n = np.linalg.norm(q, axis=-1, keepdims=True)
    if not np.all(np.isfinite(q)) or np.any(n < _EPS):
        raise ValueError("quaternion must be finite and non-zero to be normalised")
    q = q / n
    if canonical:  # w >= 0; for w == 0 the first non-zero component decides, so the form is unique
        lead = q[..., 0]
        for i in range(1, 4):
            lead = np.where(np.abs(lead) < 1e-12, q[..., i], lead)
        q = np.where((lead < 0)[..., None], -q, q)
    return q


def quat_conjugate(q) -> np.ndarray:
    """Conjugate ``(w, -x, -y, -z)`` of w-first quaternion(s) ``(..., 4)``."""
    q = _as64(q)
    return q * np.array([1.0, -1.0, -1.0, -1.0])


def quat_multiply(a, b) -> np.ndarray:
    """Hamilton product ``a ⊗ b`` of w-first quaternions ``(..., 4)`` (rotation b first, then a)."""
    a, b = _as64(a), _as64(b)
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def quat_to_matrix(q) -> np.ndarray:
    """Rotation matrices ``(..., 3, 3)`` of w-first quaternions ``(..., 4)`` (normalised first)."""
    w, x, y, z = np.moveaxis(quat_normalize(q, canonical=False), -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=-2,
    )


def matrix_to_quat(m) -> np.ndarray:
    """Convert rotation matrices ``(..., 3, 3)`` to unit w-first quaternions ``(..., 4)`` with ``w >= 0``.

    Uses the symmetric-matrix eigenvector method (as transforms3d's ``mat2quat``), robust to slightly
    non-orthogonal input.
    """
    m = _as64(m)
    # Bar-Itzhack: names as in the row-major flattening of m (xx, yx, zx, xy, yy, zy, xz, yz, zz)
    xx, yx, zx = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    xy, yy, zy = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    xz, yz, zz = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    k = (
        np.stack(
            [
                np.stack([xx - yy - zz, yx + xy, zx + xz, yz - zy], -1),
                np.stack([yx + xy, yy - xx - zz, zy + yz, zx - xz], -1),
                np.stack([zx + xz, zy + yz, zz - xx - yy, xy - yx], -1),
                np.stack([yz - zy, zx - xz, xy - yx, xx + yy + zz], -1),
            ],
            axis=-2,
        )
        / 3.0
    )
    _, vecs = np.linalg.eigh(k)
    v = vecs[..., :, -1]  # eigenvector of the largest eigenvalue, (x, y, z, w)
    q = np.concatenate([v[..., 3:4], v[..., :3]], axis=-1)
    return quat_normalize(q)


def quat_slerp(q0, q1, t: float | np.ndarray) -> np.ndarray:
    """Spherical interpolation between unit quaternions (shortest arc); ``t`` in [0, 1]."""
    q0, q1 = quat_normalize(q0, False), quat_normalize(q1, False)
    t = _as64(t)[..., None]
    d = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(d < 0, -q1, q1)
    d = np.abs(d)
    theta = np.arccos(np.clip(d, -1.0, 1.0))
    s = np.sin(theta)
    small = s < 1e-9
    w0 = np.where(small, 1.0 - t, np.sin((1.0 - t) * theta) / np.where(small, 1.0, s))
    w1 = np.where(small, t, np.sin(t * theta) / np.where(small, 1.0, s))
    return quat_normalize(w0 * q0 + w1 * q1)


def quat_average(qs, weights=None) -> np.ndarray:
    """Weighted average of unit quaternions ``(N, 4)`` (Markley et al.: principal eigenvector), ``w >= 0``.

    Sign-invariant: ``q`` and ``-q`` count as the same rotation.
    """
    qs = quat_normalize(qs, canonical=False).reshape(-1, 4)
    w = np.ones(len(qs)) if weights is None else _as64(weights).reshape(-1)
    m = np.einsum("n,ni,nj->ij", w, qs, qs)
    _, vecs = np.linalg.eigh(m)
    return quat_normalize(vecs[:, -1])


# --------------------------------------------------------------------------------------------- ROS boundary
def quat_to_ros(q) -> np.ndarray:
    """w-first ``(..., 4)`` → ROS order ``(x, y, z, w)``."""
    q = _as64(q)
    return np.concatenate([q[..., 1:4], q[..., :1]], axis=-1)


def quat_from_ros(q_xyzw) -> np.ndarray:
    """ROS order ``(x, y, z, w)`` ``(..., 4)`` → w-first."""
    q = _as64(q_xyzw)
    return np.concatenate([q[..., 3:4], q[..., :3]], axis=-1)


# --------------------------------------------------------------------------------------------- poses (numpy)
def pose_to_matrix(p) -> np.ndarray:
    """Homogeneous transforms ``(..., 4, 4)`` from poses ``(..., 7)``."""
    p = _as64(p)
    t = np.zeros(p.shape[:-1] + (4, 4))
    t[..., :3, :3] = quat_to_matrix(p[..., 3:7])
    t[..., :3, 3] = p[..., :3]
    t[..., 3, 3] = 1.0
    return t


def matrix_to_pose(t) -> np.ndarray:
    """Poses ``(..., 7)`` (unit quaternion, ``w >= 0``) from homogeneous transforms ``(..., 4, 4)``."""
    t = _as64(t)
    return np.concatenate([t[..., :3, 3], matrix_to_quat(t[..., :3, :3])], axis=-1)


def pose_compose(a, b) -> np.ndarray:
    """``T_a · T_b`` for poses ``(..., 7)``: ``t = t_a + R_a t_b``, ``q = q_a ⊗ q_b`` (unit, ``w >= 0``)."""
    a, b = _as64(a), _as64(b)
    t = a[..., :3] + np.einsum("...ij,...j->...i", quat_to_matrix(a[..., 3:]), b[..., :3])
    q = quat_multiply(quat_normalize(a[..., 3:], False), quat_normalize(b[..., 3:], False))
    return np.concatenate([t, quat_normalize(q)], axis=-1)


def pose_inverse(p) -> np.ndarray:
    """``T^-1`` for poses ``(..., 7)``: ``t = -R^T t``, ``q = conj(q)`` (unit, ``w >= 0``)."""
    p = _as64(p)
    q = quat_conjugate(quat_normalize(p[..., 3:], False))
    t = -np.einsum("...ij,...j->...i", quat_to_matrix(q), p[..., :3])
    return np.concatenate([t, quat_normalize(q)], axis=-1)


# --------------------------------------------------------------------------------------------- iAPR convention
def relative_pose(a, b) -> np.ndarray:
    """Relative pose a→b in the iAPR convention: ``t_ab = t_b - t_a``, ``R_ab = R_a^T R_b`` (``w >= 0``)."""
    a, b = _as64(a), _as64(b)
    q = quat_multiply(quat_conjugate(quat_normalize(a[..., 3:], False)), quat_normalize(b[..., 3:], False))
    return np.concatenate([b[..., :3] - a[..., :3], quat_normalize(q)], axis=-1)


def apply_relative(a, rel) -> np.ndarray:
    """Inverse of :func:`relative_pose`: ``t_b = t_a + t_ab``, ``R_b = R_a R_ab`` (``w >= 0``)."""
    a, rel = _as64(a), _as64(rel)
    q = quat_multiply(quat_normalize(a[..., 3:], False), quat_normalize(rel[..., 3:], False))
    return np.concatenate([a[..., :3] + rel[..., :3], quat_normalize(q)], axis=-1)


def flip_relative(rel) -> np.ndarray:
    """rel(a→b) → rel(b→a) in the iAPR convention: negate the translation, conjugate the rotation."""
    rel = _as64(rel)
    return np.concatenate([-rel[..., :3], quat_conjugate(rel[..., 3:])], axis=-1)


def iapr_update(neighbour, rel_pred) -> np.ndarray:
    """One iAPR step: the network predicts rel(query→neighbour); return the query pose.

    ``t_new = t_n - t̂``, ``q_new = q_n ⊗ conj(q̂)`` with q̂ normalised; unit quaternion with ``w >= 0``.
    """
    rel = _as64(rel_pred)
    rel = np.concatenate([rel[..., :3], quat_normalize(rel[..., 3:], False)], axis=-1)
    return apply_relative(neighbour, flip_relative(rel))


# --------------------------------------------------------------------------------------------- error metrics
def quat_to_rotvec(q) -> np.ndarray:
    """Return rotation vectors ``(..., 3)`` (axis × angle, rad, angle in [0, π]) of w-first quaternions ``(..., 4)``.

    The quaternion is normalised to ``w >= 0`` (the shorter rotation); small angles use the limit ``2·v``.
    """
    u = quat_normalize(q)
    vn = np.linalg.norm(u[..., 1:], axis=-1)
    angle = 2.0 * np.arctan2(vn, u[..., 0])
    scale = np.where(vn > 1e-15, angle / np.maximum(vn, 1e-300), 2.0)
    return u[..., 1:] * scale[..., None]


def quat_from_rotvec(v) -> np.ndarray:
    """Return unit w-first quaternions ``(..., 4)`` of rotation vectors ``(..., 3)`` (axis × angle, rad)."""
    v = _as64(v)
    angle = np.linalg.norm(v, axis=-1)
    axis = v / np.maximum(angle, 1e-12)[..., None]
    half = angle / 2.0
    return np.concatenate([np.cos(half)[..., None], np.sin(half)[..., None] * axis], axis=-1)


def position_error(est, gt) -> np.ndarray:
    """Euclidean position error in metres, ``(...)``, from poses or positions ``(..., >=3)``."""
    return np.linalg.norm(_as64(est)[..., :3] - _as64(gt)[..., :3], axis=-1)


def rotation_error_deg(q_est, q_gt) -> np.ndarray:
    """Angle ``2·acos(|<q̂_est, q̂_gt>|)`` in degrees between w-first quaternions ``(..., 4)``.

    Both are normalised first and the dot product is clamped to [0, 1], so the result is never NaN.
    """
    a = quat_normalize(q_est, False)
    b = quat_normalize(q_gt, False)
    d = np.clip(np.abs(np.sum(a * b, axis=-1)), 0.0, 1.0)
    return np.degrees(2.0 * np.arccos(d))


def pose_errors(est, gt) -> tuple[np.ndarray, np.ndarray]:
    """``(position error m, orientation error deg)`` for poses ``(..., 7)``."""
    est, gt = _as64(est), _as64(gt)
    return position_error(est, gt), rotation_error_deg(est[..., 3:7], gt[..., 3:7])


# --------------------------------------------------------------------------------------------- torch variants
def quat_normalize_torch(q: torch.Tensor, canonical: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise w-first quaternions ``(..., 4)``; optionally flip the sign so that ``w >= 0``."""
    import torch

    q = q / q.norm(dim=-1, keepdim=True).clamp_min(eps)
    if canonical:
        q = torch.where(q[..., :1] < 0, -q, q)
    return q


def quat_multiply_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product ``a ⊗ b`` of w-first quaternions ``(..., 4)``."""
    import torch

    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def iapr_update_torch(neighbour: torch.Tensor, rel_pred: torch.Tensor) -> torch.Tensor:
    """Torch version of :func:`iapr_update` for ``(B, 7)`` tensors.

    Export- and CUDA-graph-friendly: no in-place writes and no tensors built from host values (a host→device copy
    cannot be captured in a CUDA graph).
    """
    import torch

    q_hat = quat_normalize_torch(rel_pred[..., 3:])
    conj = torch.cat([q_hat[..., :1], -q_hat[..., 1:]], dim=-1)
    q = quat_multiply_torch(quat_normalize_torch(neighbour[..., 3:]), conj)
    return torch.cat([neighbour[..., :3] - rel_pred[..., :3], quat_normalize_torch(q, canonical=True)], dim=-1)


def rotation_error_deg_torch(q_est: torch.Tensor, q_gt: torch.Tensor) -> torch.Tensor:
    """Torch version of :func:`rotation_error_deg` (clamped, never NaN)."""
    import torch

    d = (quat_normalize_torch(q_est) * quat_normalize_torch(q_gt)).sum(-1).abs().clamp(0.0, 1.0)
    return torch.rad2deg(2.0 * torch.acos(d))


# --------------------------------------------------------------------------------------------- TF helpers
def camera_to_base(map_T_camera, base_T_camera) -> np.ndarray:
    """``map_T_base = map_T_camera · (base_T_camera)^-1`` for poses ``(..., 7)``."""
    return pose_compose(map_T_camera, pose_inverse(base_T_camera))


def map_to_odom(map_T_base, odom_T_base) -> np.ndarray:
    """AMCL-style correction ``map_T_odom = map_T_base · (odom_T_base)^-1`` for poses ``(..., 7)``."""
    return pose_compose(map_T_base, pose_inverse(odom_T_base))
