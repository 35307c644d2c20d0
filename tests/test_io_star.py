"""STAR files: every real particle STAR in tests/data and shared/data, conversions, round trips.

Expected values were read by eye from the files' text (columns named in the
comments); none come from our reader.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from cistem_mpi.errors import InputError
from cistem_mpi.io.par import read_par, write_par
from cistem_mpi.io.params import PAR_COLUMNS, Optics, ParticleSet, empty_params
from cistem_mpi.io.star import detect_star_flavour, read_star, write_cistem_star, write_relion_star


#: Files under GPL or unclear licences are read from the shared data directory (interop tests);
#: the BSD-3 starfile ones are bundled in tests/data.
INTEROP = pytest.mark.interop


def _read(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_star(path, **kw)


@pytest.mark.interop
def test_relion31_star(shared_data):
    s = _read(shared_data / "cryodrgn/relion31.star")
    assert len(s) == 5 and len(s.optics) == 1
    o = s.optics[0]
    # optics row: 1 opticsGroup1 0.100000 0.010000 300.000000 2.806000 1.403000 256 2
    assert (o.pixel_size, o.voltage, o.cs, o.amplitude_contrast, o.name) == (2.806, 300.0, 0.01, 0.1, "opticsGroup1")
    assert o.extra["rlnImageSize"] == 256 and o.extra["rlnMicrographOriginalPixelSize"] == 1.403
    r = s.params[0]
    # DefocusU/V/Angle 13108.082418 12845.582418 -160.39; Rot/Tilt/Psi -102.30296 82.318041 124.706463;
    # OriginXAngst/YAngst 0.019324 -0.64686
    assert r["position"] == 1
    assert (r["phi"], r["theta"], r["psi"]) == pytest.approx((-102.30296, 82.318041, 124.706463), abs=1e-4)
    assert (r["shx"], r["shy"]) == pytest.approx((-0.019324, 0.64686), abs=1e-6)
    assert (r["df1"], r["df2"], r["angast"]) == pytest.approx((13108.082418, 12845.582418, -160.39), abs=1e-3)
    assert r["pshift"] == 0.0 and r["film"] == 1 and r["occ"] == 100.0
    last = s.params[-1]  # ... 162.855018 84.493794 140.014019 ... -0.33773 0.385262
    assert (last["phi"], last["theta"], last["psi"]) == pytest.approx((162.855018, 84.493794, 140.014019), abs=1e-4)
    assert (last["shx"], last["shy"]) == pytest.approx((0.33773, -0.385262), abs=1e-6)
    assert s.image_names[0] == "000001@relion31.mrcs"
    assert s.extra["rlnCoordinateX"][0] == 3277.0
    assert detect_star_flavour(shared_data / "cryodrgn/relion31.star") == "relion3.1"


@pytest.mark.interop
def test_block_order_does_not_matter(shared_data):
    a = _read(shared_data / "cryodrgn/relion31.star")
    b = _read(shared_data / "cryodrgn/relion31.v2.star")  # data_particles before data_optics
    for c in PAR_COLUMNS:
        np.testing.assert_array_equal(a.params[c], b.params[c])
    assert a.optics[0].pixel_size == b.optics[0].pixel_size == 2.806


@pytest.mark.interop
def test_six_optics_groups(shared_data):
    s = _read(shared_data / "cryodrgn/relion31.6opticsgroups.star")
    assert len(s) == 139 and len(s.optics) == 6
    # group numbers in the file are 1..6 with names not in number order ("1 opticsGroup5", "4 opticsGroup1")
    by_number = {o.extra["rlnOpticsGroup"]: o for o in s.optics}
    assert by_number[1].name == "opticsGroup5" and by_number[4].name == "opticsGroup1"
    assert by_number[4].cs == 2.6 and by_number[2].pixel_size == 1.24
    # first particle: optics group 6 (1.25 Å), OriginXAngst 13.284554, Rot -128.10516
    assert s.optics[s.optics_group[0]].extra["rlnOpticsGroup"] == 6
    assert s.pixel_sizes()[0] == pytest.approx(1.25)
    assert s.params[0]["shx"] == pytest.approx(-13.284554, abs=1e-5)
    assert s.params[0]["phi"] == pytest.approx(-128.10516, abs=1e-4)
    assert s.params[0]["position"] == 3  # "3@Polish/job520/..."
    # last particle: group 4 (1.24 Å), position 183
    assert s.optics[s.optics_group[-1]].extra["rlnOpticsGroup"] == 4 and s.params[-1]["position"] == 183
    # RELION 5-style arrays in a 3.1 file: OddZernike of group 1 starts 1.70554063513
    assert s.optics[0].extra["rlnOddZernike"][0] == pytest.approx(1.70554063513)


@pytest.mark.interop
def test_relion5_arrays(shared_data):
    s = _read(shared_data / "cryodrgn/relion5.star")
    assert len(s) == 17
    o = s.optics[0]
    assert (o.pixel_size, o.voltage, o.cs, o.amplitude_contrast) == (0.89, 100.0, 1.6, 0.1)
    odd, even = o.extra["rlnOddZernike"], o.extra["rlnEvenZernike"]
    assert isinstance(odd, np.ndarray) and odd.shape == (6,) and even.shape == (9,)
    assert odd[2] == pytest.approx(-1.79877045848) and even[-1] == pytest.approx(-5.07283733403)
    assert o.extra["rlnMagMat01"] == pytest.approx(-7.04404e-04)
    r = s.params[0]  # Psi 141.158035, Rot 111.508618, Tilt 36.742536, OriginXAngst -3.12578, YAngst -1.41031
    assert (r["phi"], r["theta"], r["psi"]) == pytest.approx((111.508618, 36.742536, 141.158035), abs=1e-4)
    assert (r["shx"], r["shy"]) == pytest.approx((3.12578, 1.41031), abs=1e-6)
    assert s.params[-1]["position"] == 6  # "6@toy_images_b.mrcs"


@pytest.mark.interop
def test_relion30_pixels_and_magnification(shared_data):
    # PfCRT: RELION 3.0.6 data_images, DetectorPixelSize 1.035 µm / Mag 10000 -> 1.035 Å; OriginX/Y in pixels
    s = _read(shared_data / "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star")
    assert len(s) == 5 and s.optics[0].pixel_size == pytest.approx(1.035)
    assert s.optics[0].cs == 0.001 and s.optics[0].voltage == 300.0
    r = s.params[0]  # Psi 98.225690 Rot 16.093530 Tilt 86.352776 ... OriginX -0.14063 OriginY -0.04688
    assert (r["psi"], r["phi"], r["theta"]) == pytest.approx((98.22569, 16.09353, 86.352776), abs=1e-4)
    assert (r["shx"], r["shy"]) == pytest.approx((0.14063 * 1.035, 0.04688 * 1.035), abs=1e-6)
    assert r["mag"] == 10000.0
    assert detect_star_flavour(shared_data / "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star") == "relion3.0"


@pytest.mark.interop
def test_relion1_ap_s_c2d(shared_data):
    s = _read(shared_data / "relion_tests/ap_s_c2d.star")
    assert len(s) == 8915 and len(s.optics) == 1
    assert s.optics[0].pixel_size == pytest.approx(14.0 * 1e4 / 39548.0)  # DetectorPixelSize 14, Mag 39548
    assert (s.optics[0].voltage, s.optics[0].cs, s.optics[0].amplitude_contrast) == (300.0, 2.0, 0.1)
    # first row: DefocusU 33863.558594 ... 000009@... OriginX -0.032335? no: OriginX 0.967665 OriginY -0.032335
    r = s.params[0]
    assert r["position"] == 9
    assert r["df1"] == pytest.approx(33863.558594, abs=1e-3) and r["angast"] == pytest.approx(36.07, abs=1e-4)
    px = 14.0 * 1e4 / 39548.0
    assert (r["shx"], r["shy"]) == pytest.approx((-0.967665 * px, 0.032335 * px), abs=1e-5)
    assert r["psi"] == pytest.approx(-155.161676, abs=1e-4)
    # last row: 000674@..., DefocusU 33544.050781, OriginX 4.967665, OriginY 0.967665, Psi 59.838324
    last = s.params[-1]
    assert last["position"] == 674 and last["df1"] == pytest.approx(33544.050781, abs=1e-3)
    assert (last["shx"], last["shy"]) == pytest.approx((-4.967665 * px, -0.967665 * px), abs=1e-5)
    assert last["psi"] == pytest.approx(59.838324, abs=1e-4)


@pytest.mark.parametrize(
    "name,n,pixel,first_psi",
    [
        pytest.param("cryodrgn/empiar_10076_7.star", 7, 5 * 1e4 / 38168, 0.0, marks=INTEROP),
        pytest.param("cryodrgn/sta_testing_bin8.star", 219, 1.96, -95.35435, marks=INTEROP),
        pytest.param("cryodrgn/sta_testing.star", 219, 1.96, -95.35435, marks=INTEROP),
        pytest.param("aspire/sample_relion_data.star", 17, 5 * 1e4 / 37369.2, None, marks=INTEROP),
        pytest.param("aspire/sample_particles_relion30.star", 17, 5 * 1e4 / 37369.2, None, marks=INTEROP),
        pytest.param("aspire/sample_relion_one_image.star", 1, 5 * 1e4 / 37369.2, None, marks=INTEROP),
        pytest.param("aspire/sample_relion_symmetry_group_D4.star", 17, 5 * 1e4 / 37369.2, None, marks=INTEROP),
        pytest.param("aspire/sample_particles_relion31.star", 17, 1.4, None, marks=INTEROP),
        pytest.param("aspire/rln_proj_64_centered.star", 4, 1.0, None, marks=INTEROP),
        pytest.param("relion_tests/ap_s_c2d_red.star", 9, 14 * 1e4 / 39548, -155.161676, marks=INTEROP),
        pytest.param("relion_tests/out_it005_data.star", 9, 14 * 1e4 / 39548, None, marks=INTEROP),
        pytest.param("em-testdata/particles_1k.star", 1000, 1.36793, 0.0, marks=INTEROP),
        pytest.param("em-testdata/run_it025_data.star", 4786, 3.54, -53.06426, marks=INTEROP),
        ("starfile/one_loop.star", 16, 5.0, None),
    ],
)
def test_real_particle_stars(real_data, name, n, pixel, first_psi):
    s = _read(real_data / name)
    assert len(s) == n
    assert s.pixel_sizes()[0] == pytest.approx(pixel, rel=1e-6)
    if first_psi is not None:
        assert s.params[0]["psi"] == pytest.approx(first_psi, abs=1e-4)


@pytest.mark.interop
def test_sta_last_row(shared_data):
    # last line: ... 21336.0 20843.6 -5.8 000219@... Rot -55.24480 Tilt 33.46104 Psi 107.80600
    s = _read(shared_data / "cryodrgn/sta_testing_bin8.star")
    r = s.params[-1]
    assert r["position"] == 219
    assert (r["df1"], r["df2"], r["angast"]) == pytest.approx((21336.0, 20843.6, -5.8), abs=1e-3)
    assert (r["phi"], r["theta"], r["psi"]) == pytest.approx((-55.2448, 33.46104, 107.806), abs=1e-4)
    assert s.extra["rlnCtfBfactor"][-1] == -312.0


@pytest.mark.interop
def test_shifted_projection_origins_in_pixels_with_optics(shared_data):
    # rln_proj_64_shifted.star: optics 1 Å/px; rlnOriginX/Y (px) = (6, 10), (10, -5), (-8, 11), (-13, -3)
    s = _read(shared_data / "aspire/rln_proj_64_shifted.star")
    np.testing.assert_allclose(s.params["shx"], [-6, -10, 8, 13])
    np.testing.assert_allclose(s.params["shy"], [-10, 5, -11, 3])


@pytest.mark.parametrize("name", [pytest.param("relion_tests/out_it005_model.star", marks=INTEROP),
                                  "starfile/postprocess.star",
                                  pytest.param("em-testdata/default_pipeline.star", marks=INTEROP),
                                  pytest.param("em-testdata/micrographs_ctf.star", marks=INTEROP),
                                  pytest.param("aspire/run_001_it025_optimiser.star", marks=INTEROP)])
def test_non_particle_stars_are_refused(real_data, name):
    with pytest.raises(InputError, match="no particle table"):
        read_star(real_data / name)


@pytest.mark.interop
def test_missing_ctf_value_warns(shared_data):
    with pytest.warns(UserWarning, match="rlnVoltage missing"):
        s = read_star(shared_data / "aspire/sample_incomplete_ctf_params.star")
    assert s.optics[0].voltage == 300.0


@pytest.mark.interop
def test_user_pixel_size_replaces_file_value(shared_data):
    with pytest.warns(UserWarning, match="replaced"):
        s = read_star(shared_data / "cryodrgn/relion31.star", pixel_size=1.4)
    assert s.optics[0].pixel_size == 1.4


def _star(tmp_path, text, name="x.star"):
    f = tmp_path / name
    f.write_text(text)
    return f


def test_explicit_unit_conversions(tmp_path):
    f = _star(tmp_path, """data_
