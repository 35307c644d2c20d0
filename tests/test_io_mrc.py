"""MRC reading/writing against values read from the files with ``struct``.

Expected numbers below were read from the raw bytes (header words at their
MRC2014 offsets; data at 1024 + NSYMBT), not through mrcfile or our code.
"""

from __future__ import annotations

import struct
import tracemalloc
import warnings

import numpy as np
import pytest

from cistem_mpi.errors import InputError
from cistem_mpi.io.mrc import MrcStackWriter, open_stack, read_mrc, read_mrc_header, write_mrc

# path: ((nz, ny, nx), mode, header pixel size (cella.x/mx), first value,
#        first value of the last section, last value, header origin)
REAL_MRC = {
    "aspire/clean70SRibosome_vol_65p.mrc": ((65, 65, 65), 2, 0.0, -2.5746061282916344e-07, 0.0, 0.0, (0, 0, 0)),
    "aspire/rln_proj_64.mrcs": ((5, 64, 64), 2, 0.0, -1.6314268577843904e-05, 2.1654061129083857e-05,
                                1.4166133041726425e-05, (0, 0, 0)),
    "aspire/rln_proj_64_centered.mrcs": ((4, 64, 64), 2, 1.0, -3.892802487825975e-05, -1.9475769477139693e-06,
                                         -2.9233776785986265e-06, (0, 0, 0)),
    "aspire/rln_proj_64_shifted.mrcs": ((4, 64, 64), 2, 1.0, -3.7618524402205367e-06, -7.158682819863316e-06,
                                        -2.9029266443103552e-05, (0, 0, 0)),
    "aspire/sample.mrcs": ((17, 200, 200), 2, 0.0, -2.0562593936920166, 1.1231735944747925, 0.008436596021056175,
                           (0, 0, 0)),
    "cryodrgn/ay19102021_L3_position6_ribo_it09_bin8_1.82A.mrcs": ((220, 64, 64), 2, 1.0, 0.009785454720258713,
                                                                  0.26913732290267944, -19.71614646911621, (0, 0, 0)),
    "cryodrgn/empiar_10076_7.mrc": ((7, 320, 320), 2, 0.0, 0.6822134256362915, 0.19411973655223846,
                                    1.2681007385253906, (0, 0, 0)),
    "cryodrgn/relion31.mrcs": ((5, 256, 256), 2, 1.0, 0.28542500734329224, 0.4222806990146637, -0.8011943101882935,
                               (0, 0, 0)),
    "cylindra/beta-tubulin.mrc": ((20, 20, 20), 2, 5.143999862670898, -9.534462385189443e-14,
                                  -5.2624212225262784e-14, 1.6173185013457214e-10, (0, 0, 0)),
    "freehand_atpsynthase/parts.mrcs": ((50, 128, 128), 2, 90.34375, 17.22637939453125, 13.236221313476562,
                                        21.236221313476562, (0, 0, 0)),
    "gemmi/5i55_tiny.ccp4": ((10, 6, 8), 2, 0.49083334604899087, 0.054934993386268616, -0.3296099603176117,
                             -0.2929866313934326, (0, 0, 0)),
    "mrcfile/EMD-3001.map": ((25, 43, 73), 2, 0.44825000762939454, 0.04283447191119194, 0.04283447191119194,
                             0.06724497675895691, (0, 0, 0)),
    "mrcfile/emd_3001.map.gz": ((25, 43, 73), 2, 0.44825000762939454, 0.04283447191119194, 0.04283447191119194,
                                0.06724497675895691, (0, 0, 0)),
    "mrcfile/EMD-3197.map": ((20, 20, 20), 2, 11.4, -1.8013091087341309, -1.6560980081558228, 1.3078573942184448,
                             (0, 0, 0)),
    "mrcfile/epu2.9_example.mrc": ((1, 4096, 4096), 6, 0.6665513515472412, 4627, 4627, 5807, (0, 0, 0)),
    "mrcfile/fei-extended.mrc": ((1, 3838, 3710), 6, 0.8537754932825135, 2811, 2811, 4146, (0, 0, 0)),
    "relion_tests/out_it000_class001.mrc": ((100, 100, 100), 2, 3.5400021362304686, -3.4042516290355707e-06,
                                            -3.326708792883437e-06, -3.2107573133544065e-06, (0, 0, 0)),
    "relion_tests/out_it005_class001.mrc": ((100, 100, 100), 2, 3.5400021362304686, 0.0, 0.0, 0.0, (0, 0, 0)),
    "relion_tests/ref_3D_ctf.mrc": ((1, 32, 17), 2, 0.0, 0.10000000149011612, 0.10000000149011612,
                                    -0.9566501379013062, (0, 0, 0)),
    "relion_tests/ref_model.mrc": ((100, 100, 100), 2, 3.54, 4.886645683654933e-07, 4.4015916955686407e-07,
                                   3.616677588524908e-07, (-3.54, -3.54, -3.54)),
    "relion_tests/ref_shifted_image.mrc": ((1, 32, 32), 2, 0.0, 0.09115605056285858, 0.09115605056285858,
                                           0.11860761046409607, (0, 0, 0)),
}


