"""Central-slice projection: real-space reference and RELION's own projections."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cistem_mpi.kernels import fft
from cistem_mpi.kernels.euler import relion_to_cistem, rotation_matrix
from cistem_mpi.kernels.projection import extract_slices, extract_slices_numpy, prepare_volume_ft, project
from cistem_mpi.kernels.resample import fourier_crop
from cistem_mpi.kernels.shifts import phase_shift, shift_image


def _read(path):
    import mrcfile

    with mrcfile.open(str(path), permissive=True) as m:
        return np.asarray(m.data, dtype=np.float32)


def _star_particles(path):
    import starfile

    d = starfile.read(str(path))
    return d["particles"] if isinstance(d, dict) else d


@pytest.fixture(scope="module")
def ribosome(shared_data):
    return _read(shared_data / "aspire" / "clean70SRibosome_vol_65p.mrc")


@pytest.fixture(scope="module")
def ribosome64(ribosome):
    # the 64-box map RELION projected: the 65-box map Fourier-cropped to 64
    return fourier_crop(ribosome, 64)


def _lowpass(a, frac=2 / 3):
    n = a.shape[-1]
    f = fft.ft2(a)
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.rfftfreq(n)[None, :]
    f[..., np.sqrt(kx ** 2 + ky ** 2) > frac * 0.5] = 0
    return fft.ift2(f, nx=n)


def _cc(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _real_space_projection(vol, m):
    """Obvious reference: V(M r) sampled with cubic splines, summed along z."""
    n = vol.shape[0]
    c = n // 2
    z, y, x = np.mgrid[0:n, 0:n, 0:n] - c
    r = np.stack([x.ravel(), y.ravel(), z.ravel()]).astype(np.float64)
    q = m @ r
    rv = ndimage.map_coordinates(vol, [q[2] + c, q[1] + c, q[0] + c], order=3, mode="constant")
    return rv.reshape(n, n, n).sum(0)


@pytest.mark.parametrize("method,min_cc,scale_tol", [("linear", 0.999, 0.01), ("cubic", 0.9995, 0.005),
                                                     ("nearest", 0.95, 0.05)])
@pytest.mark.interop
def test_fourier_slice_matches_real_space_projection(ribosome, method, min_cc, scale_tol):
    for angles in [(30, 50, 70), (-120, 150, 10)]:
        m = rotation_matrix(*angles)
        ref = _lowpass(_real_space_projection(ribosome, m))
        got = _lowpass(project(ribosome, m[None], method=method)[0])
        assert _cc(got, ref) >= min_cc
        assert abs(got.std() / ref.std() - 1) < scale_tol  # same scale (gridding correction)


@pytest.mark.interop
def test_numba_and_numpy_extraction_identical(ribosome):
    vft = prepare_volume_ft(ribosome[:32, :32, :32], 2.0)
    r = rotation_matrix([10, 200, -50], [20, 90, 170], [0, 45, 300])
    a = extract_slices(vft, r)
    b = extract_slices_numpy(vft, r)
    assert np.allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())


@pytest.mark.interop
def test_relion_projections_centered_set(shared_data, ribosome64):
    """RELION 2024 relion_project images: angles carry over unchanged (phi=rot, theta=tilt)."""
    imgs = _read(shared_data / "aspire" / "rln_proj_64_centered.mrcs")
    p = _star_particles(shared_data / "aspire" / "rln_proj_64_centered.star")
    c = relion_to_cistem(p.rlnAngleRot.values, p.rlnAngleTilt.values, p.rlnAnglePsi.values)
    ours = project(ribosome64, rotation_matrix(c["phi"], c["theta"], c["psi"]))
    for a, b in zip(ours, imgs):
        assert _cc(a, b) >= 0.999
        assert abs(a.std() / b.std() - 1) < 0.01
    # the transposed (inverse) rotation is clearly wrong: the test can tell conventions apart
    wrong = project(ribosome64, np.swapaxes(rotation_matrix(c["phi"], c["theta"], c["psi"]), -1, -2))
    assert max(_cc(a, b) for a, b in zip(wrong, imgs)) < 0.6


@pytest.mark.interop
def test_relion_projections_older_set(shared_data, ribosome64):
    imgs = _read(shared_data / "aspire" / "rln_proj_64.mrcs")
    p = _star_particles(shared_data / "aspire" / "rln_proj_64.star")
    ours = project(ribosome64, rotation_matrix(p.rlnAngleRot.values, p.rlnAngleTilt.values, p.rlnAnglePsi.values))
    ccs = [_cc(a, b) for a, b in zip(ours, imgs)]
    # this older set (ASPIRE's copy) matches to ~1 pixel; still far above any wrong convention
    assert min(ccs) >= 0.94


@pytest.mark.interop
def test_shift_sign_proven_on_relion_shifted_set(shared_data, ribosome64):
    """Particle = projection moved by +SHX/pixel with SHX = -rlnOriginX * pixel."""
    imgs = _read(shared_data / "aspire" / "rln_proj_64_shifted.mrcs")
    p = _star_particles(shared_data / "aspire" / "rln_proj_64_shifted.star")
    pix = 1.0  # optics block: 1 A/px; rlnOriginX/Y are pixels in this file
    c = relion_to_cistem(p.rlnAngleRot.values, p.rlnAngleTilt.values, p.rlnAnglePsi.values,
                         p.rlnOriginX.values * pix, p.rlnOriginY.values * pix)
    s = extract_slices(prepare_volume_ft(ribosome64), rotation_matrix(c["phi"], c["theta"], c["psi"]))
    good = fft.ift2(phase_shift(s, c["shx"] / pix, c["shy"] / pix))
    bad = fft.ift2(phase_shift(s, -c["shx"] / pix, -c["shy"] / pix))
    for g, b, img in zip(good, bad, imgs):
        assert _cc(g, img) >= 0.999
        assert _cc(b, img) < 0.2


def test_phase_shift_moves_content_by_plus_dx():
    img = np.zeros((32, 32), np.float32)
    img[16, 16] = 1.0
    moved = shift_image(img, 3.0, -5.0)
    assert np.unravel_index(np.argmax(moved), moved.shape) == (11, 19)  # (y, x)
    half = shift_image(img, 0.5, 0.0)
    assert abs(half[16, 16] - half[16, 17]) < 1e-6  # symmetric between the two pixels


@pytest.mark.interop
def test_max_radius_and_image_size(ribosome64):
    vft = prepare_volume_ft(ribosome64)
    s = extract_slices(vft, rotation_matrix(0, 0, 0)[None], max_radius=10)
    ky = np.fft.fftfreq(64, 1 / 64)[:, None]
    kx = np.arange(33)[None, :]
    assert np.all(s[0][(kx ** 2 + ky ** 2) > 100] == 0)
    # a smaller output box at the same pixel size = the centre of the projection
    from cistem_mpi.kernels.masks import sphere_mask
    from cistem_mpi.kernels.resample import crop_center

    compact = ribosome64 * sphere_mask(64, 13, 4)
    small = extract_slices(prepare_volume_ft(compact), rotation_matrix(0, 0, 0)[None], image_size=32)
    assert small.shape == (1, 32, 17)
    ref = crop_center(compact.sum(0), 32)
    assert _cc(_lowpass(fft.ift2(small)[0]), _lowpass(ref)) > 0.999
