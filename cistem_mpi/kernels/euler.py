"""Euler angles and rotation matrices in cisTEM's convention, and RELION's.

cisTEM (``src/core/angles_and_shifts.cpp``, ``RotationMatrix::SetToEulerRotation``)
builds, from the .par angles PHI, THETA, PSI (degrees),

    M = Rz(phi) @ Ry(theta) @ Rz(psi)

with the usual right-handed active rotations
``Rz(a) = [[cos a, -sin a, 0], [sin a, cos a, 0], [0, 0, 1]]`` and
``Ry(b) = [[cos b, 0, sin b], [0, 1, 0], [-sin b, 0, cos b]]``.
A particle's 2D Fourier coefficient at ``(kx, ky)`` is the 3D transform at
``M @ (kx, ky, 0)`` (``Image::ExtractSlice`` with ``RotateCoords``); in real
space the particle is the projection along z of ``V(M @ r)``.

RELION's matrix ``A(rot, tilt, psi)`` is the transpose of the same product
with ``rot = phi, tilt = theta, psi = psi``; RELION also samples its 3D
transform at ``A.T @ (kx, ky, 0)``.  So the angles carry over unchanged —
proven against images RELION itself projected (tests/test_kernels_projection.py).

Shifts: a cisTEM particle with ``SHX, SHY`` (Å) is the reference projection
*moved by* ``+SHX/pixel, +SHY/pixel`` (cisTEM centres it with
``PhaseShift(-SHX/pixel, -SHY/pixel)`` before comparing it with the
projection, reconstruct3d.cpp/refine3d.cpp).  RELION's particle sits at
``-rlnOrigin``, so ``SHX = -rlnOriginXAngst`` (= ``-rlnOriginX * pixel``).
See :func:`relion_to_cistem` and :mod:`cistem_mpi.kernels.shifts`.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "rotation_matrix", "rotation_matrix_2d", "matrix_to_euler", "relion_to_cistem",
    "cistem_to_relion", "random_rotations", "angular_distance", "relion_euler_to_matrix",
    "matrix_to_relion_euler", "rotvec_to_matrix", "rotvec_to_relion_euler", "relion_origin_to_shift",
    "shift_to_relion_origin",
]


def _rz(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    z, o = np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)


def _ry(b: np.ndarray) -> np.ndarray:
    c, s = np.cos(b), np.sin(b)
    z, o = np.zeros_like(b), np.ones_like(b)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


def rotation_matrix(phi: np.ndarray | float, theta: np.ndarray | float, psi: np.ndarray | float) -> np.ndarray:
    """cisTEM's rotation matrix ``Rz(phi) Ry(theta) Rz(psi)`` (angles in degrees).

    Parameters
    ----------
    phi, theta, psi : float or array
        Euler angles in degrees (broadcast together).  Note the argument
        order (phi, theta, psi) is cisTEM's ``AnglesAndShifts::Init`` order,
        not the .par column order (psi, theta, phi).

    Returns
    -------
    ndarray, shape (..., 3, 3), float64
    """
    p, t, s = np.broadcast_arrays(np.deg2rad(np.asarray(phi, dtype=np.float64)),
                                  np.deg2rad(np.asarray(theta, dtype=np.float64)),
                                  np.deg2rad(np.asarray(psi, dtype=np.float64)))
    return _rz(p) @ _ry(t) @ _rz(s)


def rotation_matrix_2d(psi: np.ndarray | float) -> np.ndarray:
    """In-plane rotation ``[[cos, -sin], [sin, cos]]`` (degrees), shape (..., 2, 2)."""
    a = np.deg2rad(np.asarray(psi, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def matrix_to_euler(m: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`rotation_matrix`: (phi, theta, psi) in degrees.

    theta is in [0, 180]; phi and psi in (-180, 180].  At the poles
    (theta = 0 or 180) only phi +/- psi is defined; psi is set to 0 there.
    """
    m = np.asarray(m, dtype=np.float64)
    r22 = np.clip(m[..., 2, 2], -1.0, 1.0)
    theta = np.arccos(r22)
    st = np.sin(theta)
    regular = st > eps
    phi = np.where(regular, np.arctan2(m[..., 1, 2], m[..., 0, 2]), 0.0)
    psi = np.where(regular, np.arctan2(m[..., 2, 1], -m[..., 2, 0]), 0.0)
    north = (~regular) & (r22 > 0)
    south = (~regular) & (r22 <= 0)
    phi = np.where(north, np.arctan2(m[..., 1, 0], m[..., 0, 0]), phi)
    phi = np.where(south, np.arctan2(-m[..., 1, 0], -m[..., 0, 0]), phi)
    return np.rad2deg(phi), np.rad2deg(theta), np.rad2deg(psi)


