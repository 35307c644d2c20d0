"""Point-group symmetry operators Cn, Dn, T, O, I in cisTEM's standard orientation.

* ``Cn`` -- n-fold axis along z.
* ``Dn`` -- Cn plus two-fold axes perpendicular to z, one along x.
* ``T``  -- two-fold axes along x, y, z; three-folds along the cube diagonals.
* ``O``  -- four-fold axes along x, y, z.
* ``I``  -- two-fold axes along x, y, z, three-fold along (1, 1, 1), five-fold
  along (0, 1, phi) (the "222" setting cisTEM uses for ``I``; it contains
  e.g. the two-fold about (1/2, 1/(2 phi), phi/2)).

Groups are generated from their generators by closure, so they are closed
under multiplication by construction and the tests check order and
membership of matrices taken from cisTEM's ``symmetry_matrix.cpp``.

Use in reconstruction: cisTEM inserts a particle once per operator with
matrix ``S_k @ M`` (``symmetry_matrices.rot_mat[k] * euler_matrix``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["symmetry_matrices", "parse_symmetry", "group_order", "expand_rotations"]

_PHI = (1.0 + 5.0 ** 0.5) / 2.0


def axis_rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation by ``angle_rad`` about ``axis`` (Rodrigues' formula), a 3x3 matrix.

    >>> np.round(axis_rotation([0, 0, 1], np.pi / 2) @ [1.0, 0.0, 0.0], 6).tolist()
    [0.0, 1.0, 0.0]
    """
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def close_group(generators: list[np.ndarray], limit: int = 200) -> np.ndarray:
    """All products of the generators (a finite group), identity first.

    >>> len(close_group([axis_rotation([0, 0, 1], np.pi / 2)]))
    4
    """
    elems = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                p = h @ g
                if not any(np.allclose(p, e, atol=1e-8) for e in elems):
                    elems.append(p)
                    new.append(p)
        frontier = new
        if len(elems) > limit:
            raise RuntimeError("generators do not form a finite point group")
    # exact zeros / +-1 where they should be (clean printing, stable results)
    out = np.array(elems)
    out[np.abs(out) < 1e-12] = 0.0
    return out


def parse_symmetry(symbol: str) -> tuple[str, int]:
    """``"C7"`` -> ``("C", 7)``, ``"I"`` -> ``("I", 0)``; ValueError if not valid."""
    s = symbol.strip().upper()
    if not s or s[0] not in "CDTOI":
        raise ValueError(f"unknown symmetry {symbol!r}; use Cn, Dn, T, O or I")
    kind, rest = s[0], s[1:]
    if kind in "CD":
        if not rest.isdigit() or int(rest) < 1:
            raise ValueError(f"symmetry {symbol!r} needs a positive order, e.g. C2, D7")
        return kind, int(rest)
    if rest not in ("",):
        raise ValueError(f"symmetry {symbol!r}: only the standard orientation of {kind} is supported")
    return kind, 0


def symmetry_matrices(symbol: str) -> np.ndarray:
    """Rotation matrices of the point group ``symbol``, shape (k, 3, 3), identity first."""
    kind, n = parse_symmetry(symbol)
    if kind == "C":
        ang = 2 * np.pi * np.arange(n) / n
        return np.array([axis_rotation([0, 0, 1], a) for a in ang]) if n > 1 else np.eye(3)[None]
    if kind == "D":
        cn = [axis_rotation([0, 0, 1], 2 * np.pi * i / n) for i in range(n)]
        two = axis_rotation([1, 0, 0], np.pi)
        out = np.array(cn + [c @ two for c in cn])
        out[np.abs(out) < 1e-12] = 0.0
        return out
    two_x = axis_rotation([1, 0, 0], np.pi)
    two_z = axis_rotation([0, 0, 1], np.pi)
    three = axis_rotation([1, 1, 1], 2 * np.pi / 3)
    if kind == "T":
        return close_group([two_x, two_z, three])
    if kind == "O":
        return close_group([axis_rotation([0, 0, 1], np.pi / 2), axis_rotation([1, 0, 0], np.pi / 2)])
    five = axis_rotation([0, 1, _PHI], 2 * np.pi / 5)
    return close_group([two_x, two_z, three, five])


def group_order(symbol: str) -> int:
    """Number of operators of the group (C n, D 2n, T 12, O 24, I 60)."""
    kind, n = parse_symmetry(symbol)
    return {"C": n, "D": 2 * n, "T": 12, "O": 24, "I": 60}[kind]


def expand_rotations(rotmats: np.ndarray, symbol: str) -> np.ndarray:
    """Every particle matrix times every operator: shape (n * k, 3, 3), particle-major.

    Row ``i * k + j`` is ``S_j @ M_i``, the matrix cisTEM inserts for
    particle i and operator j.
    """
    s = symmetry_matrices(symbol)
    r = np.asarray(rotmats, dtype=np.float64).reshape(-1, 3, 3)
    return (s[None, :, :, :] @ r[:, None, :, :]).reshape(-1, 3, 3)
