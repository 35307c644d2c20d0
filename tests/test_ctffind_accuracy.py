"""find-ctf's kernel against ground truth: simulated micrographs with known CTF.

The micrographs are made here from :mod:`cistem_mpi.kernels.ctf` directly
(weak-phase amorphous ice through the CTF with a B-factor envelope or a hard
information limit, then Poisson shot noise at 40 e/Å²), so that the
envelope and the information limit are known exactly.  The job test
(``test_find_ctf.py``) uses the project's micrograph simulator.
"""

from __future__ import annotations

import numpy as np
import pytest

from cistem_mpi.kernels.ctf import ctf_2d
from cistem_mpi.kernels.ctffind import CtffindOptions, estimate_ctf

PX = 1.5


def simulate(df1, df2, angast, pshift=0.0, bfactor=50.0, cutoff=None, n=1024, px=PX, dose=40.0, seed=0,
             phase_sigma=0.1):
    """Counts image of weak-phase ice (white phase noise) through the CTF, shot noise at ``dose`` e/Å²."""
    rng = np.random.default_rng(seed)
    phase = rng.normal(size=(n, n)).astype(np.float32) * phase_sigma
    c = ctf_2d(n, px, 300.0, 2.7, 0.07, df1, df2, angast, pshift, bfactor)
    if cutoff is not None:
        fy = np.fft.fftfreq(n)[:, None] / px
        fx = np.fft.rfftfreq(n)[None, :] / px
        c = c * (fy ** 2 + fx ** 2 < 1.0 / cutoff ** 2)
    intensity = 1.0 + 2.0 * np.fft.irfft2(np.fft.rfft2(phase) * c, s=(n, n))
    return rng.poisson(np.clip(intensity, 0, None) * dose * px * px).astype(np.float32)


def _angle_error(a, b):
    return abs((a - b + 90.0) % 180.0 - 90.0)


def information_limit(bfactor=50.0, cutoff=None, pixel_size=PX):
    """Finest spacing (Å) with simulated signal: the hard cutoff, the B envelope at 1 %, and Nyquist."""
    limit = 2.0 * pixel_size
    if cutoff is not None:
        limit = max(limit, cutoff)
    if bfactor > 0:
        limit = max(limit, 1.0 / np.sqrt(4.0 * np.log(100.0) / bfactor))
    return limit


def _check(r, df1, df2, ang):
    tol = lambda d: max(0.01 * d, 50.0)  # noqa: E731
    t1, t2, ta = (df1, df2, ang) if df1 >= df2 else (df2, df1, ang + 90.0)
    assert abs(r.df1 - t1) < tol(t1), (r.df1, t1)
    assert abs(r.df2 - t2) < tol(t2), (r.df2, t2)
    if t1 - t2 > 200:
        assert _angle_error(r.angast, ta) < 5.0, (r.angast, ta)


CASES = [  # df1, df2, angle: 0.5 .. 5 µm, astigmatism 0 .. 1500 Å
    (5300, 4900, 20.0),
    (8000, 8000, 0.0),
    (12750, 11250, -35.0),
    (20300, 19700, 75.0),
    (30000, 29000, 130.0),
    (41000, 39500, -80.0),
    (50200, 49800, 5.0),
]


@pytest.mark.parametrize("df1,df2,ang", CASES)
def test_defocus_and_astigmatism_across_half_to_five_micrometres(df1, df2, ang):
    img = simulate(df1, df2, ang, seed=int(df1) % 97)
    r = estimate_ctf(img, PX, 300.0, 2.7, 0.07)
    _check(r, df1, df2, ang)
    assert r.score > 0.1
    assert r.pshift == 0.0
    assert r.fit_resolution >= information_limit()


@pytest.mark.parametrize("pshift", [0.4, 1.5, 2.7])
def test_phase_plate_shift_within_a_tenth_of_a_radian(pshift):
    df1, df2, ang = 9400, 8600, 50.0
    img = simulate(df1, df2, ang, pshift=pshift, seed=7)
    r = estimate_ctf(img, PX, 300.0, 2.7, 0.07, CtffindOptions(phase_plate=True))
    _check(r, df1, df2, ang)
    d = (r.pshift - pshift + np.pi / 2) % np.pi - np.pi / 2  # |CTF| fixes the shift modulo pi
    assert abs(d) < 0.1, (r.pshift, pshift)
    assert r.fit_resolution >= information_limit()


@pytest.mark.parametrize("cutoff,defocus", [(4.0, 9000), (6.0, 30000), (8.0, 18000)])
def test_fit_resolution_never_better_than_the_information_limit(cutoff, defocus):
    img = simulate(defocus + 300, defocus - 300, 10.0, bfactor=0.0, cutoff=cutoff, seed=11)
    r = estimate_ctf(img, PX, 300.0, 2.7, 0.07)
    assert r.fit_resolution >= information_limit(0.0, cutoff)
    assert r.fit_resolution < cutoff * 1.25  # and it finds the limit


