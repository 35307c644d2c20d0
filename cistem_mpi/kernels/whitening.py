"""Whitening of particle images by the noise power spectrum measured outside the particle mask.

cisTEM's reconstruct3d (``normalize_particles``) does this before insertion:

1. From a random sample of up to 2,000 particles of the whole data set, each
   image is scaled to unit variance outside the outer mask radius, the
   particle is masked *away* (an inverted soft circle, 10 Å cosine edge), and
   the power spectra of what is left are summed: :func:`noise_power_spectrum`
   (one radial curve for the data set, not one per particle).
2. Every particle's transform is multiplied by ``1 / sqrt(noise power)``
   (:func:`whitening_filter`); the CTF weights are left alone, and the map is
   not "un-whitened" afterwards.
3. Each whitened image is scaled to zero mean and unit variance in a ring
   next to the box edge (:func:`background_normalise`), so every particle
   enters the reconstruction with the same noise level.

Radii are in pixels; curves are indexed by integer Fourier shell (shell
``k`` is frequency ``k / N`` cycles/pixel) up to the corner of the box.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from cistem_mpi.kernels.fft import ft2, ift2, irfftn, rfftn
from cistem_mpi.kernels.grids import radius_2d
from cistem_mpi.kernels.masks import cosine_edge

__all__ = ["MASK_FALLOFF", "MAX_SAMPLES", "noise_mask_radius", "background_radius", "noise_power_spectrum",
           "whitening_filter", "background_normalise", "whiten_images", "whitened_transforms", "sample_positions"]

#: Å; cisTEM's ``mask_falloff``: the cosine edge of the outer mask and the margin of the background ring.
MASK_FALLOFF = 10.0
#: Particles sampled for the noise spectrum (cisTEM's ``max_samples``).
MAX_SAMPLES = 2000


def noise_mask_radius(mask_radius: float, pixel_size: float, box: int) -> float:
    """Radius (px) inside which the particle is masked away when measuring the noise.

    The outer mask radius, pulled in (as cisTEM does) when the mask and its
    edge would not leave noise inside 95 % of the box; 0 (no mask) means the
    outermost such radius.

    Parameters
    ----------
    mask_radius : float
        Outer mask radius (Å); 0: none given.
    pixel_size : float
        Å per pixel.
    box : int
        Image size N.

    Returns
    -------
    float

    Examples
    --------
    >>> noise_mask_radius(75.0, 1.5, 128)
    50.0
    >>> round(noise_mask_radius(0.0, 1.5, 128), 2)
    57.47
    """
    falloff = MASK_FALLOFF / pixel_size
    r = mask_radius / pixel_size if mask_radius > 0 else float(box)
    if 2.0 * r + falloff > 0.95 * box:
        r = 0.95 * box / 2.0 - falloff / 2.0
    return float(max(r, 1.0))


def background_radius(pixel_size: float, box: int) -> float:
    """Inner radius (px) of the ring next to the box edge used by :func:`background_normalise`.

    ``N/2 - 10 Å``, cisTEM's choice.

    >>> round(background_radius(1.5, 128), 2)
    57.33
    """
    return float(max(box / 2.0 - MASK_FALLOFF / pixel_size, 1.0))


def sample_positions(count: int, max_samples: int = MAX_SAMPLES) -> np.ndarray:
    """Indices ``0..count-1`` of the particles sampled for the noise spectrum (evenly spread, sorted).

    Deterministic (every rank and every rerun measures the same spectrum).

    >>> sample_positions(5, 3).tolist()
    [0, 2, 4]
    """
    if count <= max_samples:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, max_samples).round().astype(np.int64))


def _shell_of_pixels(n: int) -> np.ndarray:
    """Integer Fourier shell of each pixel of the rfft half grid of an N x N image."""
    fy = np.fft.fftfreq(n)[:, None] * n
    fx = np.fft.rfftfreq(n)[None, :] * n
    return np.floor(np.sqrt(fy * fy + fx * fx) + 0.5).astype(np.int64)


def noise_power_spectrum(images: np.ndarray, mask_radius: float, edge: float) -> np.ndarray:
    """Mean radial power spectrum of particle images outside a soft circle (the noise).

    Each image is scaled to unit variance outside ``mask_radius`` first, so
    no particle dominates the sum; the particle is then masked away with an
    inverted cosine-edged circle.  Sums from several calls can be combined by
    weighting with the number of images.

    Parameters
    ----------
    images : numpy.ndarray, shape (n, N, N)
        Particle images.
    mask_radius : float
        Radius of the circle masked away (px), e.g. :func:`noise_mask_radius`.
    edge : float
        Width of its cosine edge (px).

    Returns
    -------
    numpy.ndarray, shape (S,), float64
        Mean power per integer shell ``0..S-1`` (``S`` reaches the box corner).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> p = noise_power_spectrum(rng.normal(size=(20, 32, 32)), 8.0, 2.0)
    >>> p.shape, bool(np.ptp(p[2:16]) < 0.5 * p[2:16].mean())  # white noise: flat
    ((24,), True)
    """
    imgs = np.asarray(images, dtype=np.float32)
    if imgs.ndim == 2:
        imgs = imgs[None]
    n = imgs.shape[-1]
    r = radius_2d(n)
    outside = r > mask_radius
    keep = 1.0 - cosine_edge(r, mask_radius, edge)  # 0 on the particle, 1 in the background
    ys, xs = np.nonzero(outside)
    mean, sd = _ring_moments(imgs, ys.astype(np.int64), xs.astype(np.int64))
    ok = np.nonzero(sd > 0)[0]
    x = _standardised_masked(imgs, ok, mean, sd, keep.astype(np.float32))
    # the power spectrum does not depend on where the origin is: a plain (uncentred) transform will do
    power = _power_sum(rfftn(x, axes=(-2, -1)))
    shell = _shell_of_pixels(n)
    # rfft half grid: columns 1..N/2-1 stand for two pixels of the full transform
    mult = np.full(shell.shape, 2.0)
    mult[:, 0] = 1.0
    if n % 2 == 0:
        mult[:, -1] = 1.0
    s = shell.max() + 1
    num = np.bincount(shell.ravel(), (power * mult).ravel(), minlength=s)
    cnt = np.bincount(shell.ravel(), mult.ravel(), minlength=s)
    return np.divide(num, cnt * max(len(ok), 1), out=np.zeros(s), where=cnt > 0)


def whitening_filter(spectrum: np.ndarray, n: int) -> np.ndarray:
    """The filter ``1 / sqrt(noise power)`` on the rfft half grid of an N x N image.

    Linear interpolation between integer shells; 0 where no power was measured.  The DC term takes shell
    1's value: the images' means are removed before the spectrum is measured, so shell 0 holds no noise
    estimate (its near-zero power would otherwise make the filter blow up there).

    Parameters
    ----------
    spectrum : numpy.ndarray
        :func:`noise_power_spectrum` (shell ``k`` at ``k / N`` cycles/pixel).
    n : int
        Image size N.

    Returns
    -------
    numpy.ndarray, shape (N, N//2+1), float32

    Examples
    --------
    >>> float(whitening_filter(np.full(24, 4.0), 32)[3, 2])
    0.5
    """
    spec = np.asarray(spectrum, dtype=np.float64)
    w = np.where(spec > 0, 1.0 / np.sqrt(np.maximum(spec, 1e-300)), 0.0)
    if len(w) > 1:
        w[0] = w[1]
    fy = np.fft.fftfreq(n)[:, None] * n
    fx = np.fft.rfftfreq(n)[None, :] * n
    rad = np.sqrt(fy * fy + fx * fx)
    return np.interp(rad, np.arange(len(w)), w).astype(np.float32)


def background_normalise(images: np.ndarray, radius: float, return_scale: bool = False):
    """Zero mean and unit variance of the pixels beyond ``radius`` (px), per image.

    Images without variance there become zero (cisTEM's rule: they carry no information).
    With ``return_scale``, also the factor each image was multiplied by (0 for those).

    >>> x = background_normalise(np.random.default_rng(1).normal(3.0, 2.0, (2, 16, 16)), 5.0)
    >>> from cistem_mpi.kernels.grids import radius_2d
    >>> bool(np.allclose(x[:, radius_2d(16) > 5.0].std(axis=1), 1.0, atol=1e-5))
    True
    """
    imgs = np.asarray(images, dtype=np.float32)
    outside = radius_2d(imgs.shape[-1]) > radius
    vals = imgs[..., outside]
    mean = vals.mean(axis=-1)
    sd = vals.std(axis=-1)
    scale = np.where(sd > 0, 1.0 / np.where(sd > 0, sd, 1.0), 0.0)
    out = ((imgs - mean[..., None, None]) * scale[..., None, None]).astype(np.float32)
    return (out, scale.astype(np.float32)) if return_scale else out


def whiten_images(images: np.ndarray, filt: np.ndarray, radius: float, return_scale: bool = False):
    """Whitened, background-normalised images (real space): :func:`whitening_filter` then :func:`background_normalise`.

    The step-by-step form (three FFTs per image); the reconstruction uses :func:`whitened_transforms`,
    which gives these images' transforms with two.

    ``filt`` may also be one filter per image, shape (n, N, N//2+1).  With ``return_scale``, also the
    background factor of each image: ``filt * scale`` is then the image's ``1 / sigma(k)``, its noise
    amplitude per frequency in the units of the input.

    Parameters
    ----------
    images : numpy.ndarray, shape (n, N, N)
    filt : numpy.ndarray, shape (N, N//2+1)
        :func:`whitening_filter`.
    radius : float
        :func:`background_radius` (px).
    return_scale : bool
        Also return the per-image factors of :func:`background_normalise`.

    Returns
    -------
    numpy.ndarray, shape (n, N, N), float32 (and numpy.ndarray, shape (n,), with ``return_scale``)

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(3, 16, 16))
    >>> whiten_images(x, np.ones((16, 9), np.float32), 5.0).shape
    (3, 16, 16)
    """
    imgs = np.asarray(images, dtype=np.float32)
    f = ft2(imgs - imgs.mean(axis=(-2, -1), keepdims=True)) * filt
    return background_normalise(ift2(f, nx=imgs.shape[-1]), radius, return_scale=return_scale)


@njit(cache=True)
def _standardised_masked(imgs, which, mean, sd, keep):
    """``(imgs[i] - mean[i]) / sd[i] * keep`` for each i in ``which``, float32, one pass."""
    out = np.empty((which.shape[0], imgs.shape[1], imgs.shape[2]), dtype=np.float32)
    for j in range(which.shape[0]):
        i = which[j]
        mu = mean[i]
        inv = 1.0 / sd[i]
        for y in range(imgs.shape[1]):
            for x in range(imgs.shape[2]):
                out[j, y, x] = np.float32((imgs[i, y, x] - mu) * inv) * keep[y, x]
    return out


@njit(cache=True)
def _power_sum(f):
    """Sum over the stack of ``|f|^2`` per frequency (float64)."""
    out = np.zeros(f.shape[1:])
    for i in range(f.shape[0]):
        for y in range(f.shape[1]):
            for x in range(f.shape[2]):
                v = f[i, y, x]
                out[y, x] += v.real * v.real + v.imag * v.imag
    return out


@njit(cache=True)
def _ring_moments(imgs, ys, xs):
    """Mean and standard deviation of each image over the pixels (ys[j], xs[j]) (float64 sums)."""
    n = imgs.shape[0]
    mean = np.empty(n)
    sd = np.empty(n)
    m = ys.shape[0]
    for i in range(n):
        s1 = 0.0
        s2 = 0.0
        for j in range(m):
            v = np.float64(imgs[i, ys[j], xs[j]])
            s1 += v
            s2 += v * v
        mu = s1 / m
        mean[i] = mu
        sd[i] = np.sqrt(max(s2 / m - mu * mu, 0.0))
    return mean, sd


def whitened_transforms(images: np.ndarray, filt: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Plain (uncentred) transforms of :func:`whiten_images`'s images, with two FFTs per image instead of three.

    The background normalisation is linear: subtracting the ring mean m changes only the DC term
    (by ``-m N^2``) and the scale multiplies everything, so the images are whitened in Fourier space,
    brought back once to measure their ring, and the transform is corrected in place -- no third FFT.
    The result is ``rfftn`` of the normalised images as stored (not centred): pass it to
    :func:`~cistem_mpi.kernels.shifts.centred_shifted`, which centres and shifts in one pass.

    Parameters
    ----------
    images : numpy.ndarray, shape (n, N, N)
    filt : numpy.ndarray, shape (N, N//2+1) or (n, N, N//2+1)
        :func:`whitening_filter`.
    radius : float
        :func:`background_radius` (px).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        complex64 (n, N, N//2+1) transforms, each already multiplied by its background factor, and the
        factors (n,) float32 (0 for an image without background variance, whose transform is then 0).

    Examples
    --------
    >>> from cistem_mpi.kernels.fft import ft2
    >>> x = np.random.default_rng(0).normal(size=(3, 16, 16))
    >>> filt = np.linspace(0.5, 2.0, 16 * 9).reshape(16, 9).astype(np.float32)
    >>> f, scale = whitened_transforms(x, filt, 5.0)
    >>> ref, ref_scale = whiten_images(x, filt, 5.0, return_scale=True)
    >>> bool(np.allclose(np.fft.irfft2(f, s=(16, 16)), ref, atol=1e-5)), bool(np.allclose(scale, ref_scale))
    (True, True)
    """
    imgs = np.asarray(images, dtype=np.float32)
    n = imgs.shape[-1]
    f = rfftn(imgs, axes=(-2, -1))
    f[:, 0, 0] = 0.0  # the image mean removed first (whiten_images)
    f *= filt
    w = irfftn(f, n, axes=(-2, -1))
    ys, xs = np.nonzero(radius_2d(n) > radius)
    mean, sd = _ring_moments(w, ys.astype(np.int64), xs.astype(np.int64))
    scale = np.where(sd > 0, 1.0 / np.where(sd > 0, sd, 1.0), 0.0)
    f[:, 0, 0] -= (mean * n * n).astype(np.float32)  # rfftn of (w - mean)
    f *= scale.astype(np.float32)[:, None, None]
    return f, scale.astype(np.float32)