#: Bundled in tests/data (BSD-3 / CC0); the others (GPL, unclear licence, or > 5 MB) are
#: interop tests, read from the shared data directory.
BUNDLED_MRC = {"cylindra/beta-tubulin.mrc", "mrcfile/EMD-3001.map", "mrcfile/emd_3001.map.gz",
               "mrcfile/EMD-3197.map"}


@pytest.mark.parametrize("name", [n if n in BUNDLED_MRC else pytest.param(n, marks=pytest.mark.interop)
                                  for n in sorted(REAL_MRC)])
def test_real_mrc_header_and_values(real_data, name):
    shape, mode, ps, first, last_first, last, origin = REAL_MRC[name]
    path = real_data / name
    hdr = read_mrc_header(path)
    assert hdr.shape == shape
    assert hdr.mode == mode
    assert hdr.header_pixel_size == pytest.approx(ps, rel=1e-6, abs=1e-9)
    assert hdr.origin == pytest.approx(origin, abs=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # several of these have unset (0/1) pixel sizes
        with open_stack(path, pixel_size=1.5) as st:
            assert st.shape == shape
            assert len(st) == shape[0]
            assert st.pixel_size == 1.5
            img0, imgl = st[0], st[-1]
    assert img0.dtype == np.float32 and img0.shape == shape[1:]
    assert img0.ravel()[0] == np.float32(first)
    assert imgl.ravel()[0] == np.float32(last_first)
    assert imgl.ravel()[-1] == np.float32(last)


def test_fei_extended_headers(test_data):
    # FEI2 (EPU 2.9) and FEI1: HT (V, double at ext+84), Dose (e/m², ext+92), Pixel size X (m, ext+156)
    # *_row0.mrc: the real files' header and extended header, with their first image row only
    h2 = read_mrc_header(test_data / "mrcfile/epu2.9_example_row0.mrc")
    assert h2.exttyp == "FEI2"
    assert h2.extended["voltage"] == pytest.approx(300.0)
    assert h2.extended["pixel_size"] == pytest.approx(6.66551328021292e-11 * 1e10, rel=1e-9)
    assert h2.extended["dose"] == pytest.approx(4.1171286962508493e21 * 1e-20, rel=1e-9)
    assert h2.dtype == np.uint16
    h1 = read_mrc_header(test_data / "mrcfile/fei-extended_row0.mrc")
    assert h1.exttyp == "FEI1"
    assert h1.extended["voltage"] == pytest.approx(300.0)
    assert h1.extended["pixel_size"] == pytest.approx(8.537755225024313e-11 * 1e10, rel=1e-9)
    assert h1.extended["dose"] == pytest.approx(4.762483899112247e21 * 1e-20, rel=1e-9)


def test_fei_pixel_size_used_when_main_header_unset(tmp_path, test_data):
    # copy the FEI2 header + extended header, zero the main header's cella: the FEI value must be used
    raw = bytearray((test_data / "mrcfile/epu2.9_example_row0.mrc").read_bytes())
    raw[40:52] = struct.pack("<3f", 0.0, 0.0, 0.0)
    f = tmp_path / "fei_unset.mrc"
    f.write_bytes(bytes(raw))
    assert read_mrc_header(f).pixel_size == pytest.approx(0.666551328021292, rel=1e-9)


def test_axis_order_reordered_to_zyx(test_data):
    # EMD-3001: MAPC, MAPR, MAPS = 3, 1, 2 -> columns are Z, rows X, sections Y.
    # raw floats #0, #1, #73 and #43*73 (struct) land at [0,0,0], [1,0,0], [0,0,1], [0,1,0]
    with pytest.warns(UserWarning, match="differs in x and y"):  # anisotropic MicroED map
        data, ps = read_mrc(test_data / "mrcfile/EMD-3001.map")
    assert data.shape == (73, 25, 43)
    assert ps == pytest.approx(0.44825000762939454, rel=1e-6)
    assert data[0, 0, 0] == np.float32(0.04283447191119194)
    assert data[1, 0, 0] == np.float32(0.02694716304540634)
    assert data[0, 0, 1] == np.float32(0.03755688667297363)
    assert data[0, 1, 0] == np.float32(-0.0055164373479783535)
    gz, _ = read_mrc(test_data / "mrcfile/emd_3001.map.gz", pixel_size=0.44825)
    np.testing.assert_array_equal(gz, data)


@pytest.mark.interop
def test_axis_order_2_1_3_reordered_to_zyx(shared_data):
    # 5i55_tiny: MAPC, MAPR, MAPS = 2, 1, 3 -> raw #1 is y=1, raw #8 is x=1
    tiny, _ = read_mrc(shared_data / "gemmi/5i55_tiny.ccp4", pixel_size=0.49083334)
    assert tiny.shape == (10, 8, 6)
    assert tiny[0, 1, 0] == np.float32(0.01831166446208954)
    assert tiny[0, 0, 1] == np.float32(-0.09155832231044769)


@pytest.mark.interop
def test_pixel_size_rules_unset_headers(shared_data):
    f1 = shared_data / "cryodrgn/relion31.mrcs"  # header says 1 (unset); true 2.806
    with pytest.warns(UserWarning, match="unset"):
        _, ps = read_mrc(f1, pixel_size=2.806)
    assert ps == 2.806
    with pytest.warns(UserWarning, match="unset"):
        _, ps = read_mrc(shared_data / "relion_tests/ref_shifted_image.mrc")  # header 0, nothing given
    assert ps == 0.0


def test_pixel_size_rules(test_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real header value and no user value: silent
        _, ps = read_mrc(test_data / "cylindra/beta-tubulin.mrc")
    assert ps == pytest.approx(5.144, rel=1e-6)
    with pytest.warns(UserWarning, match="differs"):
        _, ps = read_mrc(test_data / "cylindra/beta-tubulin.mrc", pixel_size=5.0)
    assert ps == 5.0


@pytest.mark.interop
def test_anisotropic_header_warns(shared_data):
    # FreeHand parts.mrcs: cell/mx = 90.34375 but cell/my = 107.25 (scanner values, not a pixel size)
    with pytest.warns(UserWarning, match="differs in x and y"):
        with open_stack(shared_data / "freehand_atpsynthase/parts.mrcs") as st:
            assert st.pixel_size == 90.34375
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_stack(shared_data / "freehand_atpsynthase/parts.mrcs", pixel_size=5.0) as st:
            assert st.pixel_size == 5.0
    # the user's value replaces the header's (said once); no x/y complaint then
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "header pixel size 90.3438 Å differs from the given 5 Å; using 5 Å"]


def _raw_header(path):
    raw = path.read_bytes()
    nx, ny, nz, mode = struct.unpack("<4i", raw[0:16])
    mx = struct.unpack("<i", raw[28:32])[0]
    cella_x = struct.unpack("<f", raw[40:44])[0]
    dmin, dmax, dmean = struct.unpack("<3f", raw[76:88])
    ispg = struct.unpack("<i", raw[88:92])[0]
    nsymbt = struct.unpack("<i", raw[92:96])[0]
    origin = struct.unpack("<3f", raw[196:208])
    rms = struct.unpack("<f", raw[216:220])[0]
    return dict(shape=(nz, ny, nx), mode=mode, ps=cella_x / mx, dmin=dmin, dmax=dmax, dmean=dmean, ispg=ispg,
                origin=origin, rms=rms, data_offset=1024 + nsymbt, raw=raw)


def test_write_mrc_header_and_data(tmp_path):
    rng = np.random.default_rng(3)
    vol = rng.normal(2.0, 3.0, size=(6, 10, 12)).astype(np.float32)
    f = tmp_path / "vol.mrc"
    write_mrc(f, vol, 1.25, origin=(10.0, -20.0, 30.5))
    h = _raw_header(f)
    assert h["shape"] == (6, 10, 12) and h["mode"] == 2 and h["ispg"] == 1
    assert h["ps"] == pytest.approx(1.25)
    assert h["origin"] == pytest.approx((10.0, -20.0, 30.5))
    assert h["dmin"] == pytest.approx(vol.min()) and h["dmax"] == pytest.approx(vol.max())
    assert h["dmean"] == pytest.approx(vol.mean(dtype=np.float64), rel=1e-5)
    assert h["rms"] == pytest.approx(vol.std(dtype=np.float64), rel=1e-5)
    data = np.frombuffer(h["raw"], dtype="<f4", count=vol.size, offset=h["data_offset"]).reshape(vol.shape)
    np.testing.assert_array_equal(data, vol)
    back, ps = read_mrc(f)
    np.testing.assert_array_equal(back, vol)
    assert ps == pytest.approx(1.25)
    # a stack: .mrcs -> ispg 0; 2D image stays 2D
    write_mrc(tmp_path / "st.mrcs", vol, 2.0)
    assert _raw_header(tmp_path / "st.mrcs")["ispg"] == 0
    write_mrc(tmp_path / "img.mrc", vol[0], 2.0)
    img, _ = read_mrc(tmp_path / "img.mrc")
    assert img.shape == (10, 12)


@pytest.mark.parametrize("dtype,mode", [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6),
                                        (np.float16, 12)])
