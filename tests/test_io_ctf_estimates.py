"""CTF estimates: RELION micrographs_ctf.star (3.0, 3.1+) and CTFFIND4/5 text output.

Expected values of the real STAR file are read here by plain string splitting
of its text, never by the reader under test.

There is no real CTFFIND ``.txt`` in shared/data.  The CTFFIND fixtures below
are written by hand to reproduce the layout of CTFFIND's writer
(timothygrant80/cisTEM ``src/programs/ctffind/ctffind.cpp``: five
``WriteCommentLine`` header lines - version, ``Input file: %s ; Number of
micrographs: %i``, pixel size/voltage/Cs/amplitude contrast, box size and
search ranges, the ``Columns: #1 ... #7`` legend - then one ``NumericTextFile``
row of ``%f`` numbers per micrograph; CTFFIND 5 adds columns #8-#10).  Header
and numbers are taken from published CTFFIND 4.1.14, 4.1.5 and 5.0.2 example
outputs; only the CTFFIND4 row's phase shift was changed (to 1.570796 rad, to
show that column passes through unconverted) and its input path made longer.
"""

from __future__ import annotations

import math

import numpy as np

import pytest

from cistem_mpi.errors import InputError
from cistem_mpi.io.ctf_estimates import CtfEstimate, read_ctf_estimates
from helpers_star import star_loop

CTFFIND4_TXT = """\
# Output from CTFFind version 4.1.14, run on 2023-02-02 15:13:07
# Input file: /data/project/Micrographs/test_img.mrc ; Number of micrographs: 1
# Pixel size: 1.000 Angstroms ; acceleration voltage: 200.0 keV ; spherical aberration: 2.26 mm ; amplitude contrast: 0.07
# Box size: 1024 pixels ; min. res.: 30.0 Angstroms ; max. res.: 5.0 Angstroms ; min. def.: 5000.0 um; max. def. 50000.0 um
# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; #4 - azimuth of astigmatism; #5 - additional phase shift [radians]; #6 - cross correlation; #7 - spacing (in Angstroms) up to which CTF rings were fit successfully
1.000000 10295.926758 10012.275391 -38.856349 1.570796 0.030650 5.279412
"""

CTFFIND5_TXT = """\
# Output from CTFFind version 5.0.2, run on 2025-02-13 21:14:21
# Input file: /some/path/to/my_project/micrograph_1.mrc ; Number of micrographs: 1
# Pixel size: 0.930 Angstroms ; acceleration voltage: 300.0 keV ; spherical aberration: 2.70 mm ; amplitude contrast: 0.07
# Box size: 512 pixels ; min. res.: 30.0 Angstroms ; max. res.: 3.5 Angstroms ; min. def.: 0.0 um; max. def. 50000.0 um
# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; #4 - azimuth of astigmatism; #5 - additional phase shift [radians]; #6 - cross correlation; #7 - spacing (in Angstroms) up to which CTF rings were fit successfully; #8 - Estimated tilt axis angle; #9 - Estimated tilt angle ; #10 Estimated sample thickness (in Angstroms)
1.000000 8984.742188 8709.236328 45.948771 0.000000 0.446317 3.720000 221.912292 12.251187 1619.773438
"""


def _header(input_file: str, n: int) -> str:
    return "".join(CTFFIND4_TXT.splitlines(keepends=True)[:5]).replace(
        "/data/project/Micrographs/test_img.mrc ; Number of micrographs: 1",
        f"{input_file} ; Number of micrographs: {n}")


# --------------------------------------------------------------------------- RELION


@pytest.mark.interop
def test_relion31_micrographs_ctf(shared_data):
    path = shared_data / "em-testdata/micrographs_ctf.star"
    labels, rows = star_loop(path, "micrographs")
    est = read_ctf_estimates(path)
    assert len(est) == len(rows) == 24
    col = {lab: k for k, lab in enumerate(labels)}
    for e, r in zip(est, rows):
        assert isinstance(e, CtfEstimate) and e.source == path
        assert e.micrograph == r[col["rlnMicrographName"]]
        assert e.df1 == float(r[col["rlnDefocusU"]]) and e.df2 == float(r[col["rlnDefocusV"]])
        assert e.angast == float(r[col["rlnDefocusAngle"]])
        assert e.score == float(r[col["rlnCtfFigureOfMerit"]])
        assert e.fit_resolution == float(r[col["rlnCtfMaxResolution"]])
        assert e.pshift == 0.0  # the file has no _rlnPhaseShift
    # first row, read by eye: ..._00021_frameImage.mrc 1 ..._PS.ctf:mrc 10865.006836 10571.461914
    #                         293.544922 79.130180 0.132045 4.841686
    first = est[0]
    assert first.micrograph == "MotionCorr/job002/Movies/20170629_00021_frameImage.mrc"
    assert (first.df1, first.df2, first.angast, first.score, first.fit_resolution) == \
        (10865.006836, 10571.461914, 79.130180, 0.132045, 4.841686)
    assert est[-1].micrograph == "MotionCorr/job002/Movies/20170629_00049_frameImage.mrc"


