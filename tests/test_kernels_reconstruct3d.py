"""kernels.reconstruct3d against slow, obvious references (issue #10: the inserter and finishing step as kernels)."""

from __future__ import annotations

import numpy as np

from cistem_mpi.io.params import empty_params
from cistem_mpi.kernels import backprojection as bp
from cistem_mpi.kernels import reconstruct3d as r3
from cistem_mpi.kernels import reconstruction as rec
from cistem_mpi.kernels.ctf import ctf_2d
from cistem_mpi.kernels.euler import rotation_matrix
from cistem_mpi.kernels.fft import ft2
from cistem_mpi.kernels.fsc import fsc as fsc_maps
from cistem_mpi.kernels.symmetry import symmetry_matrices


def _particles(n_img=6, n=12, seed=0):
    rng = np.random.default_rng(seed)
    p = empty_params(n_img)
    p["phi"], p["theta"], p["psi"] = rng.uniform(0, 360, n_img), rng.uniform(0, 180, n_img), rng.uniform(0, 360, n_img)
    p["shx"], p["shy"] = rng.uniform(-3, 3, n_img), rng.uniform(-3, 3, n_img)
    p["df1"], p["df2"], p["angast"] = rng.uniform(9000, 20000, n_img), rng.uniform(9000, 20000, n_img), 40.0
    p["occ"] = rng.uniform(20, 100, n_img)
    return rng.normal(size=(n_img, n, n)).astype(np.float32) + 3.0, p