def test_modes_round_trip(tmp_path, dtype, mode):
    rng = np.random.default_rng(mode)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        a = rng.integers(info.min, info.max, size=(3, 8, 9), endpoint=True).astype(dtype)
    else:
        a = rng.normal(size=(3, 8, 9)).astype(dtype)
    f = tmp_path / f"m{mode}.mrcs"
    write_mrc(f, a, 1.0, dtype=dtype)
    h = _raw_header(f)
    assert h["mode"] == mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open_stack(f) as st:
            assert st.dtype == np.dtype(dtype)
            got = st[0:3]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, a.astype(np.float32))


def test_stack_writer_complete(tmp_path):
    rng = np.random.default_rng(8)
    imgs = rng.normal(1.0, 2.0, size=(7, 12, 10)).astype(np.float32)
    f = tmp_path / "w.mrcs"
    with MrcStackWriter(f, (12, 10), 7, 0.9) as w:
        for img in imgs[:3]:
            w.append(img)
        w.write(5, imgs[5])
        w.write(3, imgs[3])
        w.write(4, imgs[4])
        w.write(6, imgs[0])
        w.write(6, imgs[6])  # rewritten: statistics recomputed from the file
        assert w.complete
        with pytest.raises(IndexError):
            w.append(imgs[0])
    h = _raw_header(f)
    assert h["shape"] == (7, 12, 10) and h["ispg"] == 0 and h["ps"] == pytest.approx(0.9)
    data = np.frombuffer(h["raw"], dtype="<f4", count=imgs.size, offset=h["data_offset"]).reshape(imgs.shape)
    np.testing.assert_array_equal(data, imgs)
    assert h["dmin"] == pytest.approx(imgs.min()) and h["dmax"] == pytest.approx(imgs.max())
    assert h["dmean"] == pytest.approx(imgs.mean(dtype=np.float64), rel=1e-6)
    assert h["rms"] == pytest.approx(imgs.std(dtype=np.float64), rel=1e-6)