@pytest.mark.interop
def test_relion30_single_block_phase_shift_degrees_to_radians(shared_data, tmp_path):
    """A 3.0-style table built from the real file's first rows, plus a phase shift in degrees."""
    labels, rows = star_loop(shared_data / "em-testdata/micrographs_ctf.star", "micrographs")
    shifts = ["0.000000", "90.000000", "45.500000"]
    text = "\n# version 30001\n\ndata_\n\nloop_\n" + "".join(f"_{lab} #{k + 1}\n" for k, lab in enumerate(labels))
    text += f"_rlnPhaseShift #{len(labels) + 1}\n"
    text += "".join(" ".join(r + [s]) + "\n" for r, s in zip(rows[:3], shifts))
    f = tmp_path / "micrographs_ctf_30.star"
    f.write_text(text)
    est = read_ctf_estimates(f)
    assert [e.micrograph for e in est] == [r[0] for r in rows[:3]]
    assert [e.pshift for e in est] == pytest.approx([0.0, math.pi / 2, 45.5 * math.pi / 180], rel=1e-15)
    assert [e.df1 for e in est] == [float(r[labels.index("rlnDefocusU")]) for r in rows[:3]]


@pytest.mark.interop
def test_relion31_block_order_does_not_matter(shared_data, tmp_path):
    text = (shared_data / "em-testdata/micrographs_ctf.star").read_text()
    k = text.index("# version 30001\n\ndata_micrographs")
    f = tmp_path / "swapped.star"
    f.write_text(text[k:] + "\n" + text[:k])  # micrographs block first, then optics
    a = read_ctf_estimates(shared_data / "em-testdata/micrographs_ctf.star")
    b = read_ctf_estimates(f)
    assert [(e.micrograph, e.df1, e.df2, e.angast, e.score) for e in a] == \
        [(e.micrograph, e.df1, e.df2, e.angast, e.score) for e in b]


# --------------------------------------------------------------------------- CTFFIND


def test_ctffind4_txt(tmp_path):
    f = tmp_path / "test_img_ctf.txt"
    f.write_text(CTFFIND4_TXT)
    (e,) = read_ctf_estimates(f)
    assert e == CtfEstimate(micrograph="test_img.mrc", df1=10295.926758, df2=10012.275391, angast=-38.856349,
                            pshift=1.570796, fit_resolution=5.279412, score=0.030650, source=f)


def test_ctffind5_extra_columns(tmp_path):
    f = tmp_path / "micrograph_1_ctf.txt"
    f.write_text(CTFFIND5_TXT)
    (e,) = read_ctf_estimates(f)
    assert (e.micrograph, e.df1, e.df2, e.angast, e.pshift, e.score, e.fit_resolution) == \
        ("micrograph_1.mrc", 8984.742188, 8709.236328, 45.948771, 0.0, 0.446317, 3.72)


def test_ctffind_stack_of_micrographs_and_no_name(tmp_path):
    f = tmp_path / "stack.txt"
    f.write_text(_header("stack.mrcs", 3)
                 + "1.000000 10000.0 9000.0 10.0 0.0 0.10 4.0\n"
                 + "2.000000 20000.0 19000.0 20.0 0.5 0.20 inf\n"
                 + "3.000000 30000.0 29000.0 30.0 1.0 0.30 6.0\n")
    est = read_ctf_estimates(f)
    assert [e.micrograph for e in est] == ["stack.mrcs"] * 3
    assert [e.df1 for e in est] == [10000.0, 20000.0, 30000.0]
    assert [e.pshift for e in est] == [0.0, 0.5, 1.0]
    assert math.isinf(est[1].fit_resolution)  # kept as written
    g = tmp_path / "bare.txt"  # rows without the header: no name
    g.write_text("1.0 12000.0 11000.0 5.0 0.0 0.2 3.5\n")
    (e,) = read_ctf_estimates(g)
    assert e.micrograph == "" and (e.df1, e.df2, e.angast) == (12000.0, 11000.0, 5.0)