def relion_origin_to_shift(origin_angst: np.ndarray | float) -> np.ndarray:
    """cisTEM's SHX (or SHY) in Å of a RELION origin in Å: the particle sits at ``-rlnOrigin``.

    The one place of this sign convention (STAR and cryoSPARC readers, :func:`relion_to_cistem`).
    Written ``0.0 - x`` so that a zero origin gives ``+0.0``, never a ``-0`` in a written file.
    Multiply RELION < 3.1 origins in pixels (``rlnOriginX``) by the pixel size first.

    Parameters
    ----------
    origin_angst : float or array
        ``rlnOriginXAngst`` (or Y), Å.

    Returns
    -------
    ndarray, float64

    Examples
    --------
    >>> relion_origin_to_shift(np.array([2.5, 0.0])).tolist()
    [-2.5, 0.0]
    """
    return 0.0 - np.asarray(origin_angst, dtype=np.float64)


def shift_to_relion_origin(shift_angst: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`relion_origin_to_shift`: ``rlnOriginXAngst`` of SHX (Å).

    Parameters
    ----------
    shift_angst : float or array
        SHX (or SHY), Å.

    Returns
    -------
    ndarray, float64

    Examples
    --------
    >>> shift_to_relion_origin(np.array([-2.5, 0.0])).tolist()
    [2.5, 0.0]
    """
    return 0.0 - np.asarray(shift_angst, dtype=np.float64)


def relion_to_cistem(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray,
                     origin_x_angst: np.ndarray | float = 0.0,
                     origin_y_angst: np.ndarray | float = 0.0) -> dict[str, np.ndarray]:
    """RELION angles/origins to cisTEM .par values.

    Returns ``{"phi", "theta", "psi", "shx", "shy"}`` with ``phi = rot``,
    ``theta = tilt``, ``psi = psi`` and ``shx = -rlnOriginXAngst``,
    ``shy = -rlnOriginYAngst`` (Å).  For RELION < 3.1 files multiply
    ``rlnOriginX`` (pixels) by the pixel size first.
    """
    return {
        "phi": np.asarray(rot, dtype=np.float64),
        "theta": np.asarray(tilt, dtype=np.float64),
        "psi": np.asarray(psi, dtype=np.float64),
        "shx": relion_origin_to_shift(origin_x_angst),
        "shy": relion_origin_to_shift(origin_y_angst),
    }


def cistem_to_relion(phi: np.ndarray, theta: np.ndarray, psi: np.ndarray,
                     shx: np.ndarray | float = 0.0, shy: np.ndarray | float = 0.0) -> dict[str, np.ndarray]:
    """Inverse of :func:`relion_to_cistem`: ``rot, tilt, psi, origin_x_angst, origin_y_angst``."""
    return {
        "rot": np.asarray(phi, dtype=np.float64),
        "tilt": np.asarray(theta, dtype=np.float64),
        "psi": np.asarray(psi, dtype=np.float64),
        "origin_x_angst": shift_to_relion_origin(shx),
        "origin_y_angst": shift_to_relion_origin(shy),
    }


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices uniform on SO(3) (Haar measure), float64 (n, 3, 3).

    Uses uniformly distributed unit quaternions (Shoemake 1992).
    """
    u1, u2, u3 = rng.random((3, n))
    a, b = np.sqrt(1.0 - u1), np.sqrt(u1)
    w = a * np.sin(2 * np.pi * u2)
    x = a * np.cos(2 * np.pi * u2)
    y = b * np.sin(2 * np.pi * u3)
    z = b * np.cos(2 * np.pi * u3)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def angular_distance(m1: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """Rotation angle (degrees) of ``m1^T m2``: the geodesic distance on SO(3)."""
    r = np.swapaxes(np.asarray(m1), -1, -2) @ np.asarray(m2)
    tr = np.clip((np.trace(r, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    return np.rad2deg(np.arccos(tr))


# ---------------------------------------------------------------- RELION's matrix, axis-angle poses (cryoSPARC)


def relion_euler_to_matrix(rot: np.ndarray | float, tilt: np.ndarray | float,
                           psi: np.ndarray | float) -> np.ndarray:
    """RELION's ``Euler_angles2matrix``: ``A(rot, tilt, psi)``, the transpose of :func:`rotation_matrix`.

    Parameters
    ----------
    rot, tilt, psi : float or array
        RELION Euler angles in degrees (broadcast together).

    Returns
    -------
    ndarray, shape (..., 3, 3), float64

    Examples
    --------
    >>> a = relion_euler_to_matrix(30.0, 40.0, -50.0)
    >>> bool(np.allclose(a, rotation_matrix(30.0, 40.0, -50.0).T))
    True
    """
    a, b, g = (np.deg2rad(np.asarray(x, dtype=np.float64)) for x in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(np.broadcast(a, b, g).shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def matrix_to_relion_euler(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`relion_euler_to_matrix` (RELION's ``Euler_matrix2angles``).

    Parameters
    ----------
    m : array, shape (..., 3, 3)
        RELION Euler matrices.

    Returns
    -------
    rot, tilt, psi : ndarray
        Degrees, tilt in [0, 180]; at gimbal lock (tilt 0 or 180) psi is 0.

    Examples
    --------
    >>> [round(float(x), 6) for x in matrix_to_relion_euler(relion_euler_to_matrix(30.0, 40.0, -50.0))]
    [30.0, 40.0, -50.0]
    """
    m = np.asarray(m, dtype=np.float64)
    abs_sb = np.sqrt(m[..., 0, 2] ** 2 + m[..., 1, 2] ** 2)
    regular = abs_sb > 16 * np.finfo(np.float64).eps
    # regular case: sin(tilt) > 0
    psi = np.arctan2(m[..., 1, 2], -m[..., 0, 2])
    rot = np.arctan2(m[..., 2, 1], m[..., 2, 0])
    tilt = np.arctan2(abs_sb, m[..., 2, 2])
    # gimbal lock (tilt 0 or 180): all in-plane rotation goes to rot, psi = 0
    flipped = m[..., 2, 2] < 0
    rot_lock = np.where(flipped, np.arctan2(-m[..., 0, 1], -m[..., 0, 0]), np.arctan2(m[..., 0, 1], m[..., 0, 0]))
    rot = np.where(regular, rot, rot_lock)
    psi = np.where(regular, psi, 0.0)
    tilt = np.where(regular, tilt, np.where(flipped, np.pi, 0.0))
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def rotvec_to_matrix(v: np.ndarray) -> np.ndarray:
    """Rotation matrices of axis-angle vectors (Rodrigues' formula).

    Parameters
    ----------
    v : array, shape (..., 3)
        Rotation axis times angle (radians); the zero vector is the identity.

    Returns
    -------
    ndarray, shape (..., 3, 3), float64

    Examples
    --------
    >>> np.round(rotvec_to_matrix(np.array([0.0, 0.0, np.pi / 2])), 6).tolist()
    [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    v = np.asarray(v, dtype=np.float64)
    theta = np.linalg.norm(v, axis=-1)
    safe = np.where(theta > 0, theta, 1.0)
    k = v / safe[..., None]
    kx, ky, kz = k[..., 0], k[..., 1], k[..., 2]
    K = np.zeros(v.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2] = -kz, ky
    K[..., 1, 0], K[..., 1, 2] = kz, -kx
    K[..., 2, 0], K[..., 2, 1] = -ky, kx
    s, c = np.sin(theta)[..., None, None], np.cos(theta)[..., None, None]
    eye = np.broadcast_to(np.eye(3), K.shape)
    return eye + s * K + (1 - c) * (K @ K)


def rotvec_to_relion_euler(pose: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cryoSPARC axis-angle poses -> RELION (rot, tilt, psi) in degrees.

    ``A = Rodrigues(pose).T`` is RELION's Euler matrix (pyem's ``expmap``
    builds that transpose directly).

    Parameters
    ----------
    pose : array, shape (n, 3)
        cryoSPARC ``alignments3D/pose`` (radians).

    Returns
    -------
    rot, tilt, psi : ndarray
        Degrees (see :func:`matrix_to_relion_euler`).

    Examples
    --------
    >>> [round(float(x[0]), 6) for x in rotvec_to_relion_euler(np.array([[0.0, 0.0, np.pi / 2]]))]
    [90.0, 0.0, 0.0]
    """
    r = rotvec_to_matrix(pose)
    return matrix_to_relion_euler(np.swapaxes(r, -1, -2))
