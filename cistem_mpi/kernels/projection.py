"""Central-slice extraction (projection) from a padded 3D Fourier volume.

Typical use (refinement, simulation)::

    vft = prepare_volume_ft(volume, pad=2, method="linear")   # once per reference
    R = rotation_matrix(phi, theta, psi)                      # (n, 3, 3), cisTEM convention
    slices = extract_slices(vft, R)                           # (n, N, N//2+1) complex64
    images = ift2(slices)                                     # real projections, centre N//2

``prepare_volume_ft`` divides the map by the interpolation kernel's
apodisation (gridding correction), zero-pads it to ``P = round(pad * N)``
with the centre kept at ``P//2`` and FFTs it once.  ``extract_slices`` then
samples the padded transform at ``(P/N) * M @ (kx, ky, 0)`` for every
frequency of the rfft half plane of an N x N image, so the slices come out
directly at the unpadded image size (no per-image inverse FFT + crop as in
cisTEM; the result is the same projection, aliased-free because the padded
projection is zero outside the original box).

Projection of ``V`` with matrix ``M`` is the line integral along z of
``V(M r)`` (see :mod:`cistem_mpi.kernels.euler`).  Values beyond
``max_radius`` (Fourier pixels of the image; default N//2) are zero and the
DC term is kept (unlike cisTEM, which zeroes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.interpolation import (
    locate, n_taps, tap_weights, apodization_3d, method_code,
)

__all__ = ["VolumeFT", "prepare_volume_ft", "padded_size", "extract_slices", "extract_slices_cropped",
           "project", "extract_slices_numpy", "interpolate_at"]


def padded_size(n: int, pad: float) -> int:
    """Padded box size used for an n-box and padding factor ``pad``."""
    return int(round(pad * n))


@dataclass
class VolumeFT:
    """A padded, gridding-corrected 3D transform ready for slice extraction.

    Attributes
    ----------
    data : ndarray, complex64, shape (P, P, P//2+1)
        rfft half layout, ``[kz, ky, kx]``.
    n : int
        Box size of the original (unpadded) map.
    size : int
        Padded size P.
    method : str
        Interpolation method the apodisation was corrected for.
    """

    data: np.ndarray
    n: int
    size: int
    method: str


def _pad_center(vol: np.ndarray, p: int) -> np.ndarray:
    n = vol.shape[0]
    out = np.zeros((p, p, p), dtype=np.float32)
    o = p // 2 - n // 2
    out[o:o + n, o:o + n, o:o + n] = vol
    return out


def prepare_volume_ft(volume: np.ndarray, pad: float = 2.0, method: str = "linear",
                      grid_correct: bool = True) -> VolumeFT:
    """Pad, gridding-correct and Fourier transform a cubic map once.

    Parameters
    ----------
    volume : ndarray, shape (n, n, n)
        Real map ``[z, y, x]``, centre at ``n//2``.
    pad : float
        Padding factor (2 is cisTEM's and RELION's default).
    method : {"linear", "cubic", "nearest"}
        Interpolation the slices will be extracted with.
    grid_correct : bool
        Divide by the kernel's apodisation first (recommended).

    Returns
    -------
    VolumeFT
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"volume must be a cube, got shape {vol.shape}")
    method_code(method)
    n = vol.shape[0]
    p = padded_size(n, pad)
    if p < n:
        raise ValueError("padding factor must be >= 1")
    if grid_correct:
        vol = vol / apodization_3d(n, p, method)
    f = _fft.ftn(_pad_center(vol, p)).astype(np.complex64, copy=False)
    return VolumeFT(data=np.ascontiguousarray(f), n=n, size=p, method=method)


@njit(cache=True, inline="always")
def _tap(vf, compact, r, lo, p, half, x, y, z):
    # one stored value of the padded transform at integer frequency (x, y, z)
    if compact:
        return vf[z + r, y + r, x + lo]
    zs, ys, xs, cj = locate(x, y, z, p, half)
    v = vf[zs, ys, xs]
    return np.conj(v) if cj else v


