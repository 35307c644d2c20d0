"""``cistem-mpi convert`` through the real CLI entry point."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cistem_mpi.cli import main
from cistem_mpi.io.par import read_par, write_par
from cistem_mpi.io.params import PAR_COLUMNS, empty_params
from cistem_mpi.io.star import detect_star_flavour, read_star


def _run(*args: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["convert", *map(str, args)])


@pytest.mark.interop
def test_relion31_to_par_like_cistem_import(tmp_path, shared_data, capsys):
    out = tmp_path / "r.par"
    assert _run(shared_data / "cryodrgn/relion31.star", out) == 0
    assert "converted 5 particles" in capsys.readouterr().out
    lines = [ln.split() for ln in out.read_text().splitlines() if not ln.startswith("C")]
    # row 1 of relion31.star: Rot -102.30296 Tilt 82.318041 Psi 124.706463, OriginXAngst 0.019324,
    # OriginYAngst -0.64686, DefocusU 13108.082418 V 12845.582418 Angle -160.39
    first = lines[0]
    assert first[0] == "1"
    assert first[1:4] == ["124.71", "82.32", "-102.30"]  # PSI THETA PHI
    assert first[4:6] == ["-0.02", "0.65"]  # SHX SHY = -origin (Å)
    assert first[8:11] == ["13108.1", "12845.6", "-160.39"]


@pytest.mark.interop
def test_relion30_pixel_origins_to_par(tmp_path, shared_data):
    # PfCRT (RELION 3.0): OriginX -0.14063 px, OriginY -0.04688 px, 1.035 Å/px (DetectorPixelSize/Mag)
    out = tmp_path / "p.par"
    assert _run(shared_data / "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star", out) == 0
    p = read_par(out)
    assert p["shx"][0] == pytest.approx(round(0.14063 * 1.035, 2))
    assert p["shy"][0] == pytest.approx(round(0.04688 * 1.035, 2))


@pytest.mark.parametrize("to,style,flavour", [("relion-star", "3.1", "relion3.1"), ("relion-star", "3.0", "relion3.0"),
                                              ("cistem-star", "3.1", "cistem")])
def test_par_to_star_and_back(tmp_path, to, style, flavour):
    rng = np.random.default_rng(3)
    p = empty_params(25)
    p["psi"], p["theta"], p["phi"] = rng.uniform(0, 180, (3, 25)).round(2)
    p["shx"], p["shy"] = rng.uniform(-9, 9, (2, 25)).round(2)
    p["film"] = rng.integers(-2, 5, 25)
    p["df1"], p["df2"] = rng.uniform(9000, 30000, (2, 25)).round(1)
    p["pshift"] = 0.75
    src = tmp_path / "in.par"
    write_par(src, p)
    star = tmp_path / "mid.star"
    assert _run(src, star, "--to", to, "--relion-style", style, "--pixel-size", "1.1", "--voltage", "200",
                "--cs", "2.0", "--amplitude-contrast", "0.1", "--box-size", "128", "--stack", "stack.mrcs") == 0
    assert detect_star_flavour(star) == flavour
    s = read_star(star)
    assert (s.optics[0].pixel_size, s.optics[0].voltage, s.optics[0].cs) == (1.1, 200.0, 2.0)
    back = tmp_path / "back.par"
    assert _run(star, back) == 0
    assert back.read_text() == src.read_text()
    if to == "relion-star":
        text = star.read_text()
        assert "000001@stack.mrcs" in text
        if style == "3.1":
            assert "_rlnImageSize" in text and s.optics[0].extra["rlnImageSize"] == 128


@pytest.mark.interop
def test_star_30_to_31(tmp_path, shared_data):
    out = tmp_path / "ap31.star"
    assert _run(shared_data / "relion_tests/ap_s_c2d_red.star", out, "--relion-style", "3.1") == 0
    a = read_star(shared_data / "relion_tests/ap_s_c2d_red.star")
    b = read_star(out)
    assert detect_star_flavour(out) == "relion3.1"
    for c in PAR_COLUMNS:
        np.testing.assert_array_equal(b.params[c], a.params[c], err_msg=c)
    assert b.optics[0].pixel_size == pytest.approx(a.optics[0].pixel_size)


@pytest.mark.interop
def test_cryosparc_to_relion(tmp_path, shared_data):
    out = tmp_path / "cs.star"
    assert _run(shared_data / "cryodrgn/cryosparc_P12_J24_001_particles.cs", out) == 0
    s = read_star(out)
    assert len(s) == 2019 and s.optics[0].pixel_size == 2.95
    assert s.params[0]["shx"] == pytest.approx(-11.334375 * 2.95, abs=1e-4)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["{d}/nope.par", "{d}/o.star"], "nope.par: file not found"),
        (["{d}/in.par", "{d}/o.star"], "--pixel-size"),
        (["{d}/in.par", "{d}/o.txt"], "unknown output type"),
        (["{d}/in.txt", "{d}/o.star"], "unknown parameter file type"),
        (["{d}/in.par", "{d}/in.par"], "same file"),
        (["{d}/in.par", "{d}/o.star", "--box-size", "0", "--pixel-size", "1"], "--box-size: must be positive"),
    ],
)
def test_bad_input_exit_2_one_line(tmp_path, capsys, args, fragment):
    write_par(tmp_path / "in.par", empty_params(2))
    (tmp_path / "in.txt").write_text("x")
    rc = _run(*[a.format(d=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert rc == 2
    assert fragment in err and err.strip().count("\n") == 0, err