# --------------------------------------------------------------------------- bad input

_CTF_STAR = "data_micrographs\nloop_\n_rlnMicrographName #1\n_rlnDefocusU #2\n_rlnDefocusV #3\n_rlnDefocusAngle #4\n"

BAD = [
    ("no_v.star", "data_micrographs\nloop_\n_rlnMicrographName\n_rlnDefocusU\nm.mrc 10000\n",
     "column _rlnDefocusV missing in data_micrographs"),
    ("no_name.star", "data_\nloop_\n_rlnDefocusU\n_rlnDefocusV\n10000 9000\n", "column _rlnMicrographName missing"),
    ("text.star", _CTF_STAR + "m.mrc 10000 9000 5\nn.mrc 1e4 abc 5\n", "_rlnDefocusV in row 2 is 'abc'"),
    ("fom_text.star", "data_\nloop_\n_rlnMicrographName\n_rlnDefocusU\n_rlnDefocusV\n_rlnCtfFigureOfMerit\n"
                      "m.mrc 1 2 good\n", "_rlnCtfFigureOfMerit in row 1 is 'good'"),
    ("no_rows.star", _CTF_STAR, "no data rows in data_micrographs"),
    ("coords.star", "data_\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n1 2\n", "not a CTF estimate file"),
    ("empty.txt", "", "file is empty"),
    ("header_only.txt", _header("m.mrc", 1), "no data rows"),
    ("short_row.txt", _header("m.mrc", 1) + "1.000000 10000.0 9000.0\n", "line 6 has 3 column(s)"),
    ("text_row.txt", _header("m.mrc", 1) + "1.000000 10000.0 nine 10.0 0.0 0.1 4.0\n",
     "line 6: defocus 2 'nine' is not a number"),
    ("nan_defocus.txt", _header("m.mrc", 1) + "1.000000 nan 9000.0 10.0 0.0 0.1 4.0\n",
     "line 6: defocus 1 is nan, not a finite number"),
    ("truncated.txt", _header("m.mrcs", 2) + "1.000000 10000.0 9000.0 10.0 0.0 0.1 4.0\n",
     "header says 2 micrograph(s) but the file has 1 data row(s)"),
    ("m_avrot.txt", "# Output from CTFFind version 4.1.14, run on 2024-03-05 10:08:53\n"
                    "# Input file: m.mrc ; Number of micrographs: 1\n"
                    "# 6 lines per micrograph: #1 - spatial frequency (1/Angstroms); #2 - 1D rotational average\n"
                    "0.000000 0.001393 0.002786\n", "is a CTFFIND _avrot file"),
]


@pytest.mark.parametrize("name, content, problem", BAD, ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, name, content, problem):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(InputError) as e:
        read_ctf_estimates(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: ") and "\n" not in msg and problem in msg, msg


@pytest.mark.interop
def test_particle_star_and_missing_file(shared_data, tmp_path):
    with pytest.raises(InputError, match=r"relion31\.star: is a particle STAR"):
        read_ctf_estimates(shared_data / "cryodrgn/relion31.star")
    with pytest.raises(InputError, match=r"autopick\.star: not a CTF estimate file"):
        read_ctf_estimates(shared_data / "em-testdata/20170629_00049_frameImage_autopick.star")
    with pytest.raises(InputError, match="nope.txt: file not found"):
        read_ctf_estimates(tmp_path / "nope.txt")


def test_written_relion_ctf_star_reads_back(tmp_path):
    from cistem_mpi.io.ctf_estimates import write_relion_ctf_star

    path = tmp_path / "micrographs_ctf.star"
    write_relion_ctf_star(path, ["a/mic_1.mrc", "a/mic_2.mrc"], [10000.5, 21000.0], [9800.25, 20500.0],
                          [12.5, -40.0], [0.0, np.pi / 2], pixel_size=1.1, voltage=300, cs=2.7,
                          amplitude_contrast=0.07)
    got = read_ctf_estimates(path)
    assert [e.micrograph for e in got] == ["a/mic_1.mrc", "a/mic_2.mrc"]
    np.testing.assert_allclose([[e.df1, e.df2, e.angast, e.pshift] for e in got],
                               [[10000.5, 9800.25, 12.5, 0.0], [21000.0, 20500.0, -40.0, np.pi / 2]], atol=1e-6)
    assert "data_optics" in path.read_text() and "_rlnPhaseShift" in path.read_text()