@njit(cache=True, inline="always")
def interpolate_at(vf, compact, cr, clo, p, half, nt, method, x, y, z, wx, wy, wz):
    """Interpolated value ``(re, im)`` of a padded half-layout transform at (x, y, z), x >= 0 (numba).

    Any kernel (``method`` code, ``nt`` taps; ``wx``/``wy``/``wz`` are scratch
    arrays of 4), read from the transform ``vf`` itself (``compact`` False) or
    from its :func:`compact_ft` block ``(vf, cr, clo)``.  Slice extraction and
    the alignment's fused score both read through it.

    >>> from cistem_mpi.kernels.interpolation import method_code
    >>> vf = np.ones((8, 8, 5), np.complex64); w = np.zeros(4)
    >>> interpolate_at(vf, False, 0, 0, 8, 4, 2, method_code("linear"), 1.5, 0.25, -0.5, w, w.copy(), w.copy())
    (1.0, 0.0)
    """
    bx = tap_weights(method, x, wx)
    by = tap_weights(method, y, wy)
    bz = tap_weights(method, z, wz)
    acc_r = 0.0
    acc_i = 0.0
    for c in range(nt):
        for b in range(nt):
            wzy = wz[c] * wy[b]
            if wzy == 0.0:
                continue
            for a in range(nt):
                w = wzy * wx[a]
                if w == 0.0:
                    continue
                v = _tap(vf, compact, cr, clo, p, half, bx + a, by + b, bz + c)
                acc_r += w * v.real
                acc_i += w * v.imag
    return acc_r, acc_i


@njit(cache=True)
def _extract(vf, p, rot, scale, nimg, rmax2, method, out):
    half = p // 2
    nt = n_taps(method)
    wx = np.zeros(4)
    wy = np.zeros(4)
    wz = np.zeros(4)
    nxh = nimg // 2 + 1
    for i in range(rot.shape[0]):
        r00 = rot[i, 0, 0] * scale
        r01 = rot[i, 0, 1] * scale
        r10 = rot[i, 1, 0] * scale
        r11 = rot[i, 1, 1] * scale
        r20 = rot[i, 2, 0] * scale
        r21 = rot[i, 2, 1] * scale
        for iy in range(nimg):
            ky = iy if iy < (nimg + 1) // 2 else iy - nimg
            for ix in range(nxh):
                if ix * ix + ky * ky > rmax2:
                    out[i, iy, ix] = 0.0
                    continue
                x = r00 * ix + r01 * ky
                y = r10 * ix + r11 * ky
                z = r20 * ix + r21 * ky
                flip = False
                if x < 0.0:
                    x = -x
                    y = -y
                    z = -z
                    flip = True
                acc_r, acc_i = interpolate_at(vf, False, 0, 0, p, half, nt, method, x, y, z, wx, wy, wz)
                if flip:
                    acc_i = -acc_i
                out[i, iy, ix] = complex(acc_r, acc_i)


@njit(cache=True)
def _fill_compact(vf, p, r, lo, out):
    half = p // 2
    for iz in range(2 * r + 1):
        for iy in range(2 * r + 1):
            for ix in range(r + lo + 1):
                zs, ys, xs, cj = locate(ix - lo, iy - r, iz - r, p, half)
                v = vf[zs, ys, xs]
                out[iz, iy, ix] = np.conj(v) if cj else v


#: Largest band block :func:`compact_ft` makes per rank (bytes): 44 ranks x 32 MB stays small beside the node's
#: one shared copy of the reference.
COMPACT_MAX_BYTES = 32 << 20