def test_insert_particles_is_the_obvious_per_image_insertion():
    images, p = _particles()
    n, ps, half = images.shape[-1], 2.5, np.array([1, 2, 1, 1, 2, 2])
    sym = symmetry_matrices("C2")
    acc = bp.new_accumulators(24) + bp.new_accumulators(24)
    # below Nyquist: insert_slices splits the Nyquist column between +N/2 and -N/2, the reference does not
    r3.insert_particles(acc, images, p, half, ps, (300.0, 2.7, 0.07), sym, max_radius=n // 2 - 1)
    ref = bp.new_accumulators(24) + bp.new_accumulators(24)
    for i in range(len(images)):
        img = (images[i] - images[i].mean()) / images[i].std()
        # the shift undone by hand: multiply by exp(+2 pi i k.s / N) on the centred half grid
        ky = np.fft.fftfreq(n)[:, None]
        kx = np.fft.rfftfreq(n)[None, :]
        f = ft2(img.astype(np.float32)) * np.exp(2j * np.pi * (kx * p["shx"][i] + ky * p["shy"][i]) / ps)
        c = ctf_2d(n, ps, 300.0, 2.7, 0.07, p["df1"][i], p["df2"][i], p["angast"][i], p["pshift"][i])
        r = rotation_matrix(p["phi"][i], p["theta"][i], p["psi"][i]).reshape(3, 3)
        d, w = (ref[0], ref[1]) if half[i] == 1 else (ref[2], ref[3])
        w_occ = p["occ"][i] / 100.0
        for s in sym:
            # data += g c F and weight += g c^2: sqrt(g) on both image and CTF
            bp.insert_slices_numpy(d, w, (np.sqrt(w_occ) * f)[None], (s @ r)[None], ctf=np.sqrt(w_occ) * c[None],
                                   max_radius=n // 2 - 1)
    for got, want in zip(acc, ref):
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 2e-4 * scale


def test_wiener_normalise_equals_the_jobs_slab_algorithm():
    """The one-process form gives what the job gives with its z-slabs and summed shell sums."""
    images, p = _particles(30, 12, seed=1)
    acc = bp.new_accumulators(24) + bp.new_accumulators(24)
    r3.insert_particles(acc, images, p, rec.half_sets(np.arange(1, 31)), 2.5, (300.0, 2.7, 0.07), np.eye(3)[None])
    g1, g2, gf, fsc = r3.wiener_normalise(*acc, 12, nominator=0.5)
    cut = 10  # two slabs, 0:10 and 10:24, as two ranks hold them
    slabs = [tuple(a[z0:z1] for a in acc) for z0, z1 in ((0, cut), (cut, 24))]
    reg_half = np.zeros(7)
    for it in range(r3.WIENER_ITERATIONS + 1):
        sums = sum(rec.slab_shell_sums(*s, z0, 24, 12, reg_half, reg_half) for s, z0 in zip(slabs, (0, cut)))
        if it == 0:
            reg_half = 0.5 * (sums[3] + sums[4]) / np.maximum(sums[5], 1.0)
            continue
        f = rec.fsc_from_sums(sums)
        reg_half, reg_full = rec.wiener_regularisers(sums, f)
    want_f = np.concatenate([rec.normalise_slab(s[0] + s[2], s[1] + s[3], z0, 24, 12, 0.5 * reg_full)
                             for s, z0 in zip(slabs, (0, cut))])
    want_1 = np.concatenate([rec.normalise_slab(s[0], s[1], z0, 24, 12, reg_half) for s, z0 in zip(slabs, (0, cut))])
    np.testing.assert_allclose(fsc, f, rtol=1e-6)
    assert np.abs(gf - want_f).max() <= 1e-5 * np.abs(want_f).max()
    assert np.abs(g1 - want_1).max() <= 1e-5 * np.abs(want_1).max()


def test_finish_maps_half_maps_fsc_and_sharpening():
    images, p = _particles(40, 12, seed=2)
    acc = bp.new_accumulators(24) + bp.new_accumulators(24)
    r3.insert_particles(acc, images, p, rec.half_sets(np.arange(1, 41)), 2.5, (300.0, 2.7, 0.07), np.eye(3)[None])
    g1, g2, gf, _ = r3.wiener_normalise(*acc, 12)
    m = r3.finish_maps(g1, g2, gf, 12, 2.5, bfactor=50.0, mask_radius=10.0, keep_unmasked=True)
    # no gridding correction (cisTEM's); the written maps carry the outer mask, the unmasked copies do not
    h1, vol = bp.ft_to_volume(g1, 12, grid_correct=False), bp.ft_to_volume(gf, 12, grid_correct=False)
    outer = r3.outer_mask(12, 10.0, 2.5)
    np.testing.assert_array_equal(m.unmasked["half1"], h1)
    np.testing.assert_array_equal(m.unmasked["volume"], vol)
    np.testing.assert_array_equal(m.half1, h1 * outer)
    np.testing.assert_array_equal(m.volume, vol * outer)
    assert m.bfactor == 50.0 and m.fsc is not m.fsc_unmasked
    np.testing.assert_array_equal(m.sharpened, rec.sharpen(vol, 2.5, 50.0, m.resolution) * outer)
    assert np.allclose(m.frequency, np.arange(7) / (12 * 2.5))
    # the FSC is that of the half maps before the outer mask: the same with or without unmasked copies
    m2 = r3.finish_maps(g1, g2, gf, 12, 2.5, bfactor=50.0, mask_radius=10.0)
    assert m2.unmasked is None
    np.testing.assert_array_equal(m2.fsc, m.fsc)
    np.testing.assert_array_equal(m2.fsc_unmasked, fsc_maps(h1, bp.ft_to_volume(g2, 12, grid_correct=False))[1])


def _prepared_the_obvious_way(images, params, ps, optics, whitening):
    """prepare_slices step by step in real space: whiten, normalise, centre, shift, CTF per image."""
    from cistem_mpi.kernels import whitening as wh
    from cistem_mpi.kernels.shifts import phase_shift

    n = images.shape[-1]
    fts, ctfs = [], []
    for i, p in enumerate(params):
        x = images[i].astype(np.float64)
        if whitening is None:
            x = (x - x.mean()) / x.std()
            inv_sigma = 1.0
        else:
            x = np.fft.irfft2(np.fft.rfft2(x - x.mean()) * whitening, s=(n, n))  # whitened, in place
            ring = wh.radius_2d(n) > wh.background_radius(ps, n)
            x = (x - x[ring].mean()) / x[ring].std()
            inv_sigma = whitening / np.fft.irfft2(np.fft.rfft2(images[i] - images[i].mean()) * whitening,
                                                  s=(n, n))[ring].std()
        f = phase_shift(ft2(x.astype(np.float32))[None], -p["shx"] / ps, -p["shy"] / ps, nx=n)[0]
        fts.append(f)
        ctfs.append(ctf_2d(n, ps, *optics, p["df1"], p["df2"], p["angast"], p["pshift"]) * inv_sigma)
    return np.array(fts), np.array(ctfs)


def test_prepare_slices_equals_the_obvious_per_image_steps():
    """The fused preparation (one forward FFT, centring folded into the shift phases, the background
    normalisation applied to the transform, numba CTF) gives the step-by-step values, whitened or not, for
    even and odd boxes."""
    from cistem_mpi.kernels.whitening import whitening_filter

    rng = np.random.default_rng(7)
    optics = (300.0, 2.7, 0.07)
    for n, white in ((32, False), (32, True), (27, True)):
        k, ps = 5, 1.7
        images = (rng.normal(size=(k, n, n)) * rng.uniform(0.5, 3, (k, 1, 1)) + 4.0).astype(np.float32)
        p = empty_params(k)
        p["df1"] = rng.uniform(8e3, 2.5e4, k)
        p["df2"] = p["df1"] - rng.uniform(0, 900, k)
        p["angast"] = rng.uniform(-90, 90, k)
        p["shx"], p["shy"] = rng.normal(0, 4, k), rng.normal(0, 4, k)
        filt = whitening_filter(np.linspace(3.0, 0.2, n), n) if white else None
        got = r3.prepare_slices(images, p, np.ones(k, int), ps, optics, whitening=filt)
        ref_f, ref_c = _prepared_the_obvious_way(images, p, ps, optics, filt)
        scale = np.abs(ref_f).max()
        assert np.abs(got.fts - ref_f).max() < 2e-5 * scale, (n, white)
        assert np.abs(got.ctf - ref_c).max() < 2e-5 * np.abs(ref_c).max(), (n, white)


def test_phase_shift_of_an_odd_box_moves_the_image():
    """A whole-pixel phase shift of a 27-pixel image is a roll (the width alone would say 26 pixels)."""
    from cistem_mpi.kernels.fft import ift2
    from cistem_mpi.kernels.shifts import phase_shift

    x = np.random.default_rng(1).normal(size=(27, 27)).astype(np.float32)
    moved = ift2(phase_shift(ft2(x), 3.0, -2.0))
    assert np.allclose(moved, np.roll(x, (-2, 3), axis=(0, 1)), atol=1e-5)
