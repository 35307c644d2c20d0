"""Movies: LZW TIFF, MRC and EER, read lazily, integer frames kept integer."""

from __future__ import annotations

import warnings

import imagecodecs
import numpy as np
import pytest
import tifffile

from cistem_mpi.errors import InputError
from cistem_mpi.io.eer import encode_eer_frame
from cistem_mpi.io.movies import (
    EerMovie,
    MrcMovie,
    TiffMovie,
    open_movie,
    write_eer,
    write_eer_events,
    write_mrc_movie,
    write_tiff_movie,
)


@pytest.fixture
def counts():
    rng = np.random.default_rng(1)
    return rng.poisson(1.2, size=(6, 48, 70)).astype(np.uint8)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_lzw_tiff_round_trip(tmp_path, counts, dtype):
    frames = (counts.astype(np.int32) * 300 - (200 if dtype == np.int16 else 0)).astype(dtype) \
        if dtype != np.uint8 else counts
    f = tmp_path / "m.tif"
    assert write_tiff_movie(f, (fr for fr in frames), n_frames=len(frames)) == len(frames)
    with tifffile.TiffFile(f) as tf:  # independent check of the file: LZW, one page per frame
        assert len(tf.pages) == len(frames)
        assert all(p.compression == 5 for p in tf.pages)
        # stored top row first: page k is frame k flipped along y
        np.testing.assert_array_equal(tf.pages[2].asarray(), frames[2][::-1])
    with open_movie(f) as m:
        assert isinstance(m, TiffMovie)
        assert len(m) == len(frames) and m.shape == frames.shape and m.dtype == np.dtype(dtype)
        for k in range(len(frames)):
            got = m[k]
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(got, frames[k])
        np.testing.assert_array_equal(np.stack(list(m)), frames)
        np.testing.assert_array_equal(m[-1], frames[-1])


def test_tiff_written_by_tifffile_is_flipped(tmp_path, counts):
    f = tmp_path / "serialem_like.tif"
    with tifffile.TiffWriter(f) as tw:
        for fr in counts:
            tw.write(fr, compression="lzw", contiguous=False, metadata=None)
    with open_movie(f) as m:
        for k in range(len(counts)):
            np.testing.assert_array_equal(m[k], counts[k][::-1])  # IMOD/cisTEM/RELION orientation


def test_frames_are_read_lazily(tmp_path, counts):
    # corrupt the LZW strip of frame 3 only: frames 0-2 and 4-5 still read; frame 3 fails on access
    f = tmp_path / "m.tif"
    write_tiff_movie(f, counts)
    with tifffile.TiffFile(f) as tf:
        off, cnt = tf.pages[3].dataoffsets[0], tf.pages[3].databytecounts[0]
    raw = bytearray(f.read_bytes())
    raw[off:off + cnt] = b"\xff" * cnt
    f.write_bytes(bytes(raw))
    with open_movie(f) as m:
        np.testing.assert_array_equal(m[0], counts[0])
        np.testing.assert_array_equal(m[5], counts[5])
        with pytest.raises(InputError, match="frame 3"):
            m[3]


def test_real_multipage_tiff(test_data):
    # cylindra 13pf_MT.tif: 36 uncompressed uint8 pages 94 x 206; page 0 top-left 121, bottom-left 130,
    # bottom-right 125; last page top-right 109, bottom-left 109 (read with tifffile)
    with open_movie(test_data / "cylindra/13pf_MT.tif") as m:
        assert (len(m), m.shape, m.dtype) == (36, (36, 206, 94), np.uint8)
        f0, fl = m[0], m[35]
    assert (f0[-1, 0], f0[0, 0], f0[0, -1]) == (121, 130, 125)  # row 0 is the TIFF's bottom row
    assert (fl[-1, -1], fl[0, 0]) == (109, 109)
    assert int(f0.sum()) == 2053894 and int(fl.sum()) == 2050971
    with open_movie(test_data / "cylindra/14pf_MT.tif") as m:
        assert m.shape == (44, 136, 84)
        assert (m[0][-1, 0], m[0][0, 0], m[0][0, -1]) == (75, 146, 116)


def test_tiff_raw_bytes_of_real_file(test_data):
    # uncompressed page 0 starts at byte 704 (single strip): the first stored byte is the top-left pixel
    raw = (test_data / "cylindra/13pf_MT.tif").read_bytes()
    page0 = np.frombuffer(raw, dtype=np.uint8, count=206 * 94, offset=704).reshape(206, 94)
    with open_movie(test_data / "cylindra/13pf_MT.tif") as m:
        np.testing.assert_array_equal(m[0], page0[::-1])