def compact_ft(vft: VolumeFT, radius: float, max_fraction: float = 0.5):
    """The padded transform's frequencies within ``radius`` (padded-grid pixels) as a small dense block.

    Slices extracted only to a band limit read a ball of the padded
    transform; stored compactly (``[kz + r, ky + r, kx + lo]`` for
    ``|kz|, |ky| <= r``, ``-lo <= kx <= r``, Friedel mates and periodic wrap
    already resolved) that ball fits in cache instead of being scattered over
    the whole ``P^2 (P/2+1)`` array -- what binning the reference to the
    resolution limit buys.  The values are exactly those ``_extract`` reads.

    Returns ``(block, r, lo)``, cached on ``vft`` per radius, or ``None``
    when the block would hold more than ``max_fraction`` of the transform
    (then the transform itself is as good) or more than
    :data:`COMPACT_MAX_BYTES`: the block is private to each rank, while the
    transform may be one copy shared by the node's ranks, and a block that
    large no longer fits a cache anyway.
    """
    r = int(np.ceil(radius)) + 3  # + the cubic kernel's reach beyond the last coordinate
    lo = 2
    shape = (2 * r + 1, 2 * r + 1, r + lo + 1)
    voxels = shape[0] * shape[1] * shape[2]
    if voxels > max_fraction * vft.data.size or voxels * 8 > COMPACT_MAX_BYTES:
        return None
    cache = vft.__dict__.setdefault("_compact", {})
    if r not in cache:
        out = np.empty(shape, dtype=np.complex64)
        _fill_compact(vft.data, vft.size, r, lo, out)
        cache[r] = (out, r, lo)
    return cache[r]


def _as_rotations(rotmats: np.ndarray) -> np.ndarray:
    r = np.asarray(rotmats, dtype=np.float64)
    if r.ndim == 2:
        r = r[None]
    if r.shape[-2:] != (3, 3):
        raise ValueError(f"rotation matrices must have shape (n, 3, 3), got {r.shape}")
    return np.ascontiguousarray(r)


