"""Insertion of image transforms into 3D Fourier accumulators (backprojection).

Reconstruction (what a reconstruct/refine driver does)::

    P = padded_size(N, 2.0)
    data, weight = new_accumulators(P)                 # complex64 / float32, (P, P, P//2+1)
    for batch of particles:
        f = ft2(images)                                # (n, N, N//2+1)
        f = phase_shift(f, -shx/ps, -shy/ps)            # centre the particles
        ctf = ctf_2d_stack(N, ps, ...)                 # (n, N, N//2+1)
        insert_slices(data, weight, f, R, ctf=ctf)     # data += ctf*f, weight += ctf^2
    # (MPI: reduce-scatter data/weight along axis 0; each rank owns rows z0:z1)
    ft = normalise_ft(data, weight, wiener=...)        # elementwise, works on any slab
    vol = ft_to_volume(ft, N, method="linear")         # inverse FFT, crop, grid-correct

Array layout and z-slabs
------------------------
The accumulators are the rfft half layout of the padded volume,
``[kz, ky, kx]`` with shape ``(P, P, P//2 + 1)``, C order: axis 0 (kz, in
``fftfreq`` order: row ``i`` holds frequency ``i`` for ``i < (P+1)//2``
and ``i - P`` above) is the slowest axis, so a z-slab ``rows z0:z1`` is one
contiguous block.  ``insert_slices(..., z_range=(z0, z1))`` accepts
accumulators of shape ``(z1 - z0, P, P//2 + 1)`` and adds only the
contributions that fall in rows z0..z1-1 -- the result equals the same rows
of a full insertion (tested).  :func:`slab_bounds` splits P rows over ranks.

Hermitian bookkeeping
---------------------
Only kx >= 0 is stored.  ``mode="reconstruct"`` (default) adds to the
stored half exactly what inserting the *full* image transform (both
Friedel halves) into a full 3D grid would put there, including the planes
kx = 0 and kx = P/2 where both k and -k are stored.  ``mode="adjoint"`` is
the exact adjoint of :func:`cistem_mpi.kernels.projection.extract_slices`
(for gradient-type uses and for the tests).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.interpolation import (
    locate, n_taps, tap_weights, apodization_3d, method_code,
)

__all__ = ["new_accumulators", "insert_slices", "normalise_ft", "ft_to_volume",
           "reconstruct", "slab_bounds", "insert_slices_numpy"]


def new_accumulators(padded: int, z_range: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed numerator (complex64) and weight (float32) accumulators.

    Shape ``(P, P, P//2+1)``, or ``(z1-z0, P, P//2+1)`` for a slab.
    """
    z0, z1 = (0, padded) if z_range is None else z_range
    shape = (z1 - z0, padded, padded // 2 + 1)
    return np.zeros(shape, dtype=np.complex64), np.zeros(shape, dtype=np.float32)


def slab_bounds(padded: int, n_parts: int) -> list[tuple[int, int]]:
    """Split the P kz-rows into ``n_parts`` contiguous slabs (sizes differ by <= 1).

    The first ``P % n_parts`` slabs get one row more; with more parts than
    rows the last slabs are empty.
    """
    if padded < 0 or n_parts < 1:
        raise ValueError("need padded >= 0 and n_parts >= 1")
    base, extra = divmod(padded, n_parts)
    out, z = [], 0
    for i in range(n_parts):
        size = base + (1 if i < extra else 0)
        out.append((z, z + size))
        z += size
    return out


@njit(cache=True, inline="always")
def _add(data, weight, z0, z1, zs, ys, xs, vr, vi, w):
    if zs >= z0 and zs < z1:
        data[zs - z0, ys, xs] += complex(vr, vi)
        weight[zs - z0, ys, xs] += w


@njit(cache=True)
def _insert(data, weight, z0, z1, p, fts, ctf, has_ctf, imgw, rot, scale, nimg, rmax2, method, mode):
    half = p // 2
    nt = n_taps(method)
    wx = np.zeros(4)
    wy = np.zeros(4)
    wz = np.zeros(4)
    nxh = nimg // 2 + 1
    even_p = (p % 2) == 0
    for i in range(rot.shape[0]):
        r00 = rot[i, 0, 0] * scale
        r01 = rot[i, 0, 1] * scale
        r10 = rot[i, 1, 0] * scale
        r11 = rot[i, 1, 1] * scale
        r20 = rot[i, 2, 0] * scale
        r21 = rot[i, 2, 1] * scale
        gi = imgw[i]
        for iy in range(nimg):
            ky = iy if iy < (nimg + 1) // 2 else iy - nimg
            for ix in range(nxh):
                if ix * ix + ky * ky > rmax2:
                    continue
                val = fts[i, iy, ix]
                c = 1.0
                if has_ctf:
                    c = ctf[i, iy, ix]
                g = gi
                if mode == 1 and (ix == 0 or (2 * ix == nimg)):
                    # self-conjugate image columns hold both k and -k: count half each
                    g = 0.5 * gi
                vr = val.real * c * g
                vi = val.imag * c * g
                cw = c * c * g
                x = r00 * ix + r01 * ky
                y = r10 * ix + r11 * ky
                z = r20 * ix + r21 * ky
                if x < 0.0:
                    x = -x
                    y = -y
                    z = -z
                    vi = -vi
                bx = tap_weights(method, x, wx)
                by = tap_weights(method, y, wy)
                bz = tap_weights(method, z, wz)
                for cz in range(nt):
                    for b in range(nt):
                        wzy = wz[cz] * wy[b]
                        if wzy == 0.0:
                            continue
                        for a in range(nt):
                            w = wzy * wx[a]
                            if w == 0.0:
                                continue
                            zs, ys, xs, cj = locate(bx + a, by + b, bz + cz, p, half)
                            tr = w * vr
                            ti = -w * vi if cj else w * vi
                            _add(data, weight, z0, z1, zs, ys, xs, tr, ti, w * cw)
                            if mode == 1 and (xs == 0 or (even_p and xs == half)):
                                # both k and -k are stored on this plane: the Friedel
                                # partner of the image adds the conjugate at -k
                                _add(data, weight, z0, z1, (p - zs) % p, (p - ys) % p, xs,
                                     tr, -ti, w * cw)


def insert_slices(data: np.ndarray, weight: np.ndarray, fts: np.ndarray, rotmats: np.ndarray,
                  ctf: np.ndarray | None = None, image_weights: np.ndarray | None = None,
                  z_range: tuple[int, int] | None = None, method: str = "linear",
                  max_radius: float | None = None, mode: str = "reconstruct") -> None:
    """Add CTF-weighted image transforms into the accumulators, in place.

    For every image i and frequency k of its half plane (within
    ``max_radius``), ``g_i * ctf * F_i(k)`` is spread into ``data`` and
    ``g_i * ctf^2`` into ``weight`` around ``(P/N) * M_i @ (kx, ky, 0)``.

    Parameters
    ----------
    data, weight : ndarray
        Accumulators from :func:`new_accumulators` (full or slab).
    fts : ndarray, complex, shape (n, N, N//2+1)
        Centred image transforms (:func:`cistem_mpi.kernels.fft.ft2`), already
        shifted to the centre.
    rotmats : ndarray, shape (n, 3, 3)
        cisTEM rotation matrices (with symmetry: ``sym @ R`` per operator).
    ctf : ndarray, shape (n, N, N//2+1), optional
        CTF of each image (``None``: 1).
    image_weights : ndarray, shape (n,), optional
        Per-image scalar weights g_i (e.g. occupancy); default 1.
    z_range : (int, int), optional
        Rows ``z0:z1`` held by ``data``/``weight`` (slab insertion).
    method : {"linear", "nearest"} (``"cubic"`` only with ``mode="adjoint"``)
        Cubic kernels have negative lobes: summed weights can vanish or turn
        negative, so weight normalisation is unstable with them.
    max_radius : float, optional
        In Fourier pixels of the N-image; default ``N//2``.
    mode : {"reconstruct", "adjoint"}
        See the module docstring.
    """
    fts = np.asarray(fts)
    if fts.ndim == 2:
        fts = fts[None]
    fts = np.ascontiguousarray(fts, dtype=np.complex64)
    n, nimg = fts.shape[0], fts.shape[1]
    if fts.shape[2] != nimg // 2 + 1:
        raise ValueError(f"image transforms must be (n, N, N//2+1), got {fts.shape}")
    r = np.ascontiguousarray(np.asarray(rotmats, dtype=np.float64).reshape(-1, 3, 3))
    if r.shape[0] != n:
        raise ValueError("one rotation matrix per image is required")
    p = data.shape[1]
    z0, z1 = (0, p) if z_range is None else (int(z_range[0]), int(z_range[1]))
    if data.shape != (z1 - z0, p, p // 2 + 1) or weight.shape != data.shape:
        raise ValueError(f"accumulator shape {data.shape} does not match z_range {z0}:{z1} of P={p}")
    if data.dtype != np.complex64 or weight.dtype != np.float32:
        raise ValueError("accumulators must be complex64 (data) and float32 (weight)")
    has_ctf = ctf is not None
    c = (np.ascontiguousarray(ctf, dtype=np.float32).reshape(fts.shape) if has_ctf
         else np.zeros((1, 1, 1), dtype=np.float32))
    g = (np.ones(n) if image_weights is None
         else np.ascontiguousarray(np.broadcast_to(np.asarray(image_weights, dtype=np.float64), (n,))))
    rmax = nimg // 2 if max_radius is None else float(max_radius)
    if mode not in ("reconstruct", "adjoint"):
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "reconstruct" and method == "cubic":
        raise ValueError("cubic insertion is only available as the adjoint (mode='adjoint'); "
                         "reconstruct with 'linear'")
    _insert(data, weight, z0, z1, p, fts, c, has_ctf, g, r, p / nimg, nimg, rmax * rmax,
            method_code(method), 1 if mode == "reconstruct" else 0)


def normalise_ft(data: np.ndarray, weight: np.ndarray, wiener: float = 0.0,
                 min_weight: float = 1e-6) -> np.ndarray:
    """``data / (weight + wiener)``, zero where ``weight <= min_weight``.

    Elementwise, so each MPI rank can normalise its own z-slab.
    """
    w = weight.astype(np.float32) + np.float32(wiener)
    out = np.zeros_like(data)
    ok = weight > min_weight
    out[ok] = data[ok] / w[ok]
    return out


def ft_to_volume(ft: np.ndarray, n: int, method: str = "linear", grid_correct: bool = True) -> np.ndarray:
    """Padded half-layout transform -> real n-cube (centre n//2), gridding-corrected."""
    p = ft.shape[0]
    big = _fft.iftn(ft.astype(np.complex64, copy=False), nx=p)
    o = p // 2 - n // 2
    vol = big[o:o + n, o:o + n, o:o + n].astype(np.float32)
    if grid_correct:
        vol = vol / apodization_3d(n, p, method)
    return np.ascontiguousarray(vol)


def reconstruct(images: np.ndarray, rotmats: np.ndarray, ctf: np.ndarray | None = None,
                pad: float = 2.0, method: str = "linear", wiener: float = 0.0,
                shifts_px: np.ndarray | None = None) -> np.ndarray:
    """Direct Fourier reconstruction of real images in one call (small jobs, tests).

    ``shifts_px`` (n, 2) are the particles' (dx, dy) in pixels as in the
    .par convention (particle = projection moved by +shift); they are undone
    before insertion.
    """
    from cistem_mpi.kernels.shifts import phase_shift

    images = np.asarray(images, dtype=np.float32)
    nimg = images.shape[-1]
    f = _fft.ft2(images)
    if shifts_px is not None:
        s = np.asarray(shifts_px, dtype=np.float64)
        f = phase_shift(f, -s[:, 0], -s[:, 1])
    p = int(round(pad * nimg))
    data, weight = new_accumulators(p)
    insert_slices(data, weight, f, rotmats, ctf=ctf, method=method)
    return ft_to_volume(normalise_ft(data, weight, wiener), nimg, method)


def insert_slices_numpy(data: np.ndarray, weight: np.ndarray, fts: np.ndarray, rotmats: np.ndarray,
                        ctf: np.ndarray | None = None, max_radius: float | None = None) -> None:
    """Trilinear ``mode="reconstruct"`` insertion with numpy only (full accumulators).

    Inserts every point of the *full* image plane into a full (P, P, P) grid
    with plain trilinear weights and keeps the kx >= 0 half -- the obvious
    definition that :func:`insert_slices` must reproduce.  Baseline for the
    benchmark and reference for the tests.  (At exactly the Nyquist radius
    the two differ by design: the full plane holds kx = -N/2 only, while
    :func:`insert_slices` splits that column between +N/2 and -N/2.)
    """
    fts = np.asarray(fts, dtype=np.complex64).reshape(-1, fts.shape[-2], fts.shape[-1])
    n, nimg = fts.shape[0], fts.shape[1]
    p = data.shape[1]
    s = p / nimg
    r = np.asarray(rotmats, dtype=np.float64).reshape(-1, 3, 3)
    kyv = np.fft.fftfreq(nimg, 1.0 / nimg)
    ky, kx = np.meshgrid(kyv, kyv, indexing="ij")
    rmax = nimg // 2 if max_radius is None else float(max_radius)
    inside = (kx * kx + ky * ky) <= rmax * rmax
    full_d = np.zeros((p, p, p), dtype=np.complex128)
    full_w = np.zeros((p, p, p), dtype=np.float64)
    for i in range(n):
        full_img = np.fft.fft2(np.fft.irfft2(fts[i], s=(nimg, nimg)))
        c = np.ones((nimg, nimg)) if ctf is None else _full_from_half(np.asarray(ctf[i]), nimg)
        v = (full_img * c)[inside]
        cw = (c * c)[inside]
        m = r[i] * s
        x = m[0, 0] * kx[inside] + m[0, 1] * ky[inside]
        y = m[1, 0] * kx[inside] + m[1, 1] * ky[inside]
        z = m[2, 0] * kx[inside] + m[2, 1] * ky[inside]
        x0, y0, z0 = np.floor(x), np.floor(y), np.floor(z)
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    w = ((x - x0) if dx else 1 - (x - x0)) * ((y - y0) if dy else 1 - (y - y0)) * \
                        ((z - z0) if dz else 1 - (z - z0))
                    xi = (x0 + dx).astype(np.int64) % p
                    yi = (y0 + dy).astype(np.int64) % p
                    zi = (z0 + dz).astype(np.int64) % p
                    np.add.at(full_d, (zi, yi, xi), w * v)
                    np.add.at(full_w, (zi, yi, xi), w * cw)
    data += full_d[:, :, :p // 2 + 1].astype(np.complex64)
    weight += full_w[:, :, :p // 2 + 1].astype(np.float32)


def _full_from_half(h: np.ndarray, n: int) -> np.ndarray:
    """Expand a real, even half-layout array (e.g. a CTF) to the full fftfreq layout."""
    full = np.zeros((n, n), dtype=np.float64)
    full[:, : n // 2 + 1] = h
    kx = np.arange(n // 2 + 1, n)
    # value at (ky, kx) with kx > n/2 equals value at (-ky, n - kx)
    ky_neg = (-np.arange(n)) % n
    full[:, kx] = h[ky_neg][:, n - kx]
    return full