def test_mrc_movie(tmp_path, counts):
    f = tmp_path / "m.mrcs"
    write_mrc_movie(f, counts.astype(np.int8), 1.05)
    with open_movie(f) as m:
        assert isinstance(m, MrcMovie)
        assert m.dtype == np.int8 and len(m) == 6 and m.pixel_size == pytest.approx(1.05)
        np.testing.assert_array_equal(m[4], counts[4])
    g = tmp_path / "u.mrc"
    with pytest.warns(UserWarning, match="uint16"):
        write_mrc_movie(g, iter(counts), 0.8, n_frames=len(counts))
    with open_movie(g) as m:
        assert m.dtype == np.uint16
        np.testing.assert_array_equal(m[0:6], counts.astype(np.uint16))


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, ">i2", np.float32])
def test_mrc_frames_are_read_directly_and_equal_the_map(tmp_path, counts, dtype):
    """Frames come from ``preadv`` into their own array (not copied out of the memory map), with the map's
    values whatever the stored type and byte order (a big-endian int16 file written with mrcfile)."""
    import mrcfile

    f = tmp_path / "m.mrc"
    frames = (counts.astype(np.int32) * 10 - 20).astype(dtype)  # within int8's range; uint16 wraps the negative ones
    if np.dtype(dtype).byteorder == ">":
        with mrcfile.new(f) as m:  # mrcfile keeps the data's byte order and says so in the header
            m.set_data(frames)
    else:
        write_mrc_movie(f, frames, 1.0)
    with open_movie(f) as m:
        got = [m[i] for i in range(len(m))] + [m[-1]]
        assert m._direct.checked is True  # the direct read was checked against the map and is the one used
        for i, g in enumerate(got[:-1]):
            assert g.dtype == m.dtype and g.flags.writeable
            np.testing.assert_array_equal(g, frames[i])
        np.testing.assert_array_equal(got[-1], frames[-1])


def test_mrc_frames_read_directly_stay_out_of_resident_memory(tmp_path):
    """Reading every frame of a 96 MB movie leaves the process's file-backed resident memory about where it
    was (frames copied out of a memory map had put the whole movie there until the movie was closed)."""
    def rss_file_mb() -> float:
        with open("/proc/self/status") as fh:
            return next(int(x.split()[1]) for x in fh if x.startswith("RssFile:")) / 1024.0

    f = tmp_path / "big.mrc"
    frame = np.arange(2048 * 2048, dtype=np.uint16).reshape(2048, 2048)
    write_mrc_movie(f, (frame for _ in range(12)), 1.0, n_frames=12)
    with open_movie(f) as m:
        m[0]  # the check against the map touches one frame
        before = rss_file_mb()
        total = sum(int(m[i][7, 7]) for i in range(len(m)))
        after = rss_file_mb()
    assert total == 12 * int(frame[7, 7])
    assert after - before < 16, (before, after)  # the movie is 96 MB


@pytest.mark.interop  # the whole 33 MB micrograph: not bundled
def test_real_mrc_micrograph_as_movie(shared_data):
    with open_movie(shared_data / "mrcfile/epu2.9_example.mrc") as m:
        assert m.shape == (1, 4096, 4096) and m.dtype == np.uint16
        fr = m[0]
        assert fr.dtype == np.uint16 and fr[0, 0] == 4627 and fr[-1, -1] == 5807  # struct-read values
        assert m.pixel_size == pytest.approx(0.6665513515472412)


def test_tiff_pages_differ_in_size(tmp_path, counts):
    f = tmp_path / "bad.tif"
    with tifffile.TiffWriter(f) as tw:
        tw.write(counts[0], compression="lzw", contiguous=False, metadata=None)
        tw.write(counts[1][:40], compression="lzw", contiguous=False, metadata=None)
    with pytest.raises(InputError) as e:
        open_movie(f)
    assert str(e.value).startswith(str(f)) and "pages differ in size" in str(e.value)


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_tiff(tmp_path, counts, keep):
    f = tmp_path / "full.tif"
    write_tiff_movie(f, counts)
    raw = f.read_bytes()
    t = tmp_path / "trunc.tif"
    t.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(InputError) as e:
        open_movie(t)
    assert str(e.value).startswith(str(t)) and "truncated" in str(e.value)


def test_unknown_movie_format(tmp_path):
    f = tmp_path / "movie.avi"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match="unknown movie format"):
        open_movie(f)


# ----------------------------------------------------------------------------- EER


def _raw_eer_frames(rng, n, shape, p):
    frames = (rng.random((n, *shape)) < p).astype(np.uint8)
    subs = rng.integers(0, 16, size=(n, *shape))
    return frames, subs


