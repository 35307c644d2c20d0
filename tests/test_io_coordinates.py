"""Particle coordinates: RELION STAR (pick, particle, list), EMAN .box, plain text.

Expected values of the real files are read here by plain string splitting of
the STAR text (``helpers_star.star_loop``), never by the reader under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cistem_mpi.errors import InputError
from cistem_mpi.io.coordinates import PickedParticles, read_coordinates
from helpers_star import star_loop

AUTOPICK = "em-testdata/20170629_00049_frameImage_autopick.star"


def _col(labels, rows, label) -> list[str]:
    k = labels.index(label)
    return [r[k] for r in rows]


def _first_appearance(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


# --------------------------------------------------------------------------- real RELION files


@pytest.mark.interop
def test_relion_autopick_star(shared_data):
    path = shared_data / AUTOPICK
    labels, rows = star_loop(path, "")
    (pk,) = read_coordinates(path)
    assert isinstance(pk, PickedParticles)
    assert pk.micrograph == "" and pk.source == path
    assert len(pk) == len(rows) == 195
    assert pk.x.dtype == pk.y.dtype == pk.score.dtype == np.float64
    for i in (0, 1, -1):  # first rows "462.817657 203.188232 0.172677 ...", last "2596.294189 586.988220 0.025625"
        assert pk.x[i] == float(_col(labels, rows, "rlnCoordinateX")[i])
        assert pk.y[i] == float(_col(labels, rows, "rlnCoordinateY")[i])
        assert pk.score[i] == float(_col(labels, rows, "rlnAutopickFigureOfMerit")[i])
    assert (pk.x[0], pk.y[0], pk.score[0]) == (462.817657, 203.188232, 0.172677)
    assert (pk.x[-1], pk.y[-1], pk.score[-1]) == (2596.294189, 586.988220, 0.025625)
    np.testing.assert_array_equal(pk.score, [float(v) for v in _col(labels, rows, "rlnAutopickFigureOfMerit")])


@pytest.mark.interop
def test_relion31_particles_grouped_by_micrograph(shared_data):
    """RELION 3.1 optics + particles: 1000 rows of 22 micrographs, no FOM column."""
    path = shared_data / "em-testdata/particles_1k.star"
    labels, rows = star_loop(path, "particles")
    names = _col(labels, rows, "rlnMicrographName")
    xs, ys = _col(labels, rows, "rlnCoordinateX"), _col(labels, rows, "rlnCoordinateY")
    picks = read_coordinates(path)
    assert [p.micrograph for p in picks] == _first_appearance(names)
    assert len(picks) == 22 and sum(len(p) for p in picks) == len(rows) == 1000
    for p in picks:
        idx = [i for i, n in enumerate(names) if n == p.micrograph]
        assert len(p) == len(idx)
        np.testing.assert_array_equal(p.x, [float(xs[i]) for i in idx])
        np.testing.assert_array_equal(p.y, [float(ys[i]) for i in idx])
        assert np.all(np.isnan(p.score)) and p.source == path
    # first row: "2 1089 1783 GridSquare_..._231016_fractions.tiff ...";
    # last row: "2610 281 225 GridSquare_..._231513_fractions.tiff ..."
    assert (picks[0].x[0], picks[0].y[0]) == (1089.0, 1783.0)
    last = next(p for p in picks if p.micrograph == names[-1])
    assert (last.x[-1], last.y[-1]) == (281.0, 225.0)


@pytest.mark.interop
def test_relion31_block_order_and_names(shared_data):
    a = read_coordinates(shared_data / "cryodrgn/relion31.star")      # optics first
    b = read_coordinates(shared_data / "cryodrgn/relion31.v2.star")   # particles first
    labels, rows = star_loop(shared_data / "cryodrgn/relion31.star", "particles")
    assert len(a) == len(b) == 1
    assert a[0].micrograph == b[0].micrograph == rows[0][labels.index("rlnMicrographName")]
    assert a[0].micrograph.startswith("Micrographs/18aug10a_MC2_FoilHole_10984848")
    np.testing.assert_array_equal(a[0].x, [3277.0, 3277.0, 2826.0, 3406.0, 2933.0])
    np.testing.assert_array_equal(a[0].y, [983.0, 983.0, 459.0, 1409.0, 880.0])
    np.testing.assert_array_equal(a[0].x, b[0].x)
    np.testing.assert_array_equal(a[0].y, b[0].y)


@pytest.mark.parametrize("rel, block, n", [("relion_tests/ap_s_c2d_red.star", "", 9),
                                           ("aspire/sample_relion_data.star", "model_class_1", 17)])
@pytest.mark.interop
def test_relion30_single_block_with_fom(shared_data, rel, block, n):
    """RELION 1.x/3.0 single table (unnamed or named block) with micrograph names and FOM."""
    path = shared_data / rel
    labels, rows = star_loop(path, block)
    (pk,) = read_coordinates(path)
    assert len(pk) == len(rows) == n
    assert pk.micrograph == rows[0][labels.index("rlnMicrographName")]
    np.testing.assert_array_equal(pk.x, [float(v) for v in _col(labels, rows, "rlnCoordinateX")])
    np.testing.assert_array_equal(pk.y, [float(v) for v in _col(labels, rows, "rlnCoordinateY")])
    np.testing.assert_array_equal(pk.score, [float(v) for v in _col(labels, rows, "rlnAutopickFigureOfMerit")])


@pytest.mark.interop
def test_relion30_many_micrographs_order(shared_data):
    """8915 particles of 15 micrographs: first-appearance order, every row kept once."""
    path = shared_data / "relion_tests/ap_s_c2d.star"
    labels, rows = star_loop(path, "")
    names = _col(labels, rows, "rlnMicrographName")
    picks = read_coordinates(path)
    assert [p.micrograph for p in picks] == _first_appearance(names)
    assert [len(p) for p in picks] == [names.count(m) for m in _first_appearance(names)]
    xs = _col(labels, rows, "rlnCoordinateX")
    last = picks[-1]
    idx = [i for i, n in enumerate(names) if n == last.micrograph]
    assert last.x[-1] == float(xs[idx[-1]]) and last.x[0] == float(xs[idx[0]])


def test_interleaved_micrographs_first_appearance_order(tmp_path):
    """Names out of sorted order and interleaved (the real files happen to be sorted)."""
    f = tmp_path / "particles.star"
    f.write_text("data_particles\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
                 "_rlnAutopickFigureOfMerit #4\n_rlnOpticsGroup #5\n"
                 "m_b.mrc 1 10 0.1 1\nm_a.mrc 2 20 0.2 1\nm_b.mrc 3 30 0.3 1\nm_c.mrc 4 40 0.4 1\n"
                 "m_a.mrc 5 50 0.5 1\n\n"
                 "data_optics\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n_rlnVoltage #3\n1 1.0 300\n")
    picks = read_coordinates(f)
    assert [p.micrograph for p in picks] == ["m_b.mrc", "m_a.mrc", "m_c.mrc"]
    np.testing.assert_array_equal(picks[0].x, [1, 3])
    np.testing.assert_array_equal(picks[1].y, [20, 50])
    np.testing.assert_array_equal(picks[1].score, [0.2, 0.5])
    np.testing.assert_array_equal(picks[2].x, [4])


# --------------------------------------------------------------------------- coordinate list


def _project_with_listed_files(root, list_path):
    """Create every file the list names under ``root`` as a link to the one real autopick file."""
    labels, rows = star_loop(list_path, "coordinate_files")
    real = list_path.parent / "20170629_00049_frameImage_autopick.star"
    for f in _col(labels, rows, "rlnMicrographCoordinates"):
        target = root / f
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(real)
    return labels, rows


@pytest.mark.interop
def test_coordinate_list_resolved_in_cwd(shared_data, tmp_path, monkeypatch):
    lst = shared_data / "em-testdata/autopick.star"
    labels, rows = _project_with_listed_files(tmp_path, lst)
    monkeypatch.chdir(tmp_path)
    picks = read_coordinates(lst)
    (direct,) = read_coordinates(shared_data / AUTOPICK)
    assert [p.micrograph for p in picks] == _col(labels, rows, "rlnMicrographName")
    assert len(picks) == 24
    assert picks[0].micrograph == "MotionCorr/job002/Movies/20170629_00021_frameImage.mrc"
    for p, f in zip(picks, _col(labels, rows, "rlnMicrographCoordinates")):
        assert p.source == tmp_path / f
        np.testing.assert_array_equal(p.x, direct.x)
        np.testing.assert_array_equal(p.score, direct.score)


@pytest.mark.interop
def test_coordinate_list_cwd_first_then_list_dir(shared_data, tmp_path, monkeypatch):
    lst = shared_data / "em-testdata/autopick.star"
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "autopick.star").symlink_to(lst)
    labels, rows = _project_with_listed_files(proj, lst)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    picks = read_coordinates(proj / "autopick.star")  # nothing in cwd: found beside the list
    assert len(picks) == 24 and all(len(p) == 195 for p in picks)
    # a file of the same relative name in the cwd wins over the one beside the list
    first = _col(labels, rows, "rlnMicrographCoordinates")[0]
    (elsewhere / first).parent.mkdir(parents=True)
    (elsewhere / first).write_text("data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n12.5 7.25\n")
    picks = read_coordinates(proj / "autopick.star")
    assert picks[0].source == elsewhere / first and len(picks[0]) == 1
    assert (picks[0].x[0], picks[0].y[0]) == (12.5, 7.25) and math.isnan(picks[0].score[0])
    assert len(picks[1]) == 195


@pytest.mark.interop
def test_coordinate_list_missing_file(shared_data, tmp_path, monkeypatch):
    lst = shared_data / "em-testdata/autopick.star"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as e:
        read_coordinates(lst)
    msg = str(e.value)
    assert msg.startswith(f"{lst}: ") and "\n" not in msg
    assert "AutoPick/job004/Movies/20170629_00021_frameImage_autopick.star not found" in msg


# --------------------------------------------------------------------------- .box and plain text


def test_box_centre_is_corner_plus_half_box(tmp_path):
    f = tmp_path / "mic.box"
    f.write_text("100\t200\t64\t64\n10.5  20  100  80  -1\n")  # tabs (EMAN2), a 5th column (ignored)
    (pk,) = read_coordinates(f)
    np.testing.assert_array_equal(pk.x, [132.0, 60.5])
    np.testing.assert_array_equal(pk.y, [232.0, 60.0])
    assert pk.micrograph == "" and np.all(np.isnan(pk.score)) and pk.source == f


def test_box_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    cx, cy = rng.uniform(0, 4000, 50), rng.uniform(0, 4000, 50)
    w = 256
    f = tmp_path / "cryolo.box"
    f.write_text("".join(f"{x - w / 2:.3f} {y - w / 2:.3f} {w} {w}\n" for x, y in zip(cx, cy)))
    (pk,) = read_coordinates(f)
    np.testing.assert_allclose(pk.x, cx, atol=5e-4)
    np.testing.assert_allclose(pk.y, cy, atol=5e-4)


def test_plain_text_simulator_layout_and_csv(tmp_path):
    sim = tmp_path / "sim_0001_coords.txt"
    sim.write_text("# x_px y_px psi theta phi (particle centres; pixel 0 = first pixel)\n"
                   "100.250 300.500 10.000 20.000 30.000\n\n"
                   "0.000 4095.000 1.0 2.0 3.0  # trailing comment\n")
    (pk,) = read_coordinates(sim)
    np.testing.assert_array_equal(pk.x, [100.25, 0.0])
    np.testing.assert_array_equal(pk.y, [300.5, 4095.0])
    assert pk.micrograph == "" and np.all(np.isnan(pk.score))
    csv = tmp_path / "picks.csv"
    csv.write_text("# x,y,score\n1.5,2.5,0.9\n3,4\n")
    (pk,) = read_coordinates(csv)
    np.testing.assert_array_equal(pk.x, [1.5, 3.0])
    np.testing.assert_array_equal(pk.y, [2.5, 4.0])


def test_header_only_files_are_micrographs_without_picks(tmp_path):
    star = tmp_path / "mic_autopick.star"
    star.write_text("\n# version 30001\n\ndata_\n\nloop_ \n_rlnCoordinateX #1 \n_rlnCoordinateY #2 \n"
                    "_rlnAutopickFigureOfMerit #3 \n")
    txt = tmp_path / "mic_coords.txt"
    txt.write_text("# x_px y_px psi theta phi\n")
    for f in (star, txt):
        (pk,) = read_coordinates(f)
        assert len(pk) == 0 and pk.x.shape == pk.y.shape == pk.score.shape == (0,)
        assert pk.x.dtype == np.float64 and pk.micrograph == ""


@pytest.mark.interop
def test_star_content_detected_whatever_the_extension(shared_data, tmp_path):
    f = tmp_path / "picks.txt"
    f.write_text((shared_data / AUTOPICK).read_text())
    (pk,) = read_coordinates(f)
    assert len(pk) == 195 and pk.x[0] == 462.817657


# --------------------------------------------------------------------------- bad input

_XY_HEADER = "data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"

BAD = [
    ("no_y.star", "data_\nloop_\n_rlnCoordinateX #1\n_rlnAutopickFigureOfMerit #2\n1 0.5\n",
     "column _rlnCoordinateY missing"),
    ("text.star", _XY_HEADER + "1 2\nabc 4\n", "_rlnCoordinateX in row 2 is 'abc'"),
    ("fom.star", "data_\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n_rlnAutopickFigureOfMerit\n1 2 high\n",
     "_rlnAutopickFigureOfMerit in row 1 is 'high'"),
    ("no_names.star", "data_particles\nloop_\n_rlnImageName\n_rlnCoordinateX\n_rlnCoordinateY\n1@a.mrcs 1 2\n",
     "no _rlnMicrographName"),
    ("junk.star", "this is not a star file\n", "no data block"),
    ("empty.star", "", "file is empty"),
    ("empty.box", "\n  \n", "file is empty"),
    ("empty.txt", "", "file is empty"),
    ("three.box", "1 2 64 64\n1 2 64\n", "line 2 has 3 column(s)"),
    ("text.box", "1 2 64 sixty\n", "line 1: height 'sixty' is not a number"),
    ("one_col.txt", "# x y\n12\n", "line 2 does not start with two coordinates"),
    ("text.txt", "1 2\nabc 4\n", "line 2: x 'abc' is not a number"),
    ("nan.txt", "1 nan\n", "line 1: y is nan, not a finite number"),
    ("csv_gap.csv", "1,,3\n", "line 1 does not start with two coordinates"),
    ("ctffind.txt", "# Output from CTFFind version 4.1.14, run on 2023-02-02 15:13:07\n"
                    "1.000000 9982.502930 9982.502930 0.000000 0.035256 0.565683 1.980663\n",
     "is a CTFFIND output"),
    ("nested.star", "data_coordinate_files\nloop_\n_rlnMicrographName\n_rlnMicrographCoordinates\n"
                    "mic.mrc nested.star\n", "lists inside lists are not supported"),
    ("binary.box", b"\x00\x01\x02MAP \x00", "binary file"),
]


@pytest.mark.parametrize("name, content, problem", BAD, ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, monkeypatch, name, content, problem):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError) as e:
        read_coordinates(f)
    msg = str(e.value)
    assert "\n" not in msg and problem in msg, msg
    # the nested list names the listed file it was reading (the same file here)
    assert msg.startswith(f"{f}: ")


@pytest.mark.interop
def test_not_a_coordinate_file_and_missing(shared_data, tmp_path):
    ctf = shared_data / "em-testdata/micrographs_ctf.star"
    with pytest.raises(InputError, match=r"micrographs_ctf\.star: not a coordinate file: no table with "
                                         r"_rlnCoordinateX and _rlnCoordinateY \(blocks: data_optics, "
                                         r"data_micrographs\)"):
        read_coordinates(ctf)
    with pytest.raises(InputError, match="nope.star: file not found"):
        read_coordinates(tmp_path / "nope.star")
