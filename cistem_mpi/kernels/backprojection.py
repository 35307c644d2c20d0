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
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.interpolation import (
    locate, n_taps, tap_weights, apodization_3d, method_code,
)

__all__ = ["new_accumulators", "insert_slices", "normalise_ft", "ft_to_volume",
           "reconstruct", "slab_bounds", "balanced_bands", "slab_frequency_band", "insert_slices_numpy"]


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


def balanced_bands(padded: int, n_parts: int, radius: float) -> list[list[tuple[int, int]]]:
    """Split the P kz-rows into ``n_parts`` bands of frequencies that take equal insertion work.

    For orientations spread over the sphere, a slice point at radius r has
    its kz uniform in [-r, r], so the points per kz-row fall off as
    ``radius - |kz|`` (a triangle): equal-width slabs would give the middle
    rank twice the average work.  The bands are contiguous in frequency
    (``-P/2 .. P/2-1``); a band across kz = 0 is two runs of rows.

    Parameters
    ----------
    padded : int
        Grid size P.
    n_parts : int
        Number of bands (ranks).
    radius : float
        Insertion radius on the padded grid (``max_radius * P / N``).

    Returns
    -------
    list of list of (int, int)
        Per band, its runs of rows ``(z0, z1)`` (each one frequency interval,
        so :func:`insert_slices` skips what cannot reach it); empty lists
        when there are more bands than rows.

    Examples
    --------
    >>> balanced_bands(16, 2, 8.0)  # kz -8..0 and 1..7
    [[(8, 16), (0, 1)], [(1, 8)]]
    >>> [sum(b - a for a, b in runs) for runs in balanced_bands(64, 3, 32.0)]  # rows per band
    [27, 12, 25]
    """
    if padded < 1 or n_parts < 1:
        raise ValueError("need padded >= 1 and n_parts >= 1")
    freq = np.arange(-(padded // 2), (padded + 1) // 2)
    # the triangle, plus a floor for the rows' fixed costs (and any row the triangle misses)
    work = np.maximum(float(radius) - np.abs(freq), 0.0) + 0.05 * max(float(radius), 1.0)
    cum = np.concatenate([[0.0], np.cumsum(work)])
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n_parts) / n_parts)
    edges = np.concatenate([[0], np.clip(cuts, 0, padded), [padded]]).astype(int)
    edges = np.maximum.accumulate(edges)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        fa, fb = int(freq[0] + a), int(freq[0] + b)  # frequencies [fa, fb)
        runs = []
        if fa < 0 and fa < fb:
            runs.append((fa + padded, min(fb, 0) + padded))
        if fb > 0 and fa < fb:
            runs.append((max(fa, 0), fb))
        out.append(runs)
    return out


@njit(cache=True, inline="always")
def _add(data, weight, z0, z1, zs, ys, xs, vr, vi, w):
    if zs >= z0 and zs < z1:
        data[zs - z0, ys, xs] += complex(vr, vi)
        weight[zs - z0, ys, xs] += w


def slab_frequency_band(z0: int, z1: int, p: int) -> tuple[bool, float, float]:
    """Whether kz-rows ``z0:z1`` of a P-grid are one interval of frequencies, and that interval.

    Rows are in ``fftfreq`` order, so rows below ``(P+1)//2`` hold frequencies
    ``z0..z1-1`` and rows above hold ``z0-P..z1-P``; a slab that holds every
    row, or crosses the jump at ``(P+1)//2``, is not one interval (no pruning).

    >>> slab_frequency_band(0, 8, 32), slab_frequency_band(20, 24, 32), slab_frequency_band(0, 32, 32)[0]
    ((True, 0.0, 8.0), (True, -12.0, -8.0), False)
    """
    pos = (p + 1) // 2
    if (z0, z1) == (0, p) or z1 <= z0:
        return False, 0.0, 0.0
    if z1 <= pos:
        return True, float(z0), float(z1)
    if z0 >= pos:
        return True, float(z0 - p), float(z1 - p)
    return False, 0.0, 0.0