def test_stack_writer_partial_stats_count_zeros(tmp_path):
    imgs = np.full((4, 5, 6), 3.0, dtype=np.float32)
    f = tmp_path / "p.mrcs"
    with MrcStackWriter(f, (5, 6), 4, 1.0) as w:
        w.write(0, imgs[0])
        w.write(2, imgs[2])
        assert not w.complete
    h = _raw_header(f)
    assert h["dmin"] == 0.0 and h["dmax"] == 3.0
    assert h["dmean"] == pytest.approx(1.5)  # half the pixels are 3, half 0


def test_big_stack_is_never_read_whole(tmp_path):
    # 1 GiB stack, written sparsely; reading single images must hold only those images
    n, ny, nx = 4096, 256, 256
    f = tmp_path / "big.mrcs"
    marker = np.arange(ny * nx, dtype=np.float32).reshape(ny, nx)
    with MrcStackWriter(f, (ny, nx), n, 1.0) as w:
        w.write(n - 1, marker)
        w.write(n // 2, -marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracemalloc.start()
        try:
            with open_stack(f, pixel_size=1.0) as st:
                assert len(st) == n
                last = st[n - 1]
                mid = st[n // 2]
                zero = st[7]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(last, marker)
    np.testing.assert_array_equal(mid, -marker)
    assert not zero.any()
    assert peak < 16 * ny * nx * 4  # a few images, not 1 GiB


def test_truncated_and_bad_files(tmp_path):
    a = np.ones((3, 8, 8), np.float32)
    good = tmp_path / "good.mrcs"
    write_mrc(good, a, 1.0)
    raw = good.read_bytes()
    bad = tmp_path / "trunc.mrcs"
    bad.write_bytes(raw[:-50])
    for fn in (read_mrc, open_stack, read_mrc_header):
        with pytest.raises(InputError) as e:
            fn(bad)
        assert "trunc.mrcs" in str(e.value) and "truncated" in str(e.value)
        assert str(e.value).count("\n") == 0
    with pytest.raises(InputError, match="not found"):
        read_mrc(tmp_path / "missing.mrc")
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(b"hello")
    with pytest.raises(InputError, match="junk.mrc"):
        read_mrc(junk)
    # an unknown mode
    raw_mode = bytearray(raw)
    raw_mode[12:16] = struct.pack("<i", 7)
    m7 = tmp_path / "mode7.mrc"
    m7.write_bytes(bytes(raw_mode))
    with pytest.raises(InputError, match="mode7.mrc"):
        read_mrc(m7)


def test_stack_writer_blocks_out_of_order_give_the_stack_and_its_statistics(tmp_path):
    import mrcfile

    from cistem_mpi.io.mrc import MrcStackWriter

    rng = np.random.default_rng(4)
    data = (rng.normal(size=(7, 12, 10)) * 3 + 1).astype(np.float32)
    path = tmp_path / "blocks.mrcs"
    with MrcStackWriter(path, (12, 10), 7, 1.5) as w:
        w.write_block(4, data[4:])  # the order workers' results arrive in
        w.write_block(0, data[:4])
        assert w.complete
    with mrcfile.open(path) as m:
        np.testing.assert_array_equal(m.data, data)
        h = m.header
        assert float(h.dmin) == data.min() and float(h.dmax) == data.max()
        assert float(h.dmean) == pytest.approx(data.astype(np.float64).mean(), rel=1e-6)
        assert float(h.rms) == pytest.approx(data.astype(np.float64).std(), rel=1e-6)
    with pytest.raises(IndexError):
        with MrcStackWriter(tmp_path / "x.mrcs", (12, 10), 3, 1.0) as w:
            w.write_block(2, data[:2])


def test_stack_chunks_read_from_the_file_equal_the_memory_map(tmp_path):
    """ImageStack reads runs of consecutive images of a float32 stack with one preadv each, scattered ones
    through the memory map: the same values either way, for runs, repeats, negative indices, steps, empty."""
    from cistem_mpi.io.mrc import open_stack, write_mrc

    a = np.random.default_rng(0).normal(size=(50, 12, 10)).astype(np.float32)
    write_mrc(tmp_path / "s.mrcs", a, 2.0)
    with open_stack(tmp_path / "s.mrcs", pixel_size=2.0) as st:
        for index in (np.arange(50), np.array([5, 6, 7, 40, 3, 3, -1]), slice(10, 48, 3), slice(45, None),
                      np.array([], dtype=np.int64), [2, 1, 0]):
            assert np.array_equal(st[index], a[index])
        assert st._direct.checked is True  # the direct path ran (and agreed with the map)
        with pytest.raises(IndexError):
            st[np.array([50])]
