"""2D classification by maximum likelihood (cisTEM refine2d; Sigworth 1998, Scheres 2005).

Per particle (:func:`classify_particle`):

1. normalise from the area outside the mask (zero mean, unit variance
   there), soft circular mask; the class averages show white protein
   (:func:`normalise_particle`);
2. bin (Fourier-crop) so that the iteration's high-resolution limit sits
   at the Nyquist frequency of the ``m``-pixel binned image
   (:func:`binned_size`);
3. rotate the binned particle by every in-plane angle (step = binned pixel /
   mask radius, radians, as refine2d's automatic step), each with its CTF
   (the CTF of a rotated image is the CTF with the astigmatism angle
   rotated by the same angle);
4. for every class and rotation, correlate over all shifts at once with one
   inverse FFT; the log-likelihood of shift ``t`` is
   ``smoothing * (2 <X, C A T_t> - |C A|^2) / (2 s^2) + log pi_k - |t|^2 / (2 sigma_t^2)``
   (Gaussian noise of power ``s^2`` per Fourier coefficient, class prior
   ``pi_k``, Gaussian shift prior) within the search range;
5. posterior weights over classes x rotations x shifts, keeping only those
   within ``log_range`` (20, refine2d's ``log_range``) of the best;
6. accumulate ``sum w C X`` (shifted back: the particle's transform times
   the conjugate transform of its weight map) and ``sum w C^2`` per class,
   in Fourier space, in the class frame, separately per half set.

Class average = ``sum w C X / (sum w C^2 + c)`` with ``c`` the class's
occupancy fraction (refine2d's constant), auto-centred on the centre of mass
of its positive density (:func:`centre_image`).

Conventions: the best match means ``particle = shift(rotate(class, -PSI), SHX, SHY)``
with :func:`rotate_image` (content turned anticlockwise by the angle, x
right, y = row up), which is the sense of the 3D Euler angle PSI (a projection
at PSI is the PSI = 0 projection turned by -PSI), and shifts in pixels of the
full image (the driver writes Å).  Fourier arrays use :mod:`cistem_mpi.kernels.fft`'s centred half layout,
in the units of the full image's unscaled transform, cropped to ``m``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.ctf import ctf_2d_stack
from cistem_mpi.kernels.masks import circle_mask

__all__ = [
    "ClassifySettings", "ParticleOutcome", "binned_size", "rotation_angles", "band_mask", "multiplicity",
    "normalise_particle", "particle_ft", "rotate_image", "rotated_particles", "rotated_ctfs",
    "crop_half", "pad_half", "classify_particle", "ml_weights", "accumulate", "new_sums",
    "class_averages_ft", "ft_to_image", "image_to_ft", "centre_image", "frc", "resolution_from_frc",
    "default_class_count", "rank_classes", "LOG_RANGE",
]

#: refine2d's ``log_range``: weights below exp(-20) of the best are dropped.
LOG_RANGE = 20.0


@dataclass(frozen=True)
class ClassifySettings:
    """One iteration's search settings (lengths in pixels of the full image unless noted).

    Attributes
    ----------
    n : int
        Particle box.
    m : int
        Binned box (:func:`binned_size`).
    pixel_size : float
        Å per pixel of the particles.
    mask_radius : float
        Mask radius (pixels).
    mask_edge : float
        Width of the mask's cosine edge (pixels).
    low_resolution : float
        Low resolution limit (Å).
    search_range : float
        Largest |shift| searched in x and y (pixels).
    shift_sigma : float
        Standard deviation of the Gaussian shift prior (pixels).
    psi_step : float
        In-plane step (degrees).
    psi_start : float
        First angle (degrees).
    smoothing : float
        Likelihood factor (refine2d's smoothing factor; < 1 blurs).
    log_range : float
        Weights below ``exp(-log_range)`` of the best are dropped.
    white_protein : bool
        The stack has white protein (negated so that the model ``C A`` holds with white ``A``).
    """

    n: int
    m: int
    pixel_size: float
    mask_radius: float
    mask_edge: float
    low_resolution: float
    search_range: float
    shift_sigma: float
    psi_step: float
    psi_start: float = 0.0
    smoothing: float = 1.0
    log_range: float = LOG_RANGE
    white_protein: bool = False

    @property
    def binned_pixel(self) -> float:
        """Å per binned pixel."""
        return self.pixel_size * self.n / self.m

    @property
    def search_binned(self) -> int:
        """Search range in whole binned pixels."""
        return int(min(np.floor(self.search_range * self.m / self.n), self.m // 2 - 1))


@dataclass
class ParticleOutcome:
    """What one particle's classification gives (0-based class; psi degrees; shifts in full pixels)."""

    class_index: int
    psi: float
    shx: float
    shy: float
    logp: float
    sigma: float
    score: float
    occupancy: float  # 0..100, posterior of the best class


# ------------------------------------------------------------------ sizes and grids
def binned_size(n: int, pixel_size: float, high_resolution: float) -> int:
    """Even binned box whose Nyquist frequency is ``high_resolution`` (at most ``n``).

    >>> binned_size(64, 2.5, 15.0)
    22
    """
    m = 2 * int(np.ceil(n * pixel_size / high_resolution - 1e-6))
    return int(max(8, min(n - n % 2, m)))


def rotation_angles(binned_pixel: float, mask_radius_angstrom: float, step: float = 0.0,
                    start: float = 0.0) -> np.ndarray:
    """In-plane angles (degrees): automatic step = binned pixel / mask radius (radians), refine2d's rule.

    >>> len(rotation_angles(5.0, 50.0))
    63
    """
    if step <= 0:
        step = np.rad2deg(binned_pixel / mask_radius_angstrom)
    count = max(1, int(360.0 / step + 0.5))
    return (start + np.arange(count) * (360.0 / count)).astype(np.float64)


def _freqs(m: int) -> tuple[np.ndarray, np.ndarray]:
    fy = np.fft.fftfreq(m) * m
    fx = np.arange(m // 2 + 1, dtype=np.float64)
    return fy[:, None], fx[None, :]


def band_mask(m: int, n: int, pixel_size: float, low_resolution: float) -> np.ndarray:
    """True for the frequencies used: below Nyquist of the m-grid and above the low-resolution limit.

    >>> band_mask(16, 64, 2.5, 300.0).shape
    (16, 9)
    """
    fy, fx = _freqs(m)
    r = np.sqrt(fy ** 2 + fx ** 2)
    r_lo = n * pixel_size / low_resolution if low_resolution > 0 else 0.0
    return (r < m / 2) & (r >= r_lo)


def multiplicity(m: int) -> np.ndarray:
    """Friedel weight of each half-layout coefficient in a full-grid sum (1 on kx=0 and kx=m/2, else 2).

    >>> multiplicity(4)[0].tolist()
    [1.0, 2.0, 1.0]
    """
    w = np.full((m, m // 2 + 1), 2.0, dtype=np.float32)
    w[:, 0] = 1.0
    if m % 2 == 0:
        w[:, -1] = 1.0
    return w


def crop_half(f: np.ndarray, m: int) -> np.ndarray:
    """Keep the frequencies of an ``m``-box from half-layout transform(s) of a larger box.

    >>> crop_half(np.zeros((32, 17), complex), 16).shape
    (16, 9)
    """
    n = f.shape[-2]
    if m == n:
        return np.ascontiguousarray(f)
    h = m // 2
    rows = np.r_[0:h, n - h:n]
    return np.ascontiguousarray(f[..., rows, : h + 1])


def pad_half(f: np.ndarray, n: int) -> np.ndarray:
    """Zero-pad half-layout transform(s) of an ``m``-box to an ``n``-box (inverse of :func:`crop_half`).

    >>> f = np.arange(16 * 9).reshape(16, 9).astype(complex)
    >>> bool(np.array_equal(crop_half(pad_half(f, 32), 16), f))
    True
    """
    m = f.shape[-2]
    if m == n:
        return f.copy()
    h = m // 2
    out = np.zeros(f.shape[:-2] + (n, n // 2 + 1), dtype=f.dtype)
    out[..., 0:h, : h + 1] = f[..., 0:h, :]
    out[..., n - h:n, : h + 1] = f[..., h:m, :]
    return out


@lru_cache(maxsize=32)
def _outside(n: int, radius: float) -> np.ndarray:
    yy, xx = np.indices((n, n))
    c = n // 2
    out = (yy - c) ** 2 + (xx - c) ** 2 > radius ** 2
    out.setflags(write=False)
    return out


@lru_cache(maxsize=32)
def _grids(n: int, m: int, pixel_size: float, low_resolution: float, mask_radius: float, mask_edge: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per-settings constants of :func:`classify_particle` (read-only): band, band x multiplicity,
    particle mask and its noise power."""
    band = band_mask(m, n, pixel_size, low_resolution)
    mult = multiplicity(m) * band
    mask = circle_mask(n, mask_radius, mask_edge)
    for a in (band, mult, mask):
        a.setflags(write=False)
    return band, mult, mask, float(np.sum(mask.astype(np.float64) ** 2))


# ------------------------------------------------------------------ per particle preparation
def normalise_particle(image: np.ndarray, mask_radius: float, white_protein: bool = False) -> np.ndarray:
    """Zero mean, unit variance outside ``mask_radius`` (pixels), in the contrast of the model.

    The model of a particle is ``C A`` with the CTF ``C = -sin(chi)`` (negative
    at low resolution) and ``A`` the projected density (protein white in the
    class averages, as refine2d shows them): a stack with dark protein (cisTEM's
    convention) is ``C A`` as stored; a stack with white protein is negated.

    >>> img = np.random.default_rng(0).normal(3.0, 2.0, (32, 32))
    >>> out = normalise_particle(img, 10.0)
    >>> bool(abs(out[0, :].mean()) < 1.0)
    True
    """
    img = np.asarray(image, dtype=np.float32)
    outside = _outside(img.shape[0], float(mask_radius))
    vals = img[outside] if outside.sum() > 16 else img.ravel()
    mean = float(vals.mean())
    sd = float(vals.std())
    if sd <= 0:
        return np.zeros_like(img)
    sign = -1.0 if white_protein else 1.0
    return ((img - mean) * np.float32(sign / sd)).astype(np.float32)


def particle_ft(image: np.ndarray, settings: ClassifySettings) -> tuple[np.ndarray, float]:
    """Normalised, masked, binned transform of one particle, and its noise power per coefficient.

    Returns
    -------
    X : complex64 (m, m//2+1)
    noise_power : float
        ``sum(mask^2)``: the power per coefficient of unit-variance white noise after masking.
    """
    s = settings
    img = normalise_particle(image, s.mask_radius + 0.5 * s.mask_edge, s.white_protein)
    _, _, mask, power = _grids(s.n, s.m, s.pixel_size, s.low_resolution, s.mask_radius, s.mask_edge)
    f = _fft.ft2(img * mask)
    return crop_half(f, s.m).astype(np.complex64), power


def rotate_image(img: np.ndarray, angle: float) -> np.ndarray:
    """Rotate an image's content anticlockwise by ``angle`` degrees about ``N//2`` (bilinear; reference).

    ``out(r) = img(R(-angle) (r - c) + c)`` with r = (x, y), y the row.

    >>> img = np.zeros((9, 9), np.float32); img[4, 6] = 1.0
    >>> np.argwhere(rotate_image(img, 90.0) > 0.5).tolist()  # (x=+2) -> (y=+2)
    [[6, 4]]
    """
    n = img.shape[0]
    c = n // 2
    a = np.deg2rad(angle)
    ca, sa = np.cos(a), np.sin(a)
    out = np.zeros_like(img, dtype=np.float32)
    for y in range(n):
        for x in range(n):
            u, v = x - c, y - c
            sx = ca * u + sa * v + c
            sy = -sa * u + ca * v + c
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            fx, fy = sx - x0, sy - y0
            acc = 0.0
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    yy, xx = y0 + dy, x0 + dx
                    if 0 <= yy < n and 0 <= xx < n:
                        acc += wy * wx * img[yy, xx]
            out[y, x] = acc
    return out


@njit(cache=True)
def _rotate_oversampled(big, cosv, sinv, m, out):
    # big: (2m, 2m) image sampled twice as finely as the m-grid; out: (J, m, m)
    p = big.shape[0]
    cb = p // 2
    c = m // 2
    for j in range(cosv.shape[0]):
        ca = cosv[j]
        sa = sinv[j]
        for y in range(m):
            v = (y - c) * 2.0
            for x in range(m):
                u = (x - c) * 2.0
                sx = ca * u + sa * v + cb
                sy = -sa * u + ca * v + cb
                x0 = int(np.floor(sx))
                y0 = int(np.floor(sy))
                fx = sx - x0
                fy = sy - y0
                acc = 0.0
                if x0 >= 0 and y0 >= 0 and x0 + 1 < p and y0 + 1 < p:
                    acc = ((1 - fy) * ((1 - fx) * big[y0, x0] + fx * big[y0, x0 + 1])
                           + fy * ((1 - fx) * big[y0 + 1, x0] + fx * big[y0 + 1, x0 + 1]))
                out[j, y, x] = acc


def rotated_particles(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """The binned particle rotated by every angle (degrees), as half-layout transforms (J, m, m//2+1).

    The image is interpolated on a twice finer grid (refine2d's padding factor 2), so
    bilinear interpolation blurs little.

    >>> x = image_to_ft(np.random.default_rng(0).normal(size=(16, 16)), 16)
    >>> rotated_particles(x, np.array([0.0, 90.0])).shape
    (2, 16, 9)
    """
    m = x.shape[-2]
    big = _fft.ift2(pad_half(x, 2 * m)) * np.float32(4.0)
    rad = np.deg2rad(np.asarray(angles, dtype=np.float64))
    out = np.empty((len(rad), m, m), dtype=np.float32)
    _rotate_oversampled(big.astype(np.float32), np.cos(rad), np.sin(rad), m, out)
    return _fft.ft2(out).astype(np.complex64)


def rotated_ctfs(m: int, binned_pixel: float, optics: tuple[float, float, float], df1: float, df2: float,
                 angast: float, pshift: float, angles: np.ndarray) -> np.ndarray:
    """CTFs of the rotated particles (J, m, m//2+1): the astigmatism angle turns with the image.

    :func:`cistem_mpi.kernels.ctf.ctf_2d_stack` with ``angast + angle`` (amplitude contrast at least
    0.001, as refine2d's CTF).

    >>> rotated_ctfs(16, 4.0, (300.0, 2.7, 0.07), 1e4, 9e3, 0.0, 0.0, np.array([0.0, 45.0])).shape
    (2, 16, 9)
    """
    voltage, cs, ac = optics
    j = len(angles)
    return ctf_2d_stack(m, binned_pixel, voltage, cs, max(ac, 0.001), np.full(j, float(df1)),
                        np.full(j, float(df2)), float(angast) + np.asarray(angles, dtype=np.float64), float(pshift))


# ------------------------------------------------------------------ ML weights
@njit(cache=True)
def ml_weights(win, norms, log_prior, shift_prior, scale, log_range):
    """Posterior weights over rotations x classes x shifts (numba).

    Parameters
    ----------
    win : float32 (J, K, S, S)
        ``<X_j, C_j A_k T_t>`` (full-grid sums) over the shift window.
    norms : float64 (J, K)
        ``|C_j A_k|^2``.
    log_prior : float64 (K,)
        Log class priors (-inf for an empty class).
    shift_prior : float64 (S, S)
        Log shift prior.
    scale : float
        ``smoothing / (2 s^2)``.
    log_range : float

    Returns
    -------
    weights : float32 (J, K, S, S), summing to 1 (zero where dropped)
    logp : float
        ``log sum exp(L)`` over everything kept (the particle's LogP).
    best : int64 (4,)
        (j, k, iy, ix) of the largest weight.
    """
    nj, nk, s1, s2 = win.shape
    lmax = -np.inf
    best = np.zeros(4, dtype=np.int64)
    for j in range(nj):
        for k in range(nk):
            if log_prior[k] == -np.inf:
                continue
            base = log_prior[k] - scale * norms[j, k]
            for a in range(s1):
                for b in range(s2):
                    v = base + 2.0 * scale * win[j, k, a, b] + shift_prior[a, b]
                    if v > lmax:
                        lmax = v
                        best[0] = j
                        best[1] = k
                        best[2] = a
                        best[3] = b
    w = np.zeros((nj, nk, s1, s2), dtype=np.float32)
    total = 0.0
    for j in range(nj):
        for k in range(nk):
            if log_prior[k] == -np.inf:
                continue
            base = log_prior[k] - scale * norms[j, k] - lmax
            for a in range(s1):
                for b in range(s2):
                    d = base + 2.0 * scale * win[j, k, a, b] + shift_prior[a, b]
                    if d >= -log_range:
                        e = np.exp(d)
                        w[j, k, a, b] = e
                        total += e
    inv = 1.0 / total
    for j in range(nj):
        for k in range(nk):
            for a in range(s1):
                for b in range(s2):
                    w[j, k, a, b] *= inv
    return w, lmax + np.log(total), best


@njit(cache=True)
def _accumulate(num, den, half, kidx, jidx, wmaps, wsum, xr, cr, fy_idx, fx_idx, eyn, exn):
    # num: (2, K, m, mh) complex128; den: (2, K, m, mh) float64; wmaps: (P, S, S) weights of pair p
    # W_p(f) = sum_t w_t exp(-2 pi i f.t / m) by a separable DFT over the window only;
    # num += C X conj(W) (the particle shifted back by each t), den += C^2 sum w
    m = eyn.shape[0]
    sz = eyn.shape[1]
    q = np.zeros((m, sz), dtype=np.complex128)
    for p in range(kidx.shape[0]):
        k = kidx[p]
        j = jidx[p]
        ws = wsum[p]
        for fy in range(m):
            for tx in range(sz):
                acc = 0j
                for ty in range(sz):
                    acc += eyn[fy, ty] * wmaps[p, ty, tx]
                q[fy, tx] = acc
        for i in range(fy_idx.shape[0]):
            fy = fy_idx[i]
            fx = fx_idx[i]
            wf = 0j
            for tx in range(sz):
                wf += q[fy, tx] * exn[tx, fx]
            c = cr[j, fy, fx]
            num[half, k, fy, fx] += c * xr[j, fy, fx] * np.conj(wf)
            den[half, k, fy, fx] += ws * c * c


def new_sums(k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty class sums: numerators (2, K, m, m//2+1) complex128 and CTF² weights (2, K, m, m//2+1) float64.

    The first axis is the half set.

    >>> num, den = new_sums(3, 16)
    >>> num.shape, den.shape
    ((2, 3, 16, 9), (2, 3, 16, 9))
    """
    return (np.zeros((2, k, m, m // 2 + 1), dtype=np.complex128), np.zeros((2, k, m, m // 2 + 1), dtype=np.float64))


def accumulate(num: np.ndarray, den: np.ndarray, half: int, weights: np.ndarray, xr: np.ndarray, cr: np.ndarray,
               band: np.ndarray, r: int) -> np.ndarray:
    """Add one particle's weighted, shifted-back contributions to the class sums (in place).

    Parameters
    ----------
    weights : (J, K, S, S) posterior weights; window index ``a`` is shift ``a - r`` binned pixels.
    xr, cr : (J, m, m//2+1) rotated particle transforms and their CTFs.
    band : bool (m, m//2+1)
    r : int
        Search range in binned pixels (S = 2 r + 1).

    Returns
    -------
    ndarray (K,)
        The particle's weight per class.
    """
    m = xr.shape[-2]
    pair = weights.sum(axis=(2, 3))
    jj, kk = np.nonzero(pair > 0)
    if len(jj):
        eyn, exn = _shift_back_dft(m, r)
        fy_idx, fx_idx = np.nonzero(band)
        _accumulate(num, den, int(half), kk.astype(np.int64), jj.astype(np.int64),
                    np.ascontiguousarray(weights[jj, kk], dtype=np.float64), pair[jj, kk].astype(np.float64),
                    xr, cr, fy_idx.astype(np.int64), fx_idx.astype(np.int64), eyn, exn)
    return pair.sum(axis=0)


_BACK_CACHE: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _shift_back_dft(m: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """exp(-2 pi i fy ty / m) (m, S) and exp(-2 pi i fx tx / m) (S, m//2+1) for shifts -r..r."""
    key = (m, r)
    if key not in _BACK_CACHE:
        t = np.arange(-r, r + 1)
        fy = np.fft.fftfreq(m) * m
        fx = np.arange(m // 2 + 1)
        _BACK_CACHE[key] = (np.ascontiguousarray(np.exp(-2j * np.pi * np.outer(fy, t) / m)),
                            np.ascontiguousarray(np.exp(-2j * np.pi * np.outer(t, fx) / m)))
    return _BACK_CACHE[key]


@njit(cache=True)
def _cc_window(xc, conj_refs, eyt, wxt, fy_idx, fx_idx, out):
    # eyt: (m, S) exp(+2 pi i fy ty / m); wxt: (S, mh) mult(fx) exp(+2 pi i fx tx / m)
    nj = xc.shape[0]
    nk = conj_refs.shape[0]
    sz = eyt.shape[1]
    mh = wxt.shape[1]
    q = np.zeros((mh, sz), dtype=np.complex64)
    for j in range(nj):
        for k in range(nk):
            q[:, :] = 0
            for i in range(fy_idx.shape[0]):
                fy = fy_idx[i]
                fx = fx_idx[i]
                p = xc[j, fy, fx] * conj_refs[k, fy, fx]
                for ty in range(sz):
                    q[fx, ty] += eyt[fy, ty] * p
            for ty in range(sz):
                for tx in range(sz):
                    acc = np.float32(0.0)
                    for fx in range(mh):
                        a = q[fx, ty]
                        b = wxt[tx, fx]
                        acc += a.real * b.real - a.imag * b.imag
                    out[j, k, ty, tx] = acc


_DFT_CACHE: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _window_dft(m: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """exp(+2 pi i fy ty / m) (m, S) and mult(fx) exp(+2 pi i fx tx / m) (S, m//2+1) for shifts -r..r."""
    key = (m, r)
    if key not in _DFT_CACHE:
        t = np.arange(-r, r + 1)
        fy = np.fft.fftfreq(m) * m
        fx = np.arange(m // 2 + 1)
        eyt = np.ascontiguousarray(np.exp(2j * np.pi * np.outer(fy, t) / m).astype(np.complex64))
        wxt = np.ascontiguousarray((multiplicity(m)[0][None, :] * np.exp(2j * np.pi * np.outer(t, fx) / m)
                                    ).astype(np.complex64))
        _DFT_CACHE[key] = (eyt, wxt)
    return _DFT_CACHE[key]


def correlation_windows(xr: np.ndarray, cr: np.ndarray, refs: np.ndarray, band: np.ndarray, r: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``<X_j, C_j A_k T_t>`` for every rotation j, class k and shift |t| <= r, and ``|C_j A_k|^2``.

    A small window (the usual case) is evaluated as an inverse DFT at its shifts
    only, written as two large complex matrix products (BLAS); a window wider
    than half the box uses batched inverse FFTs over all shifts.

    Returns
    -------
    win : float32 (J, K, 2r+1, 2r+1); index a is the shift a - r (binned pixels; [.., y, x])
    norms : float64 (J, K)
    """
    nj = xr.shape[0]
    k, m = refs.shape[0], refs.shape[1]
    mult = multiplicity(m) * band
    a2 = (np.abs(refs) ** 2 * mult).reshape(k, -1).astype(np.float64)
    c2 = (cr.astype(np.float64) ** 2).reshape(nj, -1)
    norms = np.einsum("jf,kf->jk", c2, a2)  # (no BLAS threads)
    idx = np.arange(-r, r + 1) % m
    win = np.empty((nj, k, 2 * r + 1, 2 * r + 1), dtype=np.float32)
    conj_refs = (np.conj(refs) * band).astype(np.complex64)
    scale = np.float32(m * m)
    xc = (xr * cr).astype(np.complex64)
    if (2 * r + 1) ** 2 * 4 > m * m:  # a large window: FFT over all shifts, keep the window
        block = max(1, (1 << 21) // max(1, k * m * (m // 2 + 1)))
        for j0 in range(0, nj, block):
            j1 = min(nj, j0 + block)
            prod = xc[j0:j1, None] * conj_refs[None]
            ccmap = _fft.irfftn(prod, m, axes=(2, 3))
            win[j0:j1] = ccmap[:, :, idx[:, None], idx[None, :]] * scale
        return win, norms
    # a small window: the inverse DFT at the window's shifts only (numba, no temporary arrays)
    # cc(t) = sum_half mult(fx) Re(P(f) exp(+2 pi i f.t / m)),  P = X_j C_j conj(A_k)
    ey, wx = _window_dft(m, r)
    fy_idx, fx_idx = np.nonzero(band)
    _cc_window(xc, conj_refs, ey, wx, fy_idx.astype(np.int64), fx_idx.astype(np.int64), win)
    return win, norms


def _parabola(cm: float, c0: float, cp: float) -> float:
    den = cm - 2 * c0 + cp
    if den >= 0:
        return 0.0
    return float(np.clip(0.5 * (cm - cp) / den, -0.5, 0.5))


def classify_particle(image: np.ndarray, ctf: tuple[float, float, float, float], optics: tuple[float, float, float],
                      refs: np.ndarray, log_prior: np.ndarray, settings: ClassifySettings, angles: np.ndarray,
                      sums: tuple[np.ndarray, np.ndarray] | None = None, half: int = 0,
                      class_weights: np.ndarray | None = None) -> ParticleOutcome:
    """Classify one particle against every class and add it to the class sums.

    Parameters
    ----------
    image : (n, n) the particle as stored.
    ctf : (df1 Å, df2 Å, angast degrees, pshift radians)
    optics : (voltage kV, Cs mm, amplitude contrast)
    refs : complex64 (K, m, m//2+1) class references (band-limited, :func:`image_to_ft`).
    log_prior : float64 (K,) log class priors (-inf: empty class, skipped).
    settings : ClassifySettings
    angles : in-plane angles (degrees, :func:`rotation_angles`).
    sums : (num, den) from :func:`new_sums`, updated in place (None: not accumulated).
    half : 0 or 1, the particle's half set.
    class_weights : float64 (K,), optional
        The particle's posterior class probabilities are added to it (soft populations).

    Returns
    -------
    ParticleOutcome

    >>> s = ClassifySettings(n=32, m=16, pixel_size=4.0, mask_radius=12, mask_edge=3, low_resolution=300,
    ...                      search_range=3, shift_sigma=3, psi_step=30)
    >>> refs = image_to_ft(np.ones((2, 32, 32), np.float32), 16)
    >>> out = classify_particle(np.random.default_rng(0).normal(size=(32, 32)), (1e4, 1e4, 0, 0),
    ...                         (300, 2.7, 0.07), refs, np.log([0.5, 0.5]), s, rotation_angles(8, 48, 30))
    >>> out.class_index in (0, 1)
    True
    """
    s = settings
    x, noise_power = particle_ft(image, s)
    band, mult, _, _ = _grids(s.n, s.m, s.pixel_size, s.low_resolution, s.mask_radius, s.mask_edge)
    x = x * band
    xr = rotated_particles(x, angles)
    cr = rotated_ctfs(s.m, s.binned_pixel, optics, ctf[0], ctf[1], ctf[2], ctf[3], angles)
    r = s.search_binned
    win, norms = correlation_windows(xr, cr, refs, band, r)
    t = (np.arange(-r, r + 1) * (s.n / s.m)).astype(np.float64)  # full pixels
    sp = -(t[:, None] ** 2 + t[None, :] ** 2) / (2.0 * max(s.shift_sigma, 1e-3) ** 2)
    sp = np.where(np.sqrt(t[:, None] ** 2 + t[None, :] ** 2) <= s.search_range + 1e-6, sp, -np.inf)
    scale = s.smoothing / (2.0 * noise_power)
    w, logp, best = ml_weights(win, norms.astype(np.float64), np.asarray(log_prior, dtype=np.float64), sp,
                               scale, s.log_range)
    if sums is not None:
        class_w = accumulate(sums[0], sums[1], half, w, xr, cr, band, r)
    else:
        class_w = w.sum(axis=(0, 2, 3))
    if class_weights is not None:
        class_weights += class_w
    j, k, a, b = (int(v) for v in best)
    # sub-pixel peak for the reported shift
    oy = ox = 0.0
    if 0 < a < 2 * r:
        oy = _parabola(win[j, k, a - 1, b], win[j, k, a, b], win[j, k, a + 1, b])
    if 0 < b < 2 * r:
        ox = _parabola(win[j, k, a, b - 1], win[j, k, a, b], win[j, k, a, b + 1])
    ty = (a - r + oy) * s.n / s.m
    tx = (b - r + ox) * s.n / s.m
    theta = float(angles[j])
    # rotate(x, theta) = T_t A  =>  x = T_{R(-theta) t} rotate(A, -theta)
    th = np.deg2rad(-theta)
    shx = np.cos(th) * tx - np.sin(th) * ty
    shy = np.sin(th) * tx + np.cos(th) * ty
    xx = float(np.sum(mult * np.abs(xr[j]) ** 2))
    den = np.sqrt(max(xx * norms[j, k], 1e-30))
    cc = float(np.clip(win[j, k, a, b] / den, -0.999999, 0.999999))
    return ParticleOutcome(class_index=k, psi=float(np.mod(theta, 360.0)), shx=float(shx), shy=float(shy),
                           logp=float(logp), sigma=float(np.sqrt(1.0 - cc * cc)), score=100.0 * cc,
                           occupancy=float(100.0 * class_w[k]))


# ------------------------------------------------------------------ class averages
def class_averages_ft(num: np.ndarray, den: np.ndarray, occupancy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class averages ``sum w C X / (sum w C^2 + c)``, and the two half-set averages.

    Parameters
    ----------
    num, den : summed class sums (2, K, m, m//2+1) (:func:`new_sums`).
    occupancy : (K,) fraction of the particles in each class; the constant ``c``
        (refine2d adds the class occupancy), floored at 1e-3.

    Returns
    -------
    full : complex (K, m, m//2+1)
    halves : complex (2, K, m, m//2+1)

    >>> num, den = new_sums(2, 8)
    >>> full, halves = class_averages_ft(num, den + 1.0, np.array([0.5, 0.5]))
    >>> full.shape, halves.shape
    ((2, 8, 5), (2, 2, 8, 5))
    """
    c = np.maximum(np.asarray(occupancy, dtype=np.float64), 1e-3)[:, None, None]
    full = (num[0] + num[1]) / (den[0] + den[1] + c)
    halves = num / (den + 0.5 * c[None])
    return full, halves


def ft_to_image(f: np.ndarray, n: int) -> np.ndarray:
    """Half-layout transform(s) of an m-box (full-image units) to real n-box image(s).

    >>> img = np.zeros((16, 16), np.float32); img[8, 8] = 1.0
    >>> float(ft_to_image(image_to_ft(img, 16), 16)[8, 8])
    1.0
    """
    return _fft.ift2(pad_half(np.asarray(f, dtype=np.complex128), n)).astype(np.float32)


def image_to_ft(images: np.ndarray, m: int) -> np.ndarray:
    """Real n-box image(s) to band-free half-layout transforms cropped to m (complex64).

    >>> image_to_ft(np.ones((3, 32, 32)), 16).shape
    (3, 16, 9)
    """
    return crop_half(_fft.ft2(np.asarray(images, dtype=np.float32)), m).astype(np.complex64)


def centre_image(img: np.ndarray, mask_radius: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Move an average's centre of mass (positive density inside the mask) to the box centre (whole pixels).

    Returns
    -------
    centred image, (dy, dx) the shift applied

    >>> img = np.zeros((16, 16)); img[4, 10] = 1.0
    >>> centre_image(img, 8)[1]
    (4, -2)
    """
    n = img.shape[0]
    c = n // 2
    yy, xx = np.indices(img.shape)
    inside = (yy - c) ** 2 + (xx - c) ** 2 <= mask_radius ** 2
    w = np.where(inside, np.clip(img, 0.0, None), 0.0)
    tot = float(w.sum())
    if tot <= 0:
        return img.copy(), (0, 0)
    cy = float((w * yy).sum() / tot)
    cx = float((w * xx).sum() / tot)
    dy, dx = int(round(c - cy)), int(round(c - cx))
    return np.roll(img, (dy, dx), axis=(0, 1)), (dy, dx)


def frc(f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    """Fourier ring correlation of two half-layout transforms (m, m//2+1), shells 0..m/2-1.

    >>> f = image_to_ft(np.random.default_rng(0).normal(size=(16, 16)), 16)
    >>> bool(np.allclose(frc(f, f)[1:], 1.0))
    True
    """
    m = f1.shape[-2]
    fy, fx = _freqs(m)
    shell = np.rint(np.sqrt(fy ** 2 + fx ** 2)).astype(int)
    w = multiplicity(m)
    nsh = m // 2
    num = np.zeros(nsh)
    a = np.zeros(nsh)
    b = np.zeros(nsh)
    sel = shell < nsh
    np.add.at(num, shell[sel], (w * np.real(f1 * np.conj(f2)))[sel])
    np.add.at(a, shell[sel], (w * np.abs(f1) ** 2)[sel])
    np.add.at(b, shell[sel], (w * np.abs(f2) ** 2)[sel])
    den = np.sqrt(a * b)
    return np.divide(num, den, out=np.zeros(nsh), where=den > 0)


def resolution_from_frc(curve: np.ndarray, m: int, binned_pixel: float, threshold: float = 0.143) -> float:
    """Resolution (Å) where the FRC first falls below ``threshold`` (shell 1 on); Nyquist if never.

    >>> resolution_from_frc(np.array([1, 1, 0.9, 0.1]), 8, 2.0)
    6.4
    """
    for s in range(1, len(curve)):
        if curve[s] < threshold:
            return float(m * binned_pixel / max(s - 0.5, 0.5))
    return float(2.0 * binned_pixel)


# ------------------------------------------------------------------ defaults and ranking
def default_class_count(n_particles: int) -> int:
    """cisTEM's GUI default: particles / 300, rounded down to 50, 40, 30, 20, 10 or else 5.

    >>> default_class_count(2000), default_class_count(12000), default_class_count(10**6)
    (5, 30, 50)
    """
    c = n_particles // 300
    for level in (50, 40, 30, 20, 10):
        if c > level:
            return level
    return 5


def rank_classes(population: np.ndarray, resolution: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Automatic class ranking and selection (the documented rule).

    Each class gets three ranks: by mean particle SCORE (higher first), by
    resolution (finer first) and by population (larger first).  Its quality
    is ``3 * score rank + 2 * resolution rank + population rank``: the score
    (how well its particles match the average) says most about whether a
    class is a particle, because noise aligned to noise still gives a
    half-set FRC (an optimistic resolution); population mostly breaks ties.
    The classes are ordered by quality (ties by class number); rank 1 is
    best.  The selection is the best-ranked classes, in rank order, down to
    the first class that fails: resolution within 1.5x the best class's
    resolution, mean score at least half the best class's, at least one
    particle.  So every rejected class ranks below every selected one.

    Parameters
    ----------
    population, resolution, score : (K,) particles (may be fractional), Å, mean SCORE.

    Returns
    -------
    rank : int (K,), 1 = best
    selected : bool (K,)

    >>> rank_classes(np.array([10, 50, 40]), np.array([30.0, 10.0, 12.0]), np.array([2.0, 9.0, 8.0]))
    (array([3, 1, 2]), array([False,  True,  True]))
    """
    pop = np.asarray(population, dtype=np.float64)
    res = np.asarray(resolution, dtype=np.float64)
    sc = np.asarray(score, dtype=np.float64)
    k = len(pop)
    alive = pop >= 1.0
    res_eff = np.where(alive, res, np.inf)
    sc_eff = np.where(alive, sc, -np.inf)

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.lexsort((np.arange(k), v))
        r = np.empty(k, dtype=np.float64)
        r[order] = np.arange(k)
        return r

    quality = 3 * ranks(-sc_eff) + 2 * ranks(res_eff) + ranks(-pop)
    order = np.lexsort((np.arange(k), quality))
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(1, k + 1)
    selected = np.zeros(k, dtype=bool)
    if alive.any():
        best_res = float(res_eff[alive].min())
        best_sc = float(sc_eff[alive].max())
        good = alive & (res_eff <= 1.5 * best_res) & (sc_eff >= 0.5 * best_sc)
        for c in order:  # the best-ranked classes down to the first one that fails
            if not good[c]:
                break
            selected[c] = True
    return rank, selected