@pytest.mark.parametrize("bfactor", [100.0, 250.0])
def test_fit_resolution_follows_the_envelope(bfactor):
    img = simulate(15300, 14700, 60.0, bfactor=bfactor, seed=13)
    r = estimate_ctf(img, PX, 300.0, 2.7, 0.07)
    # beyond the frequency where the envelope exp(-B g^2 / 4) is 1 % there is no information left
    assert r.fit_resolution >= information_limit(bfactor)
    _check(r, 15300, 14700, 60.0)


def test_resampled_small_pixel():
    """0.75 Å pixels: the spectrum is fitted at ~1.4 Å (larger tiles, centre kept), as ctffind does."""
    img = simulate(12400, 11600, 100.0, px=0.75, n=1024, seed=17)
    r = estimate_ctf(img, 0.75, 300.0, 2.7, 0.07, CtffindOptions(box=256))
    assert 1.3 < r.pixel_size_for_fitting <= 1.4
    _check(r, 12400, 11600, 100.0)
    # Nyquist of the resampled spectrum, not of the image
    assert r.fit_resolution >= information_limit(pixel_size=r.pixel_size_for_fitting)


@pytest.mark.parametrize("thickness", [False, True])
def test_fit_resolution_stops_at_nyquist_of_a_coarse_pixel(thickness):
    """3 Å pixels, fit to 8 Å: the rings stay good to the spectrum's edge (B = 20), yet the fit resolution
    is never finer than Nyquist, 6 Å.  The FRC's bins run to the corner (sqrt 2 x Nyquist): 4.25 Å before."""
    img = simulate(15200, 14800, 30.0, bfactor=20.0, n=512, px=3.0, seed=23)
    opts = CtffindOptions(box=256, max_resolution=8.0, thickness=thickness)
    r = estimate_ctf(img, 3.0, 300.0, 2.7, 0.07, opts)
    if not thickness:  # the slab fit moves the defocus a little; its own tests check it
        _check(r, 15200, 14800, 30.0)
    assert information_limit(20.0, pixel_size=3.0) == 6.0  # Nyquist: the envelope reaches past it
    assert r.fit_resolution >= 6.0
    assert r.fit_resolution < 6.0 * 1.05


def test_astigmatism_restraint_pulls_towards_zero():
    img = simulate(15800, 14200, 30.0, seed=19, dose=10.0, phase_sigma=0.05)
    free = estimate_ctf(img, PX, 300.0, 2.7, 0.07)
    held = estimate_ctf(img, PX, 300.0, 2.7, 0.07, CtffindOptions(astigmatism_tolerance=100.0))
    assert held.df1 - held.df2 < free.df1 - free.df2


def simulate_tilted(d0, astig, ang, tilt_axis, tilt_angle, n=1024, px=PX, dose=40.0, seed=0, levels=24,
                    bfactor=50.0):
    """A tilted specimen: the local defocus is d0 + tan(tilt) (-(x - n/2) sin(axis) + (y - n/2) cos(axis)) px.

    The image is assembled pixel by pixel from ``levels`` CTF-filtered copies of the same ice (the defocus
    of each pixel rounded to the nearest level, < 40 Å apart here).
    """
    rng = np.random.default_rng(seed)
    f = np.fft.rfft2(rng.normal(size=(n, n)).astype(np.float32) * 0.1)
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    a = np.deg2rad(tilt_axis)
    h = np.tan(np.deg2rad(tilt_angle)) * (-(x - n / 2) * np.sin(a) + (y - n / 2) * np.cos(a)) * px
    lv = np.linspace(h.min(), h.max(), levels)
    idx = np.clip(np.rint((h - lv[0]) / (lv[1] - lv[0])).astype(int), 0, levels - 1)
    out = np.zeros((n, n), np.float32)
    for k, dh in enumerate(lv):
        sel = idx == k
        if sel.any():
            c = ctf_2d(n, px, 300.0, 2.7, 0.07, d0 + astig / 2 + dh, d0 - astig / 2 + dh, ang, 0.0, bfactor)
            out[sel] = np.fft.irfft2(f * c, s=(n, n))[sel]
    return rng.poisson(np.clip(1 + 2 * out, 0, None) * dose * px * px).astype(np.float32)


@pytest.mark.parametrize("axis", [20.0, 250.0])
def test_tilt_within_3_degrees_of_a_30_degree_tilt(axis):
    img = simulate_tilted(15000, 400, 30.0, axis, 30.0, seed=int(axis))
    r = estimate_ctf(img, PX, 300.0, 2.7, 0.07, CtffindOptions(tilt=True))
    assert abs(r.tilt_angle - 30.0) < 3.0
    assert abs((r.tilt_axis - axis + 180) % 360 - 180) < 3.0
    _check(r, 15200, 14800, 30.0)  # the defocus at the image centre
    flat = estimate_ctf(simulate(15200, 14800, 30.0, seed=3), PX, 300.0, 2.7, 0.07, CtffindOptions(tilt=True))
    assert flat.tilt_angle < 3.0