@njit(cache=True, inline="always")
def _solve_range(a, b, lo, hi, i0, i1):
    """Integers i in [i0, i1] with lo <= a*i + b <= hi (to 1e-6, against rounding), as [first, last]."""
    if abs(a) < 1e-9:
        if b >= lo and b <= hi:
            return i0, i1
        return 1, 0
    t0 = (lo - b) / a
    t1 = (hi - b) / a
    if t0 > t1:
        t0, t1 = t1, t0
    # clamp before converting: an open side (+-1e30) would overflow the integer
    t0 = min(max(t0, i0 - 2.0), i1 + 2.0)
    t1 = min(max(t1, i0 - 2.0), i1 + 2.0)
    f = max(i0, int(np.ceil(t0 - 1e-6)))
    last = min(i1, int(np.floor(t1 + 1e-6)))
    return f, last


@njit(cache=True, inline="always")
def _put(starts, stops, n, a0, a1, b0, b1):
    """Append the intersection of [a0, a1] and [b0, b1] (skipped later when empty); return the count."""
    starts[n] = max(a0, b0)
    stops[n] = min(a1, b1)
    return n + 1


@njit(cache=True)
def _row_intervals(starts, stops, ixmax, ky, r00, r01, r20, r21, flo, fhi, half, reach):
    """The pixels ``0..ixmax`` of row ky that can write into kz-frequencies [flo, fhi), as merged intervals.

    A pixel of the image plane lands at ``x = r00 ix + r01 ky``,
    ``z = r20 ix + r21 ky`` (both linear along the row) and writes to the kz
    taps within ``reach`` of ``z`` -- of ``-z`` where ``x < 0`` (Friedel).
    Taps of ``-z`` as well where the x taps touch the plane x = 0 (both k and
    -k are stored there) or wrap at the padded Nyquist ``|x| ~ half``, and
    taps one period away where z itself is near ``+-half``.  Every case is
    the intersection of two linear conditions, so an interval of the row;
    each is widened by one pixel (conservative).  Returns the number of
    merged intervals written to ``starts``/``stops`` (inclusive bounds).
    """
    # the taps of t are within [t - reach, t + reach - 1] (linear: floor(t), floor(t) + 1), so a tap lies
    # in [flo, fhi) only if t is in [flo - reach, fhi + reach - 1]; half a unit more against rounding
    lo = flo - reach - 0.5
    hi = fhi + reach - 0.5
    edge = half - reach - 0.5  # x taps reach +half (where they wrap)
    xzero = reach + 0.5  # x taps reach the x = 0 plane
    b = r01 * ky
    d = r21 * ky
    pos0, pos1 = _solve_range(r00, b, 0.0, 1e30, 0, ixmax)
    neg0, neg1 = _solve_range(r00, b, -1e30, 0.0, 0, ixmax)
    n = 0
    for shift in (0.0, -2.0 * half, 2.0 * half):  # the band, and its copies one period away
        if shift != 0.0 and not (lo + shift <= half + reach and hi + shift >= -half - reach):
            continue
        zp0, zp1 = _solve_range(r20, d, lo + shift, hi + shift, 0, ixmax)  # z in the band
        zm0, zm1 = _solve_range(r20, d, -hi - shift, -lo - shift, 0, ixmax)  # -z in the band
        n = _put(starts, stops, n, pos0, pos1, zp0, zp1)  # x >= 0: taps of z
        n = _put(starts, stops, n, neg0, neg1, zm0, zm1)  # x < 0: taps of -z
        if shift == 0.0:
            e0, e1 = _solve_range(r00, b, edge, 1e30, 0, ixmax)  # x wraps at +half: taps of -z
            n = _put(starts, stops, n, e0, e1, zm0, zm1)
            e0, e1 = _solve_range(r00, b, -1e30, -edge, 0, ixmax)  # x wraps at -half: taps of z
            n = _put(starts, stops, n, e0, e1, zp0, zp1)
    x0, x1 = _solve_range(r00, b, -xzero, xzero, 0, ixmax)  # x taps on the x = 0 plane: taps of z and -z
    zp0, zp1 = _solve_range(r20, d, lo, hi, 0, ixmax)
    zm0, zm1 = _solve_range(r20, d, -hi, -lo, 0, ixmax)
    n = _put(starts, stops, n, x0, x1, zp0, zp1)
    n = _put(starts, stops, n, x0, x1, zm0, zm1)
    # sort by start and merge overlapping or touching intervals
    for i in range(1, n):
        j = i
        while j > 0 and starts[j] < starts[j - 1]:
            starts[j], starts[j - 1] = starts[j - 1], starts[j]
            stops[j], stops[j - 1] = stops[j - 1], stops[j]
            j -= 1
    m = 0
    for i in range(n):
        if stops[i] < starts[i]:
            continue
        if m > 0 and starts[i] <= stops[m - 1] + 1:
            if stops[i] > stops[m - 1]:
                stops[m - 1] = stops[i]
        else:
            starts[m] = starts[i]
            stops[m] = stops[i]
            m += 1
    return m


