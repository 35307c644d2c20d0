"""The fast paths of local refinement against the slow obvious versions, on random data.

* slices extracted on the cropped grid (and the compact reference block) =
  the full-grid slices cropped;
* the fused band score (``alignment._band_cc``) = slice x CTF x phase, then
  ``alignment.cc`` (``alignment._objective``), for every interpolation and
  both storage paths;
* the compiled Nelder-Mead = ``scipy.optimize.minimize(method="Nelder-Mead")``
  on the slow objective;
* the CTF on the cropped grid = the full CTF cropped; the cached particle mask
  = a fresh one.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from cistem_mpi.kernels import alignment as al
from cistem_mpi.kernels import refinement as rf
from cistem_mpi.kernels.ctf import ctf_2d
from cistem_mpi.kernels.euler import rotation_matrix
from cistem_mpi.kernels.interpolation import method_code
from cistem_mpi.kernels.masks import circle_mask
from cistem_mpi.kernels.projection import (
    compact_ft,
    extract_slices,
    extract_slices_cropped,
    prepare_volume_ft,
)

N = 32
OPTICS = (300.0, 2.7, 0.07)


def _blob_volume(seed: int) -> np.ndarray:
    """A few Gaussian blobs: smooth enough for a well-posed refinement, random enough to test."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:N, :N, :N] - N // 2
    vol = np.zeros((N, N, N), np.float32)
    for _ in range(12):
        c = rng.uniform(-8, 8, 3)
        vol += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * rng.uniform(1.5, 3) ** 2))
    return vol


@pytest.fixture(scope="module")
def volumes():
    vol = _blob_volume(1)
    return {m: prepare_volume_ft(vol, 2.0, method=m) for m in ("linear", "cubic", "nearest")}


def _particle(vft, band, rng, noise: float = 0.0):
    """(x_c, ctf_c, true alignment): a CTF-modulated shifted slice plus noise, cropped."""
    ang = rng.uniform([0, 20, 0], [360, 160, 360])
    sh = rng.uniform(-2, 2, 2)
    ctf_c = rf._cropped_ctf(N, band.m, 2.0, OPTICS, 15000.0, 14000.0, 30.0, 0.0)
    model = al._models(vft, ang[None], ctf_c, band)[0] * al._phases(band.m, N, sh[0], sh[1])
    x_c = model + noise * (rng.normal(size=model.shape) + 1j * rng.normal(size=model.shape)).astype(np.complex64)
    return x_c.astype(np.complex64), ctf_c, al.Alignment(*ang, *sh, 0.0)