@pytest.mark.parametrize("compression", [65000, 65001, 65002])
def test_eer_encoder_against_imagecodecs_decoder(compression):
    rng = np.random.default_rng(compression)
    bits = {65000: (8, 2, 2), 65001: (7, 2, 2), 65002: (7, 2, 2)}[compression]
    for p in (0.0, 0.001, 0.05, 0.6, 1.0):
        frame = (rng.random((40, 64)) < p).astype(np.uint8)
        sub = rng.integers(0, 16, frame.shape)
        data = encode_eer_frame(frame, sub, *bits)
        out = imagecodecs.eer_decode(data, frame.shape, *bits)
        np.testing.assert_array_equal(out.astype(np.uint8), frame)
        # 4x super-resolution: electron of pixel (y, x) with sub-pixel (sx, sy) lands at (4y+sy, 4x+sx)
        out4 = imagecodecs.eer_decode(data, (160, 256), *bits, superres=2)
        yy, xx = np.nonzero(frame)
        s = sub[yy, xx]
        ref = np.zeros((160, 256), bool)
        ref[4 * yy + (s >> 2), 4 * xx + (s & 3)] = True
        np.testing.assert_array_equal(out4, ref)


def test_eer_movie_fractions_and_upsampling(tmp_path):
    rng = np.random.default_rng(2)
    frames, subs = _raw_eer_frames(rng, 12, (32, 48), 0.03)
    f = tmp_path / "m.eer"
    assert write_eer(f, frames, subpixels=subs, pixel_size=0.93) == 12
    with tifffile.TiffFile(f) as tf:  # tifffile recognises and decodes it as EER
        assert tf.is_eer and len(tf.pages) == 12
        np.testing.assert_array_equal(tf.pages[5].asarray().astype(np.uint8), frames[5])
    with open_movie(f, eer_fractions=4) as m:
        assert isinstance(m, EerMovie)
        assert len(m) == 4 and m.shape == (4, 32, 48) and m.dtype == np.uint16 and m.n_raw_frames == 12
        assert m.pixel_size == pytest.approx(0.93)
        for i in range(4):
            np.testing.assert_array_equal(m[i], frames[3 * i: 3 * i + 3].sum(0))
    for up in (2, 4):
        with open_movie(f, eer_fractions=2, eer_upsampling=up) as m:
            assert m.shape == (2, 32 * up, 48 * up) and m.pixel_size == pytest.approx(0.93 / up)
            ref = np.zeros((32 * up, 48 * up), np.uint16)
            for k in range(6, 12):
                yy, xx = np.nonzero(frames[k])
                s = subs[k][yy, xx]
                sx, sy = (s & 3) // (4 // up), (s >> 2) // (4 // up)
                np.add.at(ref, (up * yy + sy, up * xx + sx), 1)
            np.testing.assert_array_equal(m[1], ref)
    with pytest.warns(UserWarning, match="last 2 raw frames"):
        m = open_movie(f, eer_fractions=5)  # 12 // 5 = 2 raw frames per fraction, 2 left over
    with m:
        assert len(m) == 5
        np.testing.assert_array_equal(m[4], frames[8:10].sum(0))


def test_eer_from_super_resolution_events(tmp_path):
    h, w = 16, 20
    xs = np.array([0, 5, 79, 40, 44])  # 4x grid: physical pixels (x//4, y//4) all different
    ys = np.array([0, 1, 63, 10, 10])
    f = tmp_path / "ev.eer"
    write_eer_events(f, (h, w), [(xs, ys), (xs[:2], ys[:2])], compression=65002)
    with open_movie(f, eer_upsampling=4) as m:
        assert len(m) == 2
        img = m[0]
        assert int(img.sum()) == 5 and all(img[y, x] == 1 for x, y in zip(xs, ys))
    with open_movie(f) as m:
        np.testing.assert_array_equal(np.argwhere(m[1]), [[0, 0], [0, 1]])
        np.testing.assert_array_equal(np.argwhere(m[0]), [[0, 0], [0, 1], [2, 10], [2, 11], [15, 19]])
    with pytest.raises(ValueError, match="two electrons on one pixel"):
        write_eer_events(tmp_path / "dup.eer", (h, w), [(np.array([0, 3]), np.array([0, 1]))])


def test_eer_rejects_two_electrons_per_pixel(tmp_path):
    with pytest.raises(ValueError, match="one electron per pixel"):
        write_eer(tmp_path / "x.eer", [np.full((4, 4), 2, np.uint8)])


def test_truncated_eer(tmp_path):
    rng = np.random.default_rng(3)
    frames, _ = _raw_eer_frames(rng, 6, (32, 32), 0.1)
    f = tmp_path / "m.eer"
    write_eer(f, frames, rng=0)
    raw = f.read_bytes()
    t = tmp_path / "t.eer"
    t.write_bytes(raw[: len(raw) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError) as e:
            open_movie(t)
    assert str(e.value).startswith(str(t)) and "truncated" in str(e.value)
