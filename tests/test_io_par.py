"""Frealign .par reading/writing (SPEC §4)."""

from __future__ import annotations

import numpy as np
import pytest

from cistem_mpi.errors import InputError
from cistem_mpi.io.par import PAR_HEADER, read_par, write_par
from cistem_mpi.io.params import PAR_COLUMNS, empty_params

# Two lines as cisTEM writes them, typed by hand from its C format
# "%7i %7.2f %7.2f %7.2f %9.2f %9.2f %7.0f %5i %8.1f %8.1f %7.2f %7.2f %7.2f %9i %10.4f %7.2f %7.2f"
LINE1 = "      1   12.50   90.00  359.99     -3.25      4.75       0     1  15000.0  14500.5   45.00    1.57  100.00     -1234     1.0000   12.34    0.56"
LINE2 = "      2  -45.10  170.02    0.01   1234.56  -9876.54   10000    -3  25000.4  24999.9  -89.99    0.00   33.33   1234567    12.3456   -0.50   -1.00"


@pytest.mark.interop
def test_real_12_column_freehand_par(shared_data):
    # parts-15_128x128f.par: "No PSI THETA PHI SHX SHY MAG FILM DF1 DF2 ANGAST CCMax", 50 lines, read by eye
    p = read_par(shared_data / "freehand_atpsynthase/parts-15_128x128f.par")
    assert len(p) == 50
    first = p[0]
    assert first["position"] == 1
    assert (first["psi"], first["theta"], first["phi"]) == pytest.approx((50.0, 78.603, 236.063), abs=1e-4)
    assert (first["shx"], first["shy"]) == (-5.0, 2.0)
    assert first["mag"] == 50000.0 and first["film"] == 1
    assert (first["df1"], first["df2"], first["angast"]) == pytest.approx((39671.6, 35222.2, 80.79), abs=1e-2)
    assert first["score"] == pytest.approx(0.29)
    last = p[-1]  # "     50 320.000 107.557 280.491  -1.000  -2.000  50000.     1  39671.6  35222.2   80.79   0.29"
    assert last["position"] == 50
    assert (last["psi"], last["theta"], last["phi"]) == pytest.approx((320.0, 107.557, 280.491), abs=1e-4)
    assert (last["shx"], last["shy"]) == (-1.0, -2.0)
    assert p[1]["score"] == pytest.approx(0.40)
    # columns that do not exist in this layout take neutral values
    assert np.all(p["pshift"] == 0) and np.all(p["occ"] == 100) and np.all(p["logp"] == 0)
    assert list(p["position"]) == list(range(1, 51))


def test_17_column_values_and_comments(tmp_path):
    f = tmp_path / "a.par"
    f.write_text(PAR_HEADER + "\n" + LINE1 + "\nC a comment in the middle\n\n" + LINE2 + "\nC  final averages\n")
    p = read_par(f)
    assert p.dtype.names == PAR_COLUMNS
    assert len(p) == 2
    r = p[0]
    assert r["position"] == 1 and r["film"] == 1
    assert (r["psi"], r["theta"], r["phi"]) == pytest.approx((12.5, 90.0, 359.99))
    assert (r["shx"], r["shy"], r["mag"]) == pytest.approx((-3.25, 4.75, 0.0))
    assert (r["df1"], r["df2"], r["angast"], r["pshift"]) == pytest.approx((15000.0, 14500.5, 45.0, 1.57))
    assert (r["occ"], r["logp"], r["sigma"], r["score"], r["change"]) == pytest.approx((100, -1234, 1, 12.34, 0.56))
    r = p[1]
    assert r["film"] == -3 and r["logp"] == 1234567 and r["mag"] == 10000
    assert (r["shx"], r["shy"]) == pytest.approx((1234.56, -9876.54))
    assert len(read_par(f, exclude_negative_film=True)) == 1


def test_write_matches_cistem_format_exactly(tmp_path):
    f = tmp_path / "a.par"
    f.write_text(LINE1 + "\n" + LINE2 + "\n")
    p = read_par(f)
    out = tmp_path / "b.par"
    write_par(out, p)
    assert out.read_text() == PAR_HEADER + "\n" + LINE1 + "\n" + LINE2 + "\n"


def test_16_column_legacy_reads_pshift_zero(tmp_path):
    # Frealign 9: no PSHIFT column; OCC follows ANGAST
    f = tmp_path / "old.par"
    f.write_text("C Frealign 9\n"
                 "      1   12.50   90.00  359.99     -3.25      4.75       0     1  15000.0  14500.5   45.00  100.00     -1234     1.0000   12.34    0.56\n")
    r = read_par(f)[0]
    assert r["pshift"] == 0.0
    assert (r["angast"], r["occ"], r["logp"], r["sigma"], r["score"], r["change"]) == pytest.approx(
        (45.0, 100.0, -1234, 1.0, 12.34, 0.56))


def test_logp_rounding_half_away_from_zero(tmp_path):
    p = empty_params(4)
    p["logp"] = [2.5, -2.5, 1234567.4, -0.49]
    f = tmp_path / "r.par"
    write_par(f, p)
    assert [int(line.split()[13]) for line in f.read_text().splitlines()[1:]] == [3, -3, 1234567, 0]


def test_round_trip_write_read_write(tmp_path):
    rng = np.random.default_rng(11)
    p = empty_params(200)
    p["psi"], p["theta"], p["phi"] = rng.uniform(0, 360, (3, 200))
    p["shx"], p["shy"] = rng.uniform(-50, 50, (2, 200))
    p["film"] = rng.integers(-5, 40, 200)
    p["df1"], p["df2"] = rng.uniform(5000, 40000, (2, 200))
    p["angast"] = rng.uniform(-90, 90, 200)
    p["pshift"] = rng.uniform(0, 3.1, 200)
    p["logp"] = rng.uniform(-1e6, 1e6, 200)
    f1, f2 = tmp_path / "1.par", tmp_path / "2.par"
    write_par(f1, p)
    q = read_par(f1)
    write_par(f2, q)
    assert f1.read_text() == f2.read_text()
    np.testing.assert_allclose(q["psi"], p["psi"], atol=0.005 + 1e-4)
    np.testing.assert_array_equal(q["film"], p["film"])


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("      1   12.50   90.00  359.99     -3.25      4.75       0     1  15000.0\n", "has 9 columns"),
        (LINE1 + "\n" + LINE1.rsplit(" ", 1)[0] + "\n", "line 2 has 16 columns; expected 17"),
        (LINE1 + "\n" + LINE2.replace("170.02", "abc.de") + "\n", "line 2, column 3 (THETA): 'abc.de' is not a number"),
        (LINE1.replace("15000.0", "    nan") + "\n", "line 1, column 9 (DF1) is nan"),
        (LINE1.replace("     1  15000.0", "   1.5  15000.0") + "\n", "FILM must be an integer"),
        ("C only a comment\n", "no data lines"),
    ],
)
def test_bad_par_files_name_file_and_problem(tmp_path, content, fragment):
    f = tmp_path / "bad.par"
    f.write_text(content)
    with pytest.raises(InputError) as e:
        read_par(f)
    msg = str(e.value)
    assert msg.startswith(str(f)) and fragment in msg, msg


def test_missing_par(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_par(tmp_path / "nope.par")
