"""Insertion into 3D Fourier accumulators: adjointness, obvious reference, slabs,
and reconstruction of a real map from its projections."""

from __future__ import annotations

import numpy as np
import pytest

from cistem_mpi.kernels import fft
from cistem_mpi.kernels.backprojection import (
    ft_to_volume, insert_slices, insert_slices_numpy, new_accumulators, normalise_ft, reconstruct,
    slab_bounds,
)
from cistem_mpi.kernels.ctf import ctf_2d_stack
from cistem_mpi.kernels.euler import random_rotations, rotation_matrix
from cistem_mpi.kernels.projection import VolumeFT, extract_slices, prepare_volume_ft
from cistem_mpi.kernels.resample import fourier_crop
from cistem_mpi.kernels.symmetry import expand_rotations


@pytest.fixture(scope="module")
def map32(shared_data):
    import mrcfile

    with mrcfile.open(str(shared_data / "aspire" / "clean70SRibosome_vol_65p.mrc"), permissive=True) as m:
        return fourier_crop(np.asarray(m.data, np.float32), 32)


@pytest.mark.parametrize("method", ["linear", "cubic", "nearest"])
@pytest.mark.parametrize("n,p", [(16, 32), (15, 31)])
def test_insertion_is_the_adjoint_of_extraction(method, n, p):
    rng = np.random.default_rng(0)
    shape = (p, p, p // 2 + 1)
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    r = random_rotations(6, rng)
    px = extract_slices(VolumeFT(x, n, p, method), r)
    y = (rng.standard_normal(px.shape) + 1j * rng.standard_normal(px.shape)).astype(np.complex64)
    d, w = new_accumulators(p)
    insert_slices(d, w, y, r, method=method, mode="adjoint")
    lhs = np.real(np.vdot(px.astype(np.complex128), y))
    rhs = np.real(np.vdot(x.astype(np.complex128), d))
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


def test_reconstruct_mode_equals_full_plane_full_grid_insertion():
    """Half-stored accumulation == inserting every full-plane point into a full grid."""
    rng = np.random.default_rng(1)
    n, p = 16, 32
    imgs = rng.standard_normal((5, n, n)).astype(np.float32)
    f = fft.ft2(imgs)
    c = ctf_2d_stack(n, 2.0, 300, 2.7, 0.07, rng.uniform(8e3, 2e4, 5), rng.uniform(8e3, 2e4, 5),
                     rng.uniform(-90, 90, 5))
    r = random_rotations(5, rng)
    r[0] = np.eye(3)
    r[1] = rotation_matrix(0, 90, 0)
    d1, w1 = new_accumulators(p)
    insert_slices(d1, w1, f, r, ctf=c, max_radius=7.5)
    d2, w2 = new_accumulators(p)
    insert_slices_numpy(d2, w2, f, r, ctf=c, max_radius=7.5)
    assert np.abs(d1 - d2).max() <= 1e-5 * np.abs(d2).max()
    assert np.abs(w1 - w2).max() <= 1e-5 * w2.max()


def test_slab_insertion_equals_rows_of_full_insertion():
    rng = np.random.default_rng(2)
    n, p = 16, 32
    f = fft.ft2(rng.standard_normal((7, n, n)).astype(np.float32))
    r = random_rotations(7, rng)
    g = rng.uniform(0.2, 1.0, 7)
    full_d, full_w = new_accumulators(p)
    insert_slices(full_d, full_w, f, r, image_weights=g)
    slabs = slab_bounds(p, 3)
    assert slabs[0][0] == 0 and slabs[-1][1] == p
    for z0, z1 in slabs:
        d, w = new_accumulators(p, (z0, z1))
        insert_slices(d, w, f, r, image_weights=g, z_range=(z0, z1))
        assert np.array_equal(d, full_d[z0:z1]) and np.array_equal(w, full_w[z0:z1])
    # normalisation is elementwise: per-slab results stack to the full result
    parts = [normalise_ft(full_d[a:b], full_w[a:b]) for a, b in slabs]
    assert np.array_equal(np.concatenate(parts), normalise_ft(full_d, full_w))


def test_accumulated_transform_is_hermitian_on_the_kx0_plane():
    rng = np.random.default_rng(3)
    n, p = 16, 32
    f = fft.ft2(rng.standard_normal((4, n, n)).astype(np.float32))
    d, w = new_accumulators(p)
    insert_slices(d, w, f, random_rotations(4, rng))
    plane = d[:, :, 0]
    mirror = plane[(-np.arange(p)) % p][:, (-np.arange(p)) % p]
    assert np.allclose(plane, np.conj(mirror), atol=1e-6 * np.abs(plane).max())


@pytest.mark.parametrize("method", ["linear", "nearest"])
@pytest.mark.interop
def test_reconstruction_from_noise_free_projections(map32, method):
    rng = np.random.default_rng(4)
    r = random_rotations(1500, rng)
    s = extract_slices(prepare_volume_ft(map32, 2.0, method), r)
    d, w = new_accumulators(64)
    insert_slices(d, w, s, r, method=method)
    rec = ft_to_volume(normalise_ft(d, w), 32, method)
    assert np.corrcoef(rec.ravel(), map32.ravel())[0, 1] > (0.99 if method == "linear" else 0.95)
    assert abs(rec.std() / map32.std() - 1) < (0.02 if method == "linear" else 0.08)  # gridding-corrected
    if method == "linear":
        raw = ft_to_volume(normalise_ft(d, w), 32, method, grid_correct=False)
        assert abs(raw.std() / map32.std() - 1) > abs(rec.std() / map32.std() - 1)


@pytest.mark.interop
def test_ctf_weighted_reconstruction_with_shifts(map32):
    rng = np.random.default_rng(5)
    n, ps, k = 32, 3.0, 1500
    r = random_rotations(k, rng)
    df = rng.uniform(8000, 25000, k)
    c = ctf_2d_stack(n, ps, 300, 2.7, 0.1, df, df - 300, rng.uniform(-90, 90, k))
    sh = rng.uniform(-3, 3, (k, 2))
    from cistem_mpi.kernels.shifts import phase_shift

    imgs = fft.ift2(phase_shift(extract_slices(prepare_volume_ft(map32), r) * c, sh[:, 0], sh[:, 1]))
    rec = reconstruct(imgs, r, ctf=c, wiener=0.05 * k / 20, shifts_px=sh)
    # Wiener-filtered CTF reconstruction: compare after a mild low-pass
    from cistem_mpi.kernels.filters import lowpass

    assert np.corrcoef(lowpass(rec, 0.3, 0.05).ravel(), lowpass(map32, 0.3, 0.05).ravel())[0, 1] > 0.97
    # wrong shift sign destroys it
    bad = reconstruct(imgs, r, ctf=c, wiener=0.05 * k / 20, shifts_px=-sh)
    assert np.corrcoef(lowpass(bad, 0.3, 0.05).ravel(), lowpass(map32, 0.3, 0.05).ravel())[0, 1] < 0.9


def test_cubic_insertion_refused_for_reconstruction():
    d, w = new_accumulators(32)
    with pytest.raises(ValueError):
        insert_slices(d, w, np.zeros((1, 16, 9), np.complex64), np.eye(3)[None], method="cubic")


def test_symmetry_expansion_reconstructs_a_symmetric_map():
    from cistem_mpi.kernels.masks import sphere_mask
    from cistem_mpi.kernels.symmetry import symmetry_matrices

    n = 24
    rng = np.random.default_rng(6)
    # a C4-symmetric object: four blobs around z
    z, y, x = np.mgrid[0:n, 0:n, 0:n] - n // 2
    vol = np.zeros((n, n, n), np.float32)
    for m in symmetry_matrices("C4"):
        cx, cy, cz = m @ np.array([5.0, 2.0, 3.0])
        vol += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / 4.0).astype(np.float32)
    vol *= sphere_mask(n, 10, 3)
    r = random_rotations(300, rng)
    s = extract_slices(prepare_volume_ft(vol), r)
    sym_r = expand_rotations(r, "C4")
    d, w = new_accumulators(48)
    insert_slices(d, w, np.repeat(s, 4, axis=0), sym_r)
    rec = ft_to_volume(normalise_ft(d, w), n)
    assert np.corrcoef(rec.ravel(), vol.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("n,pad,method", [(48, 1, "linear"), (48, 2, "linear"), (40, 1, "nearest")])
def test_pruned_slab_insertion_equals_rows_of_full_insertion_at_the_padded_nyquist(n, pad, method):
    # slabs that are one kz-frequency interval skip the image rows that cannot reach them; at padding 1
    # the taps wrap at the padded Nyquist and mirror on the kx = 0 plane, the cases the pruning must keep
    rng = np.random.default_rng(5)
    p = n * pad
    f = fft.ft2(rng.standard_normal((40, n, n)).astype(np.float32))
    r = random_rotations(40, rng)
    r[0] = np.eye(3)  # a top view: every pixel at z = 0
    r[1] = np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])  # a side view: z = -x
    full_d, full_w = new_accumulators(p)
    insert_slices(full_d, full_w, f, r, method=method)
    cuts = sorted({0, 1, 3, p // 4, p // 2 - 1, p // 2, p // 2 + 1, p - 5, p - 1, p})
    for z0, z1 in zip(cuts[:-1], cuts[1:]):
        d, w = new_accumulators(p, (z0, z1))
        insert_slices(d, w, f, r, method=method, z_range=(z0, z1))
        assert np.array_equal(w, full_w[z0:z1]), (z0, z1)
        assert np.array_equal(d, full_d[z0:z1]), (z0, z1)


@pytest.mark.parametrize("n,p", [(16, 16), (16, 24), (16, 32), (15, 15), (15, 23), (15, 31), (24, 36), (17, 34)])
def test_fast_linear_insertion_equals_the_general_kernel_and_the_numpy_reference(n, p):
    # padding 1, 1.5 and 2, odd N and odd P: the fast path (interior taps, direct indexing, prefetch, float32
    # taps) must give the sums of the general tap-by-tap kernel (float64 taps) to float32 rounding -- with CTF,
    # per-image weights, max_radius and on slabs that cut through the kx = 0 mirror rows and the padded
    # Nyquist -- and those of the obvious numpy insertion
    import itertools

    from cistem_mpi.kernels.backprojection import _insert_slices

    rng = np.random.default_rng(n * 100 + p)
    k = 9
    f = (rng.standard_normal((k, n, n // 2 + 1)) + 1j * rng.standard_normal((k, n, n // 2 + 1))).astype(np.complex64)
    c = ctf_2d_stack(n, 2.0, 300, 2.7, 0.07, rng.uniform(8e3, 2e4, k), rng.uniform(8e3, 2e4, k),
                     rng.uniform(-90, 90, k))
    r = random_rotations(k, rng)
    r[0] = np.eye(3)  # a top view: every pixel at z = 0, the row x = 0 on the mirrored plane
    r[1] = np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])  # a side view: z = -x
    g = rng.uniform(0.2, 1.0, k)
    cuts = sorted({0, 1, 3, p // 4, p // 2 - 1, p // 2, (p + 1) // 2, p // 2 + 1, p - 3, p - 1, p})
    slabs = [None, (2, p - 3), *itertools.pairwise(cuts)]
    for zr in slabs:
        for ctf, wts, rad in ((c, g, None), (None, None, n / 2 - 1.3)):
            fast = new_accumulators(p, zr)
            ref = new_accumulators(p, zr)
            _insert_slices(*fast, f, r, ctf, wts, zr, "linear", rad, "reconstruct", True)
            _insert_slices(*ref, f, r, ctf, wts, zr, "linear", rad, "reconstruct", False)
            scale_d, scale_w = max(np.abs(ref[0]).max(), 1e-30), max(ref[1].max(), 1e-30)
            assert np.abs(fast[0] - ref[0]).max() <= 2e-6 * scale_d, (zr, rad)
            assert np.abs(fast[1] - ref[1]).max() <= 2e-6 * scale_w, (zr, rad)
            # and the same voxels: no tap lost or added
            assert np.array_equal(fast[1] > 1e-5 * scale_w, ref[1] > 1e-5 * scale_w), (zr, rad)
    d, w = new_accumulators(p)
    insert_slices(d, w, f, r, ctf=c, max_radius=n / 2 - 0.5)
    d2, w2 = new_accumulators(p)
    insert_slices_numpy(d2, w2, f, r, ctf=c, max_radius=n / 2 - 0.5)
    assert np.abs(d - d2).max() <= 1e-5 * np.abs(d2).max()
    assert np.abs(w - w2).max() <= 1e-5 * w2.max()
    for z0, z1 in ((0, p // 3), (p // 3, p)):  # a slab holds the same rows of it
        ds, ws = new_accumulators(p, (z0, z1))
        insert_slices(ds, ws, f, r, ctf=c, max_radius=n / 2 - 0.5, z_range=(z0, z1))
        assert np.array_equal(ds, d[z0:z1]) and np.array_equal(ws, w[z0:z1])