@njit(cache=True)
def _insert_general(data, weight, z0, z1, p, fts, ctf, has_ctf, imgw, rot, scale, nimg, rmax2, method, mode,
            prune, flo, fhi):
    """Every method and mode, tap by tap through :func:`locate` (the reference the fast kernel must equal)."""
    half = p // 2
    nt = n_taps(method)
    wx = np.zeros(4)
    wy = np.zeros(4)
    wz = np.zeros(4)
    nxh = nimg // 2 + 1
    even_p = (p % 2) == 0
    starts = np.zeros(16, dtype=np.int64)
    stops = np.zeros(16, dtype=np.int64)
    reach = 0.5 * nt + 0.5  # linear taps: floor(t), floor(t) + 1; nearest: round(t); cubic: floor(t) - 1 .. + 2
    # on tiny grids the cases of _row_intervals can overlap at the corners: insert every pixel
    prune = prune and half >= 4 * (nt + 1)
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
            left = rmax2 - ky * ky
            if left < 0:
                continue
            ixmax = min(nxh - 1, int(np.sqrt(left)) + 1)
            if prune:
                nint = _row_intervals(starts, stops, ixmax, ky, r00, r01, r20, r21, flo, fhi, float(half), reach)
            else:
                starts[0] = 0
                stops[0] = ixmax
                nint = 1
            for k in range(nint):
                for ix in range(starts[k], stops[k] + 1):
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
                  _spread(data, weight, z0, z1, p, half, even_p, method, mode, nt, wx, wy, wz, x, y, z, vr, vi, cw)


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch the cache line of ``arr[idx]`` (1D array) for writing; never faults.

    The insertion's read-modify-writes land on scattered lines of a volume far
    larger than the caches; fetching the taps of a pixel a few pixels ahead
    overlaps the misses instead of waiting on them one by one.
    """
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", (i8p,), fnty)
        # write access, keep in all cache levels, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)  # not inlined: the rare cases stay out of the hot loop's code
def _spread(data, weight, z0, z1, p, half, even_p, method, mode, nt, wx, wy, wz, x, y, z, vr, vi, cw):
    """Add one image pixel at (x, y, z), x >= 0, tap by tap: any kernel, any mode.

    The tap loop of :func:`_insert_general` and the general case of :func:`_insert_linear` (so both
    do the same operations in the same order).
    """
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
                    # both k and -k are stored on this plane: the Friedel partner of the image adds the
                    # conjugate at -k
                    _add(data, weight, z0, z1, (p - zs) % p, (p - ys) % p, xs, tr, -ti, w * cw)


@njit(cache=True, inline="always")
def _add_flat(dflat, wflat, zr, nrows, q, tr, ti, tw):
    """``data[q] += tr + i ti``, ``weight[q] += tw`` through the flat views, if slab row ``zr`` is held."""
    if zr >= 0 and zr < nrows:
        dflat[2 * q] += tr
        dflat[2 * q + 1] += ti
        wflat[q] += tw


@njit(cache=True)  # not inlined: the rare cases stay out of the hot loop's code
def _spread_planes(dflat, wflat, z0, nrows, p, half, nxs, bx, ys0, ys1, zs0, zs1, wx0, wy0, wz0, fx, fy, fz,
                   vr, vi, cw):
    """The trilinear taps of a pixel with ``bx == 0`` or (even P) ``bx + 1 == P/2``, as :func:`_spread` adds them.

    A tap on x = 0 adds at (z, y) and its conjugate at (-z, -y) (both k and -k
    are stored there); a tap on x = P/2 (even P) wraps to -P/2, so
    :func:`locate` puts the conjugate at (-z, -y) first and the mirrored write
    then adds the value at (z, y).  Same values in the same order as the
    general loop (float32 here, as the interior path), so coinciding voxels (z or y on 0 or P/2) sum
    as they would there.
    """
    for cz in range(2):
        zs = zs0 if cz == 0 else zs1
        zr = zs - z0
        zmr = (p - zs if zs > 0 else 0) - z0  # row of -z
        wzc = wz0 if cz == 0 else fz
        for b in range(2):
            ys = ys0 if b == 0 else ys1
            ym = p - ys if ys > 0 else 0  # row of -y
            wzy = wzc * (wy0 if b == 0 else fy)
            w = wzy * wx0
            if bx == 0:
                _add_flat(dflat, wflat, zr, nrows, (zr * p + ys) * nxs, w * vr, w * vi, w * cw)
                _add_flat(dflat, wflat, zmr, nrows, (zmr * p + ym) * nxs, w * vr, -(w * vi), w * cw)
            else:
                _add_flat(dflat, wflat, zr, nrows, (zr * p + ys) * nxs + bx, w * vr, w * vi, w * cw)
            w = wzy * fx
            if bx + 1 == half and (p % 2) == 0:
                _add_flat(dflat, wflat, zmr, nrows, (zmr * p + ym) * nxs + half, w * vr, -w * vi, w * cw)
                _add_flat(dflat, wflat, zr, nrows, (zr * p + ys) * nxs + half, w * vr, w * vi, w * cw)
            else:
                _add_flat(dflat, wflat, zr, nrows, (zr * p + ys) * nxs + bx + 1, w * vr, w * vi, w * cw)


ONE32 = np.float32(1.0)  # a float32 literal: 1.0 - float32 would be float64 in numba
PF_DIST = 6  # pixels ahead to prefetch (about the misses a core keeps in flight; 4..12 time the same)


@njit(cache=True, inline="always")
def _prefetch_taps(dflat, wflat, jx, ky, r00, r01, r10, r11, r20, r21, p, half, z0, nrows):
    """Prefetch the lines of the four (z, y) tap rows of image pixel (jx, ky), clamped into the arrays."""
    if nrows <= 0:
        return
    xj = r00 * jx + r01 * ky
    yj = r10 * jx + r11 * ky
    zj = r20 * jx + r21 * ky
    if xj < 0.0:
        xj = -xj
        yj = -yj
        zj = -zj
    # (no %: an integer division per axis costs more than the prefetch saves)
    nxs = half + 1
    bxj = min(max(int(np.floor(xj)), 0), half - 1)
    byj = int(np.floor(yj))
    byj = min(max(byj + p if byj < 0 else byj, 0), p - 1)
    bzj = int(np.floor(zj))
    bzj = min(max(bzj + p if bzj < 0 else bzj, 0), p - 1)
    byj1 = byj + 1 if byj + 1 < p else 0
    bzj1 = bzj + 1 if bzj + 1 < p else 0
    zra = min(max(bzj - z0, 0), nrows - 1)
    zrb = min(max(bzj1 - z0, 0), nrows - 1)
    q = (zra * p + byj) * nxs + bxj
    _prefetch(dflat, 2 * q)
    _prefetch(wflat, q)
    q = (zra * p + byj1) * nxs + bxj
    _prefetch(dflat, 2 * q)
    _prefetch(wflat, q)
    q = (zrb * p + byj) * nxs + bxj
    _prefetch(dflat, 2 * q)
    _prefetch(wflat, q)
    q = (zrb * p + byj1) * nxs + bxj
    _prefetch(dflat, 2 * q)
    _prefetch(wflat, q)


@njit(cache=True)
def _insert_linear(data, weight, dflat, wflat, z0, z1, p, fts, ctf, has_ctf, imgw, rot, scale, nimg, rmax2,
                   prune, flo, fhi):
    """Trilinear ``mode="reconstruct"`` insertion: :func:`_insert_general` with a fast path for interior taps.

    ``dflat``/``wflat`` are flat float32 views of ``data``/``weight`` (real,
    imaginary interleaved in ``dflat``).  A pixel whose x taps are
    ``1 <= floor(x)`` and ``floor(x) + 1 < P/2`` (no wrap at the padded
    Nyquist, not on the planes x = 0 or x = P/2 that are stored twice) is
    added with direct index arithmetic and the 8 taps unrolled, its z taps
    clipped to the slab's rows; a pixel with a tap on one of those planes goes
    through :func:`_spread_planes`, any other (wrapping) pixel through
    :func:`_spread`.  The taps of the pixel ``PF_DIST`` ahead are prefetched.
    Tap weights and products are float32 (positions float64), so the sums
    equal the general kernel's (float64 taps) to float32 rounding; zero-weight
    taps add +-0 instead of being skipped, which cannot change an accumulator
    that starts at +0 (it would turn a non-finite input value into NaN where
    the general kernel skips it).
    """
    half = p // 2
    nt = 2
    nxs = half + 1  # stored kx columns
    nrows = z1 - z0
    even_p = (p % 2) == 0
    # largest first x tap of the fast path: its pair stays below P/2 (even P: the doubly stored plane) and
    # below P - P/2 (where locate wraps to negative x; odd P: floor(x) + 1 = P//2 is still stored once)
    xlast = half - 2 if even_p else half - 1
    wx = np.zeros(4)
    wy = np.zeros(4)
    wz = np.zeros(4)
    nxh = nimg // 2 + 1
    starts = np.zeros(16, dtype=np.int64)
    stops = np.zeros(16, dtype=np.int64)
    reach = 0.5 * nt + 0.5
    prune = prune and half >= 4 * (nt + 1)
    for i in range(rot.shape[0]):
        r00 = rot[i, 0, 0] * scale
        r01 = rot[i, 0, 1] * scale
        r10 = rot[i, 1, 0] * scale
        r11 = rot[i, 1, 1] * scale
        r20 = rot[i, 2, 0] * scale
        r21 = rot[i, 2, 1] * scale
        g_one = np.float32(imgw[i])
        g_half = np.float32(0.5 * imgw[i])
        for iy in range(nimg):
            ky = iy if iy < (nimg + 1) // 2 else iy - nimg
            left = rmax2 - ky * ky
            if left < 0:
                continue
            ixmax = min(nxh - 1, int(np.sqrt(left)) + 1)
            # the last column inside max_radius (the test ix*ix + ky*ky > rmax2 hoisted out of the pixel loop)
            ixin = ixmax
            while ixin >= 0 and ixin * ixin + ky * ky > rmax2:
                ixin -= 1
            if prune:
                nint = _row_intervals(starts, stops, ixmax, ky, r00, r01, r20, r21, flo, fhi, float(half), reach)
            else:
                starts[0] = 0
                stops[0] = ixmax
                nint = 1
            for k in range(nint):
                ixend = min(stops[k], ixin)
                for jx in range(starts[k], min(starts[k] + PF_DIST, ixend + 1)):  # the loop prefetches the rest
                    _prefetch_taps(dflat, wflat, jx, ky, r00, r01, r10, r11, r20, r21, p, half, z0, nrows)
                for ix in range(starts[k], ixend + 1):
                    if ix + PF_DIST <= ixend:
                        _prefetch_taps(dflat, wflat, ix + PF_DIST, ky, r00, r01, r10, r11, r20, r21, p, half,
                                       z0, nrows)
                    # the pixel's values and its taps in float32, the accumulators' type: float64 products
                    # were converted on every one of the 24 additions (measured: 10-15 % of the insertion);
                    # positions stay float64
                    val = fts[i, iy, ix]
                    c = ctf[i, iy, ix] if has_ctf else ONE32
                    # self-conjugate image columns hold both k and -k: count half each
                    g = g_half if (ix == 0 or 2 * ix == nimg) else g_one
                    tr = val.real * c * g
                    ti = val.imag * c * g
                    tw = c * c * g
                    x = r00 * ix + r01 * ky
                    y = r10 * ix + r11 * ky
                    z = r20 * ix + r21 * ky
                    if x < 0.0:
                        x = -x
                        y = -y
                        z = -z
                        ti = -ti
                    fbx = np.floor(x)
                    bx = int(fbx)
                    fby = np.floor(y)
                    by = int(fby)
                    fbz = np.floor(z)
                    bz = int(fbz)
                    interior = bx >= 1 and bx <= xlast
                    # a first x tap on x = 0, or (even P) a second on x = P/2: those taps are stored twice
                    plane = bx == 0 or (even_p and bx == half - 1)
                    if not (interior or plane) or by < -p or by >= p or bz < -p or bz >= p:
                        _spread(data, weight, z0, z1, p, half, even_p, 1, 1, nt, wx, wy, wz, x, y, z,
                                np.float64(tr), np.float64(ti), np.float64(tw))
                        continue
                    fx = np.float32(x - fbx)
                    fy = np.float32(y - fby)
                    fz = np.float32(z - fbz)
                    wx0 = ONE32 - fx
                    wy0 = ONE32 - fy
                    wz0 = ONE32 - fz
                    # stored rows of the y and z taps (periodic; by, bz within one period of the grid)
                    ys0 = by + p if by < 0 else by
                    ys1 = ys0 + 1 if ys0 + 1 < p else 0
                    zs0 = bz + p if bz < 0 else bz
                    zs1 = zs0 + 1 if zs0 + 1 < p else 0
                    if plane:
                        _spread_planes(dflat, wflat, z0, nrows, p, half, nxs, bx, ys0, ys1, zs0, zs1,
                                       wx0, wy0, wz0, fx, fy, fz, tr, ti, tw)
                        continue
                    for cz in range(2):
                        zr = (zs0 if cz == 0 else zs1) - z0
                        if zr < 0 or zr >= nrows:
                            continue  # outside the slab (no mirrored write: x is off the planes 0 and P/2)
                        wzc = wz0 if cz == 0 else fz
                        for b in range(2):
                            wzy = wzc * (wy0 if b == 0 else fy)
                            q = (zr * p + (ys0 if b == 0 else ys1)) * nxs + bx
                            w = wzy * wx0
                            dflat[2 * q] += w * tr
                            dflat[2 * q + 1] += w * ti
                            wflat[q] += w * tw
                            w = wzy * fx
                            dflat[2 * q + 2] += w * tr
                            dflat[2 * q + 3] += w * ti
                            wflat[q + 1] += w * tw


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
    _insert_slices(data, weight, fts, rotmats, ctf, image_weights, z_range, method, max_radius, mode, True)


def _insert_slices(data, weight, fts, rotmats, ctf, image_weights, z_range, method, max_radius, mode,
                   fast: bool) -> None:
    """:func:`insert_slices`; ``fast=False`` forces the general kernel (the tests' and benchmark's reference)."""
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
    # a slab of rows that is one interval of kz frequencies: rows of the image that cannot reach it are skipped
    prune, flo, fhi = slab_frequency_band(z0, z1, p)
    code = method_code(method)
    if fast and code == 1 and mode == "reconstruct" and data.flags.c_contiguous and weight.flags.c_contiguous:
        # the common case, with its fast path for interior taps (needs flat views of the accumulators)
        _insert_linear(data, weight, data.reshape(-1).view(np.float32), weight.reshape(-1), z0, z1, p, fts, c,
                       has_ctf, g, r, p / nimg, nimg, rmax * rmax, prune, flo, fhi)
    else:
        _insert_general(data, weight, z0, z1, p, fts, c, has_ctf, g, r, p / nimg, nimg, rmax * rmax,
                        code, 1 if mode == "reconstruct" else 0, prune, flo, fhi)


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


def ft_to_volume(ft: np.ndarray, n: int, method: str = "linear", grid_correct: bool = True,
                 overwrite_input: bool = False) -> np.ndarray:
    """Padded half-layout transform -> real n-cube (centre n//2), gridding-corrected.

    ``overwrite_input``: ``ft`` may be destroyed (transformed in place, no padded-size copy).
    """
    p = ft.shape[0]
    # cropped while reading the uncentred transform: no second padded-size array
    vol = _fft.iftn_crop(ft.astype(np.complex64, copy=False), p, n,
                         overwrite_input=overwrite_input).astype(np.float32, copy=False)
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