def extract_slices(vft: VolumeFT, rotmats: np.ndarray, image_size: int | None = None,
                   max_radius: float | None = None, method: str | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Central sections of ``vft`` for rotation matrices ``rotmats``.

    Parameters
    ----------
    vft : VolumeFT
        From :func:`prepare_volume_ft`.
    rotmats : ndarray, shape (n, 3, 3) or (3, 3)
        cisTEM rotation matrices (:func:`cistem_mpi.kernels.euler.rotation_matrix`).
    image_size : int, optional
        N of the output images (default: the map's box size), at the map's
        pixel size: a smaller N gives the centre of the projection (content
        outside wraps around), a larger N pads it.
    max_radius : float, optional
        Keep frequencies with ``kx^2 + ky^2 <= max_radius^2`` (Fourier pixels of
        the N-image); default ``N//2``.
    method : str, optional
        Interpolation (default: the one ``vft`` was prepared for).
    out : ndarray, optional
        Pre-allocated complex64 output of shape (n, N, N//2+1).

    Returns
    -------
    ndarray, complex64, shape (n, N, N//2+1)
        Image FTs in the centred rfft half layout of :func:`cistem_mpi.kernels.fft.ft2`.
    """
    r = _as_rotations(rotmats)
    n_img = vft.n if image_size is None else int(image_size)
    rmax = n_img // 2 if max_radius is None else float(max_radius)
    m = method_code(vft.method if method is None else method)
    if out is None:
        out = np.empty((r.shape[0], n_img, n_img // 2 + 1), dtype=np.complex64)
    _extract(vft.data, vft.size, r, vft.size / n_img, n_img, rmax * rmax, m, out)
    return out


def extract_slices_cropped(vft: VolumeFT, rotmats: np.ndarray, m: int, max_radius: float | None = None,
                           method: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Central sections on the Fourier-cropped ``m``-grid of the map's ``N``-images.

    The same values as ``crop_ft(extract_slices(vft, rotmats, max_radius=...), m)``
    (frequencies ``|ky| <= m/2``, ``kx <= m/2`` of the ``N``-image, at its
    pixel size), without computing and then discarding the rest of the
    ``N``-grid: what alignment in a band below Nyquist needs.

    Parameters
    ----------
    vft : VolumeFT
    rotmats : ndarray, shape (n, 3, 3) or (3, 3)
    m : int
        Even cropped box, ``m <= N``.
    max_radius : float, optional
        In Fourier pixels of the ``N``-image (= of the cropped grid); default ``m//2``.
    method, out
        As in :func:`extract_slices` (``out`` of shape (n, m, m//2+1)).

    Returns
    -------
    ndarray, complex64, shape (n, m, m//2+1)
    """
    r = _as_rotations(rotmats)
    m = int(m)
    if m % 2 or m > vft.n:
        raise ValueError(f"cropped box must be even and at most {vft.n}, got {m}")
    rmax = m // 2 if max_radius is None else float(max_radius)
    code = method_code(vft.method if method is None else method)
    if out is None:
        out = np.empty((r.shape[0], m, m // 2 + 1), dtype=np.complex64)
    # the scale stays P/N (frequencies of the N-image); only the grid walked shrinks to m
    _extract(vft.data, vft.size, r, vft.size / vft.n, m, rmax * rmax, code, out)
    return out


def project(volume: np.ndarray, rotmats: np.ndarray, pad: float = 2.0, method: str = "linear",
            image_size: int | None = None) -> np.ndarray:
    """Real-space projections (n, N, N) of a map (convenience wrapper)."""
    vft = prepare_volume_ft(volume, pad=pad, method=method)
    return _fft.ift2(extract_slices(vft, rotmats, image_size=image_size)).astype(np.float32)


def extract_slices_numpy(vft: VolumeFT, rotmats: np.ndarray, image_size: int | None = None,
                         max_radius: float | None = None) -> np.ndarray:
    """Trilinear extraction written with numpy vectorisation only.

    The same interpolation as ``extract_slices(..., method="linear")``; kept as
    the baseline of ``benchmarks/bench_kernels.py`` and as an independent
    implementation for the tests.
    """
    r = _as_rotations(rotmats)
    n_img = vft.n if image_size is None else int(image_size)
    rmax = n_img // 2 if max_radius is None else float(max_radius)
    p = vft.size
    half = p // 2
    s = p / n_img
    ky = np.fft.fftfreq(n_img, 1.0 / n_img)[:, None] * np.ones((1, n_img // 2 + 1))
    kx = np.arange(n_img // 2 + 1)[None, :] * np.ones((n_img, 1))
    inside = (kx * kx + ky * ky) <= rmax * rmax
    out = np.zeros((r.shape[0], n_img, n_img // 2 + 1), dtype=np.complex64)
    for i in range(r.shape[0]):
        m = r[i] * s
        x = m[0, 0] * kx + m[0, 1] * ky
        y = m[1, 0] * kx + m[1, 1] * ky
        z = m[2, 0] * kx + m[2, 1] * ky
        flip = x < 0
        x = np.where(flip, -x, x)
        y = np.where(flip, -y, y)
        z = np.where(flip, -z, z)
        x0, y0, z0 = np.floor(x), np.floor(y), np.floor(z)
        fx, fy, fz = x - x0, y - y0, z - z0
        acc = np.zeros(x.shape, dtype=np.complex128)
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    w = (fx if dx else 1 - fx) * (fy if dy else 1 - fy) * (fz if dz else 1 - fz)
                    xi = (x0 + dx).astype(np.int64)
                    yi = (y0 + dy).astype(np.int64)
                    zi = (z0 + dz).astype(np.int64)
                    xr = (xi + half) % p - half
                    neg = xr < 0
                    xr = np.abs(xr)
                    yi = np.where(neg, -yi, yi) % p
                    zi = np.where(neg, -zi, zi) % p
                    v = vft.data[zi, yi, xr]
                    acc += w * np.where(neg, np.conj(v), v)
        acc = np.where(flip, np.conj(acc), acc)
        out[i] = np.where(inside, acc, 0)
    return out
