"""Euler angles <-> matrices in cisTEM's convention (cistem_mpi.kernels.euler)."""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.transform import Rotation

from cistem_mpi.kernels.euler import (
    angular_distance, cistem_to_relion, matrix_to_euler, matrix_to_relion_euler, random_rotations,
    relion_euler_to_matrix, relion_to_cistem, rotation_matrix, rotvec_to_matrix, rotvec_to_relion_euler,
)


def _cistem_elements(phi, theta, psi):
    # the nine elements as cisTEM's GenerateEulerMatrices writes them (m[row][col])
    cf, sf = math.cos(math.radians(phi)), math.sin(math.radians(phi))
    ct, st = math.cos(math.radians(theta)), math.sin(math.radians(theta))
    cp, sp = math.cos(math.radians(psi)), math.sin(math.radians(psi))
    m = np.empty((3, 3))
    m[0, 0] = cf * ct * cp - sf * sp
    m[1, 0] = sf * ct * cp + cf * sp
    m[2, 0] = -st * cp
    m[0, 1] = -cf * ct * sp - sf * cp
    m[1, 1] = -sf * ct * sp + cf * cp
    m[2, 1] = st * sp
    m[0, 2] = st * cf
    m[1, 2] = st * sf
    m[2, 2] = ct
    return m


def test_matrix_equals_cistem_elements():
    rng = np.random.default_rng(0)
    for phi, theta, psi in rng.uniform([-180, 0, -180], [180, 180, 180], (20, 3)):
        assert np.allclose(rotation_matrix(phi, theta, psi), _cistem_elements(phi, theta, psi), atol=1e-12)


def test_vectorised_and_proper_rotation():
    rng = np.random.default_rng(1)
    a = rng.uniform(-180, 180, (3, 50))
    m = rotation_matrix(*a)
    assert m.shape == (50, 3, 3)
    assert np.allclose(m @ np.swapaxes(m, -1, -2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(m), 1.0)


def test_matrix_to_euler_round_trip_including_poles():
    rng = np.random.default_rng(2)
    phi, theta, psi = rng.uniform(-180, 180, 100), rng.uniform(0, 180, 100), rng.uniform(-180, 180, 100)
    theta[:5] = 0.0
    theta[5:10] = 180.0
    m = rotation_matrix(phi, theta, psi)
    back = rotation_matrix(*matrix_to_euler(m))
    assert np.allclose(back, m, atol=1e-9)
    p2, t2, s2 = matrix_to_euler(m[10:])
    assert np.allclose(t2, theta[10:], atol=1e-7)
    assert np.allclose(np.cos(np.radians(p2 - phi[10:])), 1, atol=1e-9)


def test_random_rotations_are_uniform_on_so3():
    r = random_rotations(20000, np.random.default_rng(3))
    assert np.allclose(r @ np.swapaxes(r, -1, -2), np.eye(3), atol=1e-10)
    # Haar measure: E[R] = 0, cos(theta) uniform on [-1, 1], rotation angle density (1 - cos w)/pi
    assert np.abs(r.mean(0)).max() < 0.02
    _, theta, _ = matrix_to_euler(r)
    hist, _ = np.histogram(np.cos(np.radians(theta)), bins=10, range=(-1, 1))
    assert np.abs(hist / len(r) - 0.1).max() < 0.01
    w = np.radians(angular_distance(np.eye(3)[None], r))
    assert abs(w.mean() - (math.pi / 2 + 2 / math.pi)) < 0.02


def test_relion_conversion_round_trip_and_shift_sign():
    c = relion_to_cistem(10.0, 20.0, 30.0, origin_x_angst=5.5, origin_y_angst=-2.0)
    assert (c["phi"], c["theta"], c["psi"]) == (10.0, 20.0, 30.0)
    assert (c["shx"], c["shy"]) == (-5.5, 2.0)
    r = cistem_to_relion(c["phi"], c["theta"], c["psi"], c["shx"], c["shy"])
    assert (r["rot"], r["tilt"], r["psi"], r["origin_x_angst"], r["origin_y_angst"]) == (10, 20, 30, 5.5, -2.0)


def test_angular_distance():
    a = rotation_matrix(0, 0, 0)
    b = rotation_matrix(0, 0, 37)
    assert abs(angular_distance(a, b) - 37) < 1e-9


def test_relion_matrix_matches_scipy_zyz():
    # RELION's A(rot, tilt, psi) is the transpose of the intrinsic ZYZ rotation (rot, tilt, psi)
    rng = np.random.default_rng(0)
    ang = np.stack([rng.uniform(-180, 180, 500), rng.uniform(0, 180, 500), rng.uniform(-180, 180, 500)], 1)
    a = relion_euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    ref = np.swapaxes(Rotation.from_euler("ZYZ", ang, degrees=True).as_matrix(), 1, 2)
    np.testing.assert_allclose(a, ref, atol=1e-12)
    rot, tilt, psi = matrix_to_relion_euler(a)
    np.testing.assert_allclose(relion_euler_to_matrix(rot, tilt, psi), a, atol=1e-12)
    assert np.all((tilt >= 0) & (tilt <= 180))
    # gimbal lock: tilt 0 and 180 still give the same matrix back
    for t in (0.0, 180.0):
        m = relion_euler_to_matrix(35.0, t, -20.0)
        np.testing.assert_allclose(relion_euler_to_matrix(*matrix_to_relion_euler(m)), m, atol=1e-12)


def test_rotvec_matrix_against_series_and_scipy():
    # slow, obvious reference: the exponential series of the skew matrix [v]x, summed term by term
    rng = np.random.default_rng(3)
    v = rng.normal(size=(50, 3)) * rng.uniform(0, 3, (50, 1))
    v[0] = 0.0
    got = rotvec_to_matrix(v)
    for i in range(len(v)):
        k = np.array([[0, -v[i, 2], v[i, 1]], [v[i, 2], 0, -v[i, 0]], [-v[i, 1], v[i, 0], 0]])
        term, ref = np.eye(3), np.eye(3)
        for j in range(1, 60):
            term = term @ k / j
            ref = ref + term
        np.testing.assert_allclose(got[i], ref, atol=1e-12)
    np.testing.assert_allclose(got, Rotation.from_rotvec(v).as_matrix(), atol=1e-12)
    # RELION's A is the transpose of the pose's rotation
    rot, tilt, psi = rotvec_to_relion_euler(v)
    np.testing.assert_allclose(relion_euler_to_matrix(rot, tilt, psi), np.swapaxes(got, 1, 2), atol=1e-12)