loop_
_rlnImageName
_rlnAngleRot
_rlnAngleTilt
_rlnAnglePsi
_rlnOriginX
_rlnOriginY
_rlnDefocusU
_rlnDefocusV
_rlnDefocusAngle
_rlnPhaseShift
_rlnVoltage
_rlnSphericalAberration
_rlnAmplitudeContrast
_rlnMagnification
_rlnDetectorPixelSize
12@s.mrcs 10 20 30 1.5 -2.5 20000 19000 45 90 300 2.7 0.1 50000 10
""")
    s = read_star(f)
    r = s.params[0]
    assert s.optics[0].pixel_size == pytest.approx(2.0)  # 10 µm * 1e4 / 50000
    assert (r["position"], r["phi"], r["theta"], r["psi"]) == (12, 10, 20, 30)
    assert (r["shx"], r["shy"]) == pytest.approx((-3.0, 5.0))  # -origin(px) * 2 Å
    assert r["pshift"] == pytest.approx(math.pi / 2)  # degrees -> radians
    assert (r["df1"], r["df2"], r["angast"]) == (20000, 19000, 45)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("data_\nloop_\n_rlnImageName\n_rlnDefocusU\n1@a.mrcs 10000\n", "_rlnDefocusV missing"),
        ("data_\nloop_\n_rlnImageName\n_rlnOriginX\n_rlnAngleRot\n1@a.mrcs 2 3\n", "_rlnOriginY missing"),
        ("data_\nloop_\n_rlnImageName\n_rlnOriginX\n_rlnOriginY\n1@a.mrcs 2 3\n", "pixel size is unknown"),
        ("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n1 1.0\n\ndata_particles\nloop_\n_rlnImageName\n"
         "_rlnOpticsGroup\n1@a.mrcs 2\n", "optics group(s) [2] not in data_optics"),
        ("data_\nloop_\n_rlnImageName\n_rlnAngleRot\n1@a.mrcs abc\n", "_rlnAngleRot in row 1 is 'abc'"),
    ],
)
def test_bad_stars_name_file_and_problem(tmp_path, text, fragment):
    f = _star(tmp_path, text, "bad.star")
    with pytest.raises(InputError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_star(f)
    assert str(e.value).startswith(str(f)) and fragment in str(e.value), str(e.value)


@pytest.mark.interop
def test_required_column(tmp_path, shared_data):
    with pytest.raises(InputError, match=r"_rlnAngleRot missing in data_particles"):
        read_star(shared_data / "em-testdata/particles_1k.star", required=["rlnAngleRot"])


def _diverse_params(n=40, seed=5):
    rng = np.random.default_rng(seed)
    p = empty_params(n)
    p["position"] = rng.permutation(np.arange(1, 10 * n))[:n]
    p["psi"], p["phi"] = rng.uniform(-180, 360, (2, n)).round(2)
    p["theta"] = rng.uniform(0, 180, n).round(2)
    p["shx"], p["shy"] = rng.uniform(-80, 80, (2, n)).round(2)
    p["mag"] = rng.choice([0, 10000, 38168], n)
    p["film"] = rng.integers(-3, 30, n)
    p["df1"], p["df2"] = rng.uniform(5000, 45000, (2, n)).round(1)
    p["angast"] = rng.uniform(-90, 90, n).round(2)
    p["pshift"] = rng.uniform(0, 3.14, n).round(2)
    p["occ"] = rng.uniform(0, 100, n).round(2)
    p["logp"] = rng.integers(-10**6, 10**6, n)
    p["sigma"] = rng.uniform(0.5, 20, n).round(4)
    p["score"], p["change"] = rng.uniform(-10, 60, (2, n)).round(2)
    return p


@pytest.mark.parametrize("fmt", ["cistem", "relion3.1", "relion3.0"])
def test_par_star_par_round_trip_keeps_every_value(tmp_path, fmt):
    par1 = tmp_path / "in.par"
    write_par(par1, _diverse_params())
    ps = ParticleSet(params=read_par(par1), optics=[Optics(pixel_size=1.37, voltage=200, cs=2.0,
                                                           amplitude_contrast=0.1)])
    star = tmp_path / "mid.star"
    if fmt == "cistem":
        write_cistem_star(star, ps, stack="particles.mrcs")
    else:
        write_relion_star(star, ps, style=fmt[-3:], stack="particles.mrcs")
    back = read_star(star)
    assert detect_star_flavour(star) == fmt
    par2 = tmp_path / "out.par"
    write_par(par2, back.params)
    assert par2.read_text() == par1.read_text()
    o = back.optics[0]
    assert (o.pixel_size, o.voltage, o.cs, o.amplitude_contrast) == (1.37, 200, 2.0, 0.1)
    assert back.image_names[0] == f"{ps.params['position'][0]:06d}@particles.mrcs"


@pytest.mark.parametrize("style", ["3.1", "3.0"])
@pytest.mark.interop
def test_relion_star_par_star_round_trip(tmp_path, shared_data, style):
    """RELION star -> .par -> star: every value survives at .par precision, exactly thereafter."""
    src = _read(shared_data / "cryodrgn/relion31.6opticsgroups.star")
    par = tmp_path / "a.par"
    write_par(par, src.params)
    p = read_par(par)
    # the .par kept every value to its printed precision
    for c, tol in (("psi", 0.005), ("theta", 0.005), ("phi", 0.005), ("shx", 0.005), ("shy", 0.005),
                   ("df1", 0.05), ("df2", 0.05), ("angast", 0.005)):
        np.testing.assert_allclose(p[c], src.params[c], atol=tol + 1e-6)
    np.testing.assert_array_equal(p["position"], src.params["position"])
    ps = ParticleSet(params=p, optics=src.optics, optics_group=src.optics_group, image_names=src.image_names,
                     extra=src.extra)
    out = tmp_path / "b.star"
    write_relion_star(out, ps, style=style)
    back = _read(out)
    for c in PAR_COLUMNS:
        np.testing.assert_array_equal(back.params[c], p[c], err_msg=c)
    np.testing.assert_allclose(back.pixel_sizes(), src.pixel_sizes())
    assert back.image_names == src.image_names
    np.testing.assert_array_equal(back.extra["rlnCoordinateX"], src.extra["rlnCoordinateX"])


@pytest.mark.interop
def test_relion_star_to_star_keeps_optics_and_extra(tmp_path, shared_data):
    src = _read(shared_data / "cryodrgn/relion5.star")
    out = tmp_path / "r5.star"
    write_relion_star(out, src)
    back = _read(out)
    for c in PAR_COLUMNS:
        np.testing.assert_array_equal(back.params[c], src.params[c], err_msg=c)
    o, b = src.optics[0], back.optics[0]
    np.testing.assert_array_equal(b.extra["rlnOddZernike"], o.extra["rlnOddZernike"])
    np.testing.assert_array_equal(b.extra["rlnEvenZernike"], o.extra["rlnEvenZernike"])
    assert b.extra["rlnImageSize"] == 448 and b.extra["rlnMagMat00"] == pytest.approx(1.001833)
    assert list(back.extra["rlnMicrographName"]) == list(src.extra["rlnMicrographName"])
    assert "[" in out.read_text()  # arrays written back in RELION 5's bracket syntax


def test_cistem_star_par_cistem_star(tmp_path):
    ps = ParticleSet(params=_diverse_params(12, seed=9), optics=[Optics(pixel_size=0.83)])
    a = tmp_path / "a.star"
    write_cistem_star(a, ps)
    s = read_star(a)
    par = tmp_path / "a.par"
    write_par(par, s.params)
    b = tmp_path / "b.star"
    write_cistem_star(b, ParticleSet(params=read_par(par), optics=s.optics))
    body = [ln for ln in a.read_text().splitlines() if not ln.startswith("# Written")]
    assert body == [ln for ln in b.read_text().splitlines() if not ln.startswith("# Written")]


def test_cistem_star_format_matches_cistem(tmp_path):
    p = empty_params(1)
    p["position"], p["psi"], p["theta"], p["phi"], p["shx"], p["shy"] = 7, 1.5, 2.25, 3.125, -4.0, 5.5
    p["df1"], p["df2"], p["angast"], p["pshift"], p["film"] = 12000.04, 11000.06, 33.333, 0.5, -1
    p["occ"], p["logp"], p["sigma"], p["score"], p["change"] = 50.0, -3.5, 1.25, 7.777, -0.5
    f = tmp_path / "c.star"
    write_cistem_star(f, ParticleSet(params=p, optics=[Optics(pixel_size=1.06, voltage=300, cs=2.7,
                                                              amplitude_contrast=0.07)]))
    lines = f.read_text().splitlines()
    assert lines[1:5] == [" ", "data_", " ", "loop_"]
    assert lines[5] == "_cisTEMPositionInStack #1" and lines[14] == "_cisTEMPhaseShift #10"
    # "%8u %7.2f %7.2f %7.2f %9.2f %9.2f %8.1f %8.1f %7.2f %7.2f %5i %7.2f %9i %10.4f %7.2f %7.2f %8.5f %7.2f %7.2f %7.4f "
    expected = ("       7    1.50    2.25    3.12     -4.00      5.50  12000.0  11000.1   33.33    0.50    -1   50.00"
                "        -4     1.2500    7.78   -0.50  1.06000  300.00    2.70  0.0700 ")
    assert lines[-1].startswith(expected)
    assert lines[-2].startswith("#    POS     PSI   THETA")