def _fast_cc(vft, band, x_c, ctf_c, params, compact: bool) -> float:
    terms = al._band_terms(x_c, ctf_c, band)
    vol = al._volume_for(vft, band, terms[0], terms[1]) if compact else (vft.data, False, 0, 0, vft.size)
    assert vol[1] == compact
    m = band.m
    return al._band_cc(*vol, method_code(vft.method), vft.size / N, N, *terms, *params, np.zeros(4), np.zeros(4),
                       np.zeros(4), np.empty(m // 2 + 1), np.empty(m // 2 + 1), np.empty(m), np.empty(m))


@pytest.mark.parametrize("method", ["linear", "cubic", "nearest"])
def test_cropped_extraction_equals_cropped_full_slices(volumes, method):
    vft = volumes[method]
    rng = np.random.default_rng(2)
    rot = rotation_matrix(*rng.uniform(0, 360, (3, 7))).reshape(-1, 3, 3)
    for m in (12, 20, N):
        full = extract_slices(vft, rot, max_radius=m // 2)
        np.testing.assert_array_equal(extract_slices_cropped(vft, rot, m), al.crop_ft(full, m))


def test_compact_block_holds_the_transform_values(volumes):
    vft = volumes["cubic"]
    block, r, lo = compact_ft(vft, 10.0)
    assert compact_ft(vft, 10.0)[0] is block  # cached on the reference
    p = vft.size
    herm = np.fft.fftn(np.fft.irfftn(vft.data, s=(p, p, p), axes=(0, 1, 2)))  # the complete transform [kz, ky, kx]
    kz, ky, kx = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), np.arange(-lo, r + 1), indexing="ij")
    np.testing.assert_allclose(block, herm[kz % p, ky % p, kx % p], atol=1e-3 * np.abs(herm).max())
    assert compact_ft(vft, p / 2) is None  # not smaller than the transform: not built


@pytest.mark.parametrize("method", ["linear", "cubic", "nearest"])
@pytest.mark.parametrize("compact", [True, False])
def test_fused_score_equals_slice_ctf_phase_cc(volumes, method, compact):
    vft = volumes[method]
    band = al.make_band(N, 2.0, 8.0, 60.0)  # the compact block pays off below ~2/3 Nyquist
    rng = np.random.default_rng(3)
    x_c, ctf_c, _ = _particle(vft, band, rng, noise=0.3)
    for _ in range(6):
        v = np.r_[rng.uniform([0, 0, 0], [360, 180, 360]), rng.uniform(-3, 3, 2)]
        slow = -al._objective(v, v, np.ones(5, bool), x_c, ctf_c, vft, band, N, band.m, al.Alignment(*v, 0.0), None)
        fast = _fast_cc(vft, band, x_c, ctf_c, v, compact)
        assert abs(fast - slow) < 2e-5, (fast, slow)


def _scipy_local_refine(x_c, ctf_c, vft, band, start, angle_step, shift_step, max_shift, free):
    """The obvious version: scipy's Nelder-Mead on the slow objective (what local_refine used to run)."""
    x0 = np.array([start.phi, start.theta, start.psi, start.shx, start.shy])
    steps = np.array([angle_step] * 3 + [shift_step] * 2)[free]
    k = int(free.sum())
    simplex = np.vstack([x0[free]] + [x0[free] + np.eye(k)[i] * steps[i] for i in range(k)])
    res = optimize.minimize(al._objective, x0[free], args=(x0, free, x_c, ctf_c, vft, band, N, band.m, start,
                                                          max_shift),
                            method="Nelder-Mead",
                            options={"initial_simplex": simplex, "xatol": 0.02, "fatol": 1e-6, "maxfev": 250})
    x = x0.copy()
    x[free] = res.x
    return x, -res.fun, res.nfev


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_compiled_nelder_mead_matches_scipy(volumes, seed):
    vft = volumes["linear"]
    band = al.make_band(N, 2.0, 6.0, 60.0)
    rng = np.random.default_rng(seed)
    x_c, ctf_c, truth = _particle(vft, band, rng, noise=0.2)
    start = al.Alignment(truth.phi + 3, truth.theta - 2, truth.psi + 2, truth.shx + 0.7, truth.shy - 0.5, 0.0)
    for free in (np.ones(5, bool), np.array([1, 1, 1, 0, 0], bool), np.array([0, 0, 0, 1, 1], bool)):
        xs, fs, _ = _scipy_local_refine(x_c, ctf_c, vft, band, start, 3.0, 1.0, 4.0, free)
        before = al.evaluation_count[0]
        got = al.local_refine(x_c, ctf_c, vft, band, start, angle_step=3.0, max_shift=4.0,
                              angles_fixed=not free[0], shifts_fixed=not free[3])
        assert 0 < al.evaluation_count[0] - before <= 250
        xg = np.array([got.phi, got.theta, got.psi, got.shx, got.shy])
        assert abs(got.cc - fs) < 1e-4
        np.testing.assert_allclose(xg, xs, atol=0.05)
        assert np.all(xg[~free] == np.array([start.phi, start.theta, start.psi, start.shx, start.shy])[~free])


def test_nelder_mead_budget_bound_and_fixed_parameters(volumes):
    vft = volumes["linear"]
    band = al.make_band(N, 2.0, 6.0, 60.0)
    rng = np.random.default_rng(7)
    x_c, ctf_c, truth = _particle(vft, band, rng, noise=0.2)
    start = al.Alignment(truth.phi + 3, truth.theta, truth.psi, truth.shx + 1.5, truth.shy, 0.0)
    before = al.evaluation_count[0]
    al.local_refine(x_c, ctf_c, vft, band, start, max_shift=4.0, max_evaluations=17)
    assert al.evaluation_count[0] - before == 17
    # nothing free: the start, scored
    got = al.local_refine(x_c, ctf_c, vft, band, start, angles_fixed=True, shifts_fixed=True)
    v = np.array([start.phi, start.theta, start.psi, start.shx, start.shy])
    slow = -al._objective(v, v, np.ones(5, bool), x_c, ctf_c, vft, band, N, band.m, start, None)
    assert (got.phi, got.theta, got.psi, got.shx, got.shy) == tuple(v) and abs(got.cc - slow) < 2e-5
    # the shift bound holds: with a tiny range the result stays within it
    got = al.local_refine(x_c, ctf_c, vft, band, start, max_shift=0.3)
    assert np.hypot(got.shx - start.shx, got.shy - start.shy) <= 0.3 + 1e-12


def test_cropped_ctf_equals_full_ctf_cropped():
    for n, m in ((128, 42), (64, 64), (96, 30)):
        full = ctf_2d(n, 1.3, *OPTICS, 21000.0, 19500.0, 37.0, 0.4)
        got = rf._cropped_ctf(n, m, 1.3, OPTICS, 21000.0, 19500.0, 37.0, 0.4)
        np.testing.assert_allclose(got, al.crop_ft(full, m), atol=2e-5)


def test_cached_particle_mask_equals_a_fresh_one():
    rng = np.random.default_rng(8)
    img = rng.normal(size=(40, 40)).astype(np.float32)
    a = al.prepare_particle(img, 15.0)
    b = (img - img.mean()) / img.std() * circle_mask(40, 15.0, 3.0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert al.prepare_particle(img, 15.0) is not a  # a new image each time, the mask itself shared
