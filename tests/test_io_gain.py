"""Gain references (MRC, TIFF, DM4), orientation, application and defects."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cistem_mpi.errors import InputError
from cistem_mpi.io.gain import (
    apply_gain,
    match_gain_to_frames,
    orient_gain,
    read_gain,
)
from cistem_mpi.io.mrc import write_mrc
from cistem_mpi.io.movies import open_movie, write_tiff_movie


@pytest.fixture
def gain():
    rng = np.random.default_rng(0)
    return rng.uniform(0.8, 1.2, size=(6, 10)).astype(np.float32)


def test_rotation_and_flip_conventions():
    # 2 x 3 image shown with row 0 on top:   a b c
    #                                         d e f
    a = np.array([[1, 2, 3], [4, 5, 6]])
    # 90° clockwise (RELION --gain_rot 1):   d a / e b / f c
    np.testing.assert_array_equal(orient_gain(a, 1), [[4, 1], [5, 2], [6, 3]])
    np.testing.assert_array_equal(orient_gain(a, 2), [[6, 5, 4], [3, 2, 1]])
    np.testing.assert_array_equal(orient_gain(a, 3), [[3, 6], [2, 5], [1, 4]])
    np.testing.assert_array_equal(orient_gain(a, 4), a)
    np.testing.assert_array_equal(orient_gain(a, flip_y=True), [[4, 5, 6], [1, 2, 3]])  # --gain_flip 1
    np.testing.assert_array_equal(orient_gain(a, flip_x=True), [[3, 2, 1], [6, 5, 4]])  # --gain_flip 2
    # rotation first, then flip (RELION/MotionCor2 order)
    np.testing.assert_array_equal(orient_gain(a, 1, flip_y=True), [[6, 3], [5, 2], [4, 1]])


def test_mrc_gain(tmp_path, gain):
    f = tmp_path / "gain.mrc"
    write_mrc(f, gain, 1.0)
    np.testing.assert_array_equal(read_gain(f), gain)
    np.testing.assert_array_equal(read_gain(f, rotate=1, flip_x=True), orient_gain(gain, 1, flip_x=True))
    assert read_gain(f).dtype == np.float32


def test_tiff_gain_matches_tiff_movie_orientation(tmp_path, gain):
    # a TIFF gain written the way a TIFF movie is stored must line up with the movie's frames
    f = tmp_path / "gain.tif"
    tifffile.imwrite(f, gain[::-1])  # TIFF rows are stored top first
    np.testing.assert_array_equal(read_gain(f), gain)
    frames = np.ones((2, 6, 10), np.uint8)
    m = tmp_path / "m.tif"
    write_tiff_movie(m, frames)
    with open_movie(m) as mv:
        np.testing.assert_array_equal(apply_gain(mv[0], read_gain(f)), gain)
    g = tmp_path / "eer.gain"  # EPU's EER gain: a TIFF holding 1/gain
    tifffile.imwrite(g, (1.0 / gain)[::-1])
    np.testing.assert_allclose(read_gain(g, reciprocal=True), gain, rtol=1e-6)


@pytest.mark.interop
def test_real_dm4_gain(shared_data):
    # dmTest_float32_nonSquare: 64 x 128 float32 image at byte 40512 (ncempy's dataOffset), rows 0..127 ramps
    f = shared_data / "openncem_dm/dmTest_float32_nonSquare_diffPixelSize.dm4"
    raw = np.frombuffer(f.read_bytes(), dtype="<f4", count=64 * 128, offset=40512).reshape(64, 128)
    g = read_gain(f)
    assert g.shape == (64, 128) and g.dtype == np.float32
    np.testing.assert_array_equal(g, raw[::-1])  # DM rows are stored top first, like TIFF
    assert (g[0, 0], g[0, 127]) == (0.0, 127.0)
    np.testing.assert_array_equal(read_gain(f, rotate=1), orient_gain(raw[::-1], 1))


@pytest.mark.interop
def test_3d_dm4_refused(shared_data):
    with pytest.raises(InputError, match="must be a 2D image"):
        read_gain(shared_data / "openncem_dm/dmTest_3D_int16_64,65,66.dm4")


def test_apply_gain_keeps_integers_until_applied(gain):
    frame = np.arange(60, dtype=np.uint8).reshape(6, 10)
    out = apply_gain(frame, gain)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, (frame.astype(np.float64) * gain.astype(np.float64)).astype(np.float32))


def test_gain_size_mismatch_names_files(tmp_path, gain):
    frame = np.ones((6, 12), np.uint16)
    with pytest.raises(InputError) as e:
        apply_gain(frame, gain, "gain.dm4", "movie.tif")
    msg = str(e.value)
    assert msg.startswith("gain.dm4:") and "movie.tif" in msg and "10 x 6" in msg and "12 x 6" in msg
    with pytest.raises(InputError, match="rotation would match"):
        match_gain_to_frames(gain, (10, 6), "g.mrc")


def test_super_resolution_gain_is_repeated(gain):
    big = match_gain_to_frames(gain, (24, 40))
    assert big.shape == (24, 40)
    np.testing.assert_array_equal(big[::4, ::4], gain)
    np.testing.assert_array_equal(big[3::4, 1::4], gain)


def test_bad_gain_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_gain(tmp_path / "nope.mrc")
    f = tmp_path / "g.png"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match="unknown gain reference format"):
        read_gain(f)
    z = tmp_path / "zero.mrc"
    write_mrc(z, np.zeros((4, 4), np.float32), 1.0)
    with pytest.raises(InputError, match="no finite positive value"):
        read_gain(z)
