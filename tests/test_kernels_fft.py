"""FFT plan cache and centring conventions (cistem_mpi.kernels.fft)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cistem_mpi.kernels import fft


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    fft.use_pyfftw(True, threads=1)


def test_round_trips_odd_even_and_stacks():
    rng = np.random.default_rng(0)
    for shape in [(64, 64), (65, 65), (3, 32, 32), (6, 8)]:
        a = rng.standard_normal(shape).astype(np.float32)
        assert np.allclose(fft.ift2(fft.ft2(a), nx=shape[-1]), a, atol=1e-5)
    v = rng.standard_normal((17, 17, 17)).astype(np.float32)
    assert np.allclose(fft.iftn(fft.ftn(v)), v, atol=1e-5)


def test_matches_numpy_with_centre_at_n_over_2():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((33, 33)).astype(np.float32)
    ref = np.fft.rfft2(np.fft.ifftshift(a))
    assert np.allclose(fft.ft2(a), ref, rtol=1e-4, atol=1e-4)
    # a delta at the centre N//2 has a flat, real transform
    d = np.zeros((32, 32), np.float32)
    d[16, 16] = 1.0
    f = fft.ft2(d)
    assert np.allclose(f, 1.0, atol=1e-6)


def test_plans_are_built_once_and_reused():
    fft.clear_plan_cache()
    a = np.ones((48, 48), np.float32)
    for _ in range(5):
        fft.ft2(a)
    n1 = fft.plan_cache_info()["plans"]
    for _ in range(5):
        fft.ft2(a * 2)
    assert fft.plan_cache_info()["plans"] == n1 == 1


def test_inputs_are_not_modified_and_outputs_not_shared():
    rng = np.random.default_rng(2)
    f = fft.ft2(rng.standard_normal((32, 32)).astype(np.float32))
    keep = f.copy()
    r1 = fft.ift2(f)
    assert np.array_equal(f, keep)  # c2r must not destroy the caller's array
    r2 = fft.ift2(f * 0)
    assert not np.shares_memory(r1, r2) and np.abs(r1).max() > 0


def test_scipy_fallback_gives_the_same_numbers():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 40, 40)).astype(np.float32)
    fft.use_pyfftw(True)
    f1 = fft.ft2(a)
    fft.use_pyfftw(False)
    f2 = fft.ft2(a)
    assert np.allclose(f1, f2, rtol=1e-4, atol=1e-4)
    assert np.allclose(fft.ift2(f2), a, atol=1e-5)


def test_deterministic():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((64, 64, 64)).astype(np.float32)
    assert np.array_equal(fft.ftn(a), fft.ftn(a.copy()))


def test_stack_of_2d_transforms_equals_each_image_transformed_alone():
    """A stack (run image by image through one plan) gives numpy's values, and the same bits as one image."""
    x = np.random.default_rng(3).normal(size=(5, 64, 80)).astype(np.float32)
    f = fft.rfftn(x, axes=(-2, -1))
    assert f.shape == (5, 64, 41) and f.dtype == np.complex64
    assert np.allclose(f, np.fft.rfft2(x), atol=2e-4)
    assert np.array_equal(f[3], fft.rfftn(x[3]))
    back = fft.irfftn(f, 80, axes=(-2, -1))
    assert back.dtype == np.float32 and np.allclose(back, x, atol=1e-5)


def test_cropped_inverse_transform_equals_the_whole_inverse_then_the_crop():
    """iftn_crop (axis by axis, only the kept rows) against numpy's whole float64 inverse, centred and cropped,
    for even and odd cubes and crops; the input is left alone unless it may be overwritten."""
    rng = np.random.default_rng(5)
    for p, n in ((16, 8), (17, 9), (15, 15), (32, 17), (24, 24)):
        f = fft.ftn(rng.normal(size=(p, p, p)).astype(np.float32))
        whole = np.fft.fftshift(np.fft.irfftn(f.astype(np.complex128), s=(p, p, p), axes=(0, 1, 2)))
        o = p // 2 - n // 2
        ref = whole[o:o + n, o:o + n, o:o + n]
        kept = f.copy()
        got = fft.iftn_crop(f, p, n)
        assert got.dtype == np.float32 and got.shape == (n, n, n)
        assert np.abs(got - ref).max() < 1e-6 * np.abs(ref).max() * p
        assert np.array_equal(f, kept)
        assert np.array_equal(fft.iftn_crop(f, p, n, overwrite_input=True), got)


def test_plane_by_plane_volume_transform_equals_numpy():
    """ftn's plane-by-plane path (cubes of 32 and more) against numpy's float64 transform of the centred cube,
    and iftn back, for even and odd edges."""
    rng = np.random.default_rng(6)
    for n in (32, 33, 48):
        v = rng.normal(size=(n, n, n)).astype(np.float32)
        ref = np.fft.rfftn(np.fft.ifftshift(v.astype(np.float64)))
        got = fft.ftn(v)
        assert got.dtype == np.complex64 and got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-6 * np.abs(ref).max()
        back = fft.iftn(got)
        assert back.dtype == np.float32 and np.abs(back - v).max() < 1e-5


@pytest.mark.parametrize("ny, nx, my, mx", [(4096, 4096, 288, 288), (250, 333, 64, 48), (37, 40, 36, 40),
                                            (64, 64, 64, 64)])
def test_cropped_forward_transform_equals_the_kept_block_of_numpy(ny, nx, my, mx):
    """rfft2_crop (rows in blocks, columns only for the kept kx) against numpy's float64 rfft2, cropped:
    the micrograph binning's transform; row counts not a multiple of the block, odd widths, no crop."""
    a = np.random.default_rng(ny + mx).normal(size=(ny, nx)).astype(np.float32)
    f = np.fft.rfft2(a.astype(np.float64))
    want = np.concatenate([f[: my // 2, : mx // 2 + 1], f[ny - my // 2:, : mx // 2 + 1]])
    got = fft.rfft2_crop(a, (my, mx))
    assert got.shape == (my, mx // 2 + 1) and got.dtype == np.complex64
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()
    fft.use_pyfftw(False)
    try:
        assert np.allclose(fft.rfft2_crop(a, (my, mx)), got, atol=1e-5 * np.abs(want).max())
    finally:
        fft.use_pyfftw(True)
    with pytest.raises(ValueError):
        fft.rfft2_crop(a, (ny + 2, nx))


def test_threads_per_transform_come_from_the_environment():
    """A rank given 2 cores (``OMP_NUM_THREADS=2``, as the job scripts export ``--cpus-per-task``) plans its
    transforms with 2 threads; the values equal numpy's, and the same bits come back on every call."""
    import subprocess
    import sys

    code = ("import numpy as np; from cistem_mpi.kernels import fft; "
            "a = np.random.default_rng(1).normal(size=(96, 128, 64)).astype(np.float32); "
            "x, y = fft.rfftn(a), fft.rfftn(a); ref = np.fft.rfftn(a.astype(np.float64)); "
            "print(fft._threads, np.array_equal(x, y), float(np.abs(x - ref).max() / np.abs(ref).max()) < 1e-5)")
    for env, want in (({"OMP_NUM_THREADS": "2"}, "2 True True"),
                      ({"OMP_NUM_THREADS": "2", "CISTEM_MPI_FFT_THREADS": "1"}, "1 True True"),
                      ({"OMP_NUM_THREADS": "none"}, "1 True True")):
        base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "CISTEM_MPI_FFT_THREADS")}
        r = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == want.split(), (env, r.stdout)
