"""The file validator lists every problem of a file at once (issue #10 item 3), and `cistem-mpi validate`."""

from __future__ import annotations

import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from cistem_mpi.io.par import write_par
from cistem_mpi.io.params import Optics, ParticleSet, empty_params
from cistem_mpi.io.star import write_cistem_star, write_relion_star
from cistem_mpi.io.validate import validate, validate_files

CLI = [sys.executable, "-m", "cistem_mpi"]


def _params(n=4):
    p = empty_params(n)
    p["df1"], p["df2"] = 15000.0, 14000.0
    return p


def test_clean_files_have_no_problem(tmp_path):
    par, rel, cis, mrc = (tmp_path / n for n in ("a.par", "a.star", "c.star", "s.mrcs"))
    write_par(par, _params())
    ps = ParticleSet(params=_params(), optics=[Optics(pixel_size=1.2)])
    write_relion_star(rel, ps, stack="s.mrcs", image_size=32)
    write_cistem_star(cis, ps)
    mrcfile.new(str(mrc), np.zeros((3, 8, 8), np.float32)).close()
    assert validate_files([par, rel, cis, mrc]) == {str(par): [], str(rel): [], str(cis): [], str(mrc): []}


def test_par_every_bad_line_and_column(tmp_path):
    f = tmp_path / "bad.par"
    write_par(f, _params(6))
    lines = f.read_text().splitlines()
    # line numbers: 1 is the header comment, data from line 2
    lines[2] = lines[2].replace("15000.0", "  abcde", 1)          # line 3: DF1 text
    lines[3] = " ".join(lines[3].split()[:-1])                    # line 4: a column short
    lines[4] = lines[4].replace(" 100.00 ", "    nan ", 1)        # line 5: OCC nan
    t = lines[5].split()
    t[0], t[12] = "0", "150.0"                                     # line 6: position 0, OCC 150
    lines[5] = " ".join(t)
    lines[6] = lines[6].replace("      6 ", "      2 ", 1)          # line 7: particle 2 again
    f.write_text("\n".join(lines) + "\n")
    problems = validate(f)
    assert problems == [
        "line 3, column 9 (DF1): 'abcde' is not a number",
        "line 4 has 16 columns; expected 17 like line 2",
        "line 5, column 13 (OCC) is nan",
        "line 6, column 1 (POSITION): particle positions count from 1, got 0",
        "line 6, column 13 (OCC): occupancy must be within 0..100 %, got 150.0",
        "line 7, column 1 (POSITION): particle 2 is listed again (first on line 3)",
    ], problems


def test_star_every_problem_in_file_order(tmp_path):
    f = tmp_path / "bad.star"
    f.write_text(
        "data_optics\n"                                            # 1
        "loop_\n_rlnOpticsGroup\n_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n"
        "_rlnImagePixelSize\n"                                     # 2-7
        "1 300 2.7 1.5 -1.06\n"                                    # 8: amplitude contrast, pixel size
        "2 0 -2.7 0.1 1.06\n"                                      # 9: voltage, Cs
        "\ndata_particles\n"                                       # 11
        "loop_\n_rlnImageName\n_rlnDefocusU\n_rlnAngleRot\n_rlnOpticsGroup\n"   # 12-16
        "1@s.mrcs 15000 10 1\n"                                    # 17: fine
        "2@s.mrcs 15000 inf 3\n"                                   # 18: inf, undefined group
        "three@s.mrcs 1.5e4 20\n"                                  # 19: short row
        "4@s.mrcs x y 2\n")                                        # 20: two texts
    problems = validate(f)
    assert problems == [
        "line 8, column 4 (_rlnAmplitudeContrast): 1.5 is outside [0, 1)",
        "line 8, column 5 (_rlnImagePixelSize): -1.06 is outside (0, inf)",
        "line 9, column 2 (_rlnVoltage): 0 is outside (0, inf)",
        "line 9, column 3 (_rlnSphericalAberration): -2.7 is outside [0, inf)",
        "loop of data_particles (line 12): column _rlnDefocusV missing (it has _rlnDefocusU)",
        "line 18, column 3 (_rlnAngleRot) is inf, not a finite number",
        "line 18, column 4 (_rlnOpticsGroup): optics group 3 is not in data_optics (groups 1, 2)",
        "line 19: 3 values but the loop of data_particles (line 12) has 4 column labels (lines 13-16)",
        "line 20, column 2 (_rlnDefocusU): 'x' is not a number",
        "line 20, column 3 (_rlnAngleRot): 'y' is not a number",
    ], problems


def test_star_structure_problems(tmp_path):
    f = tmp_path / "s.star"
    f.write_text("_rlnVoltage 300\nloop_\ndata_\nloop_\n_cisTEMPositionInStack #1\n_cisTEMDefocus1 #2\n"
                 "1 15000\n2\n3 15000 9\n")
    assert validate(f) == [
        "line 1: label _rlnVoltage before any data_ block",
        "line 2: loop_ before any data_ block",
        "line 8: 1 values but the loop of data_ (line 4) has 2 column labels (lines 5-6)",
        "line 9: 3 values but the loop of data_ (line 4) has 2 column labels (lines 5-6)",
    ]


@pytest.mark.filterwarnings("ignore:Data array contains NaN values")
def test_mrc_header_and_nan_sections(tmp_path):
    f = tmp_path / "s.mrcs"
    data = np.zeros((4, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    data[3, :2, 0] = np.inf
    with mrcfile.new(str(f), data) as m:
        m.header.mapc = 5  # not an axis
        m.voxel_size = 1.5
    problems = validate(f)
    assert "Invalid axis mapping: found [2, 3, 5], should be [1, 2, 3]" in problems, problems
    assert "section 2: 1 NaN or infinite value" in problems
    assert "section 4: 2 NaN or infinite values" in problems
    truncated = tmp_path / "t.mrc"
    truncated.write_bytes(f.read_bytes()[:1024 + 100])
    assert any("smaller" in p.lower() or "size" in p.lower() for p in validate(truncated)), validate(truncated)


def test_other_files(tmp_path):
    assert validate(tmp_path / "missing.star") == ["file not found"]
    (tmp_path / "x.txt").write_text("1 2\n")
    assert validate(tmp_path / "x.txt")[0].startswith("unknown file type '.txt'")


def test_cli_lists_all_and_exits_non_zero(tmp_path):
    good, bad = tmp_path / "good.par", tmp_path / "bad.par"
    write_par(good, _params())
    write_par(bad, _params())
    text = bad.read_text().splitlines()
    text[1] = text[1].replace("15000.0", "  nope ", 1)
    text[2] = text[2].replace("14000.0", "  nope ", 1)
    bad.write_text("\n".join(text) + "\n")
    r = subprocess.run(CLI + ["validate", str(good), str(bad)], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == [f"{good}: OK", f"{bad}: line 2, column 9 (DF1): 'nope' is not a number",
                                     f"{bad}: line 3, column 10 (DF2): 'nope' is not a number"]
    assert "1 of 2 files have problems" in r.stderr
    r = subprocess.run(CLI + ["validate", str(good)], capture_output=True, text=True)
    assert (r.returncode, r.stdout.strip()) == (0, f"{good}: OK")


@pytest.mark.parametrize("n_bad", [250])
def test_problem_list_is_capped(tmp_path, n_bad):
    f = tmp_path / "many.par"
    p = _params(n_bad)
    p["occ"] = 150.0
    write_par(f, p)
    out = validate(f)
    assert len(out) == 201 and out[-1] == f"... and {n_bad - 200} more problems"
