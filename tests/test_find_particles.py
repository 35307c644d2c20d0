"""``find-particles`` as a job: positions in the database, exports, ranks, poor fits, bad input."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cistem_mpi.cli import main
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.simulate import simulate_micrographs
from cistem_mpi.io.coordinates import read_coordinates
from cistem_mpi.io.ctf_estimates import write_relion_ctf_star
from helpers_jobs import db_dump
from runtime_helpers import mpi_cli, run

PS = 3.0
PICK = ["--characteristic-radius", "72.5", "--maximum-radius", "100", "--highest-resolution", "10",
        "--edge", "32", "--threshold", "4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two realistic micrographs (512^2, 3 Å/px) imported with their true CTF (as ``import ctf`` of the truth)."""
    b = tmp_path_factory.mktemp("fp")
    sim = simulate_micrographs(b / "data", n_micrographs=2, shape=(512, 512), n_per_micrograph=12, pixel_size=PS,
                               exposure=50.0, seed=21, physics="realistic", defocus_mean=17500,
                               defocus_spread=2000, astigmatism=200, contamination=1,
                               contamination_radius=(150, 250), ice_thickness=250)
    names = [p.stem for p in sim.micrographs]
    write_relion_ctf_star(b / "ctf.star", [f"{n}.mrc" for n in names], sim.ctf[:, 0], sim.ctf[:, 1],
                          sim.ctf[:, 2], sim.ctf[:, 3], pixel_size=PS, voltage=300.0, cs=2.7,
                          amplitude_contrast=0.07)
    root = b / "proj"
    assert main(["project", "create", str(root)]) == 0
    assert main(["import", "images", "-p", str(root), "--pixel-size", str(PS), *map(str, sim.micrographs)]) == 0
    bare = b / "bare"  # images, no CTF
    shutil.copytree(root, bare)
    Project.open(bare).close()
    assert main(["import", "ctf", "-p", str(root), str(b / "ctf.star")]) == 0
    return {"sim": sim, "root": root, "bare": bare, "b": b}


@pytest.fixture
def project(base, tmp_path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(base["root"], dst)
    Project.open(dst).close()
    return dst


def _job_result(root: Path) -> dict:
    with Project.open(root, readonly=True) as p:
        row = p.conn.execute("SELECT result FROM jobs WHERE type = 'find_particles' ORDER BY id DESC").fetchone()
        return json.loads(row[0])


def _positions(root: Path) -> list[tuple]:
    with Project.open(root, readonly=True) as p:
        return [tuple(r) for r in p.conn.execute(
            "SELECT i.name, p.x, p.y, p.peak FROM particle_positions p JOIN images i ON i.id = p.image_id "
            "ORDER BY p.id")]


def test_picks_are_positions_in_angstrom_with_star_box_png_exports(project, base):
    sim = base["sim"]
    assert main(["find-particles", "-p", str(project), *PICK]) == 0
    rows = _positions(project)
    res = _job_result(project)
    assert res["positions"] == len(rows) > 0 and res["mode"] == "template-free"
    assert set(res["picks_per_image"]) == {"micrograph_0001", "micrograph_0002"}
    # the threshold report counts picks at each threshold; the count at 4 sigma is what was registered
    for name, rep in res["threshold_report"].items():
        counts = dict((t, n) for t, n in rep)
        assert counts[4.0] == res["picks_per_image"][name]
        assert all(a >= b for a, b in zip([n for _, n in rep], [n for _, n in rep][1:]))
    assert sum(res["score_histogram"]["counts"]) >= len(rows)
    # picks are at true particles (Å from the first pixel) ...
    for k, name in enumerate(["micrograph_0001", "micrograph_0002"]):
        xy = np.array([(x, y) for n, x, y, _ in rows if n == name])
        true = sim.positions[k] * PS
        if len(xy):
            d = np.sqrt(((xy[:, None] - true[None]) ** 2).sum(-1)).min(1)
            assert np.mean(d < 40.0) >= 0.8
        # ... and the RELION coordinate file / .box hold the same picks in pixels
        out = Path(res["directory"])
        star = read_coordinates(out / f"{name}_autopick.star")[0]
        np.testing.assert_allclose(np.stack([star.x, star.y], 1) * PS, xy.reshape(-1, 2), atol=1e-4)
        box = read_coordinates(out / f"{name}.box")[0]
        assert np.all(np.abs(np.stack([box.x, box.y], 1) * PS - xy.reshape(-1, 2)) <= 0.5 * PS + 1e-6)
        png = out / f"{name}_picks.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    listed = read_coordinates(Path(res["autopick_star"]))
    assert sum(len(x) for x in listed) == len(rows)
    # no leftover staged files
    assert not list(Path(res["directory"]).glob(".*part"))


def test_picks_feed_package_from_positions(project):
    assert main(["find-particles", "-p", str(project), *PICK]) == 0
    with Project.open(project, readonly=True) as p:
        job = p.conn.execute("SELECT max(id) FROM jobs WHERE type = 'find_particles'").fetchone()[0]
        n = p.conn.execute("SELECT count(*) FROM particle_positions WHERE job_id = ?", (job,)).fetchone()[0]
    assert main(["package", "create", "-p", str(project), "--from-positions", "--box", "64",
                 "--positions-job", str(job)]) == 0
    with Project.open(project, readonly=True) as p:
        assert p.conn.execute("SELECT n_particles FROM particle_stacks").fetchone()[0] == n


def test_one_and_three_ranks_give_identical_picks(project, tmp_path):
    other = tmp_path / "three"
    shutil.copytree(project, other)
    Project.open(other).close()
    assert main(["find-particles", "-p", str(project), *PICK]) == 0
    res = run(mpi_cli(3, "find-particles", "-p", str(other), *PICK), timeout=300)
    assert res.returncode == 0, res.stderr
    one, three = _positions(project), _positions(other)
    assert one == three and len(one) > 0  # bit-identical floats
    a, b = _job_result(project), _job_result(other)
    assert a["threshold_report"] == b["threshold_report"] and a["score_histogram"] == b["score_histogram"]


def test_poor_fits_are_skipped_unless_asked(project):
    with Project.open(project, readonly=True) as p:
        db = p.db_path
    with sqlite3.connect(db) as c:  # test-only: flag image 1's estimate as find-ctf would
        c.execute("UPDATE ctf_estimates SET poor_fit = 1 WHERE image_id = 1")
    assert main(["find-particles", "-p", str(project), *PICK]) == 0
    res = _job_result(project)
    assert res["skipped_poor_fits"] == ["micrograph_0001"] and set(res["picks_per_image"]) == {"micrograph_0002"}
    assert main(["find-particles", "-p", str(project), *PICK, "--include-poor-fits"]) == 0
    assert set(_job_result(project)["picks_per_image"]) == {"micrograph_0001", "micrograph_0002"}


def test_no_picks_is_a_result(project):
    assert main(["find-particles", "-p", str(project), *PICK[:-2], "--threshold", "80"]) == 0
    res = _job_result(project)
    assert res["positions"] == 0 and res["picks_per_image"] == {"micrograph_0001": 0, "micrograph_0002": 0}


def test_bad_input_one_line_and_nothing_recorded(project, base, tmp_path, capsys):
    before = db_dump(project)
    cases = [
        (["--threshold", "0"], "--threshold"),
        (["--threshold", "-1"], "--threshold"),
        (["--maximum-radius", "900", "--characteristic-radius", "80"], "does not fit in image"),
        (["--characteristic-radius", "130", "--maximum-radius", "120"], "--characteristic-radius"),
        (["--images", "nosuch"], "no such image"),
        (["--classification", "5"], "no Classification #5"),
        (["--map", str(tmp_path / "nomap.mrc")], "map file not found"),
        (["--report-thresholds", "4,x"], "--report-thresholds"),
    ]
    for extra, words in cases:
        assert main(["find-particles", "-p", str(project), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert db_dump(project) == before
    # no CTF estimate: names the image and the jobs that make one
    bare_before = db_dump(base["bare"])
    assert main(["find-particles", "-p", str(base["bare"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "micrograph_0001" in err and "find-ctf" in err and "import ctf" in err
    assert db_dump(base["bare"]) == bare_before
    # an empty project
    empty = tmp_path / "empty"
    assert main(["project", "create", str(empty)]) == 0
    capsys.readouterr()
    assert main(["find-particles", "-p", str(empty)]) == 2
    assert "no images" in capsys.readouterr().err


def test_slurm_array_mode_gives_the_same_picks(project, tmp_path):
    other = tmp_path / "arr_proj"
    shutil.copytree(project, other)
    Project.open(other).close()
    assert main(["find-particles", "-p", str(project), *PICK]) == 0
    d = tmp_path / "arr"
    assert main(["find-particles", "-p", str(other), *PICK, "--array-prepare", str(d)]) == 0
    for task in (0, 1):
        assert main(["find-particles", "-p", str(other), *PICK, "--array-run", str(d), "--array-task", str(task),
                     "--array-count", "2"]) == 0
    assert main(["find-particles", "-p", str(other), *PICK, "--array-merge", str(d)]) == 0
    assert _positions(other) == _positions(project)
    res = _job_result(other)
    assert all((Path(res["directory"]) / f"{n}_autopick.star").is_file() for n in res["picks_per_image"])


def test_reference_based_from_a_map_finds_the_particles(project, base, tmp_path):
    from cistem_mpi.drivers.simulate import assembly_map
    from cistem_mpi.io.mrc import write_mrc

    sim = base["sim"]
    m = tmp_path / "map.mrc"
    write_mrc(m, assembly_map(8, 2 * PS), 2 * PS)
    assert main(["find-particles", "-p", str(project), *PICK[:-2], "--threshold", "5", "--map", str(m),
                 "--map-views", "6", "--rotations", "12"]) == 0
    res = _job_result(project)
    assert res["mode"] == "reference" and res["positions"] > 0
    rows = _positions(project)
    good = 0
    for k, name in enumerate(["micrograph_0001", "micrograph_0002"]):
        xy = np.array([(x, y) for n, x, y, _ in rows if n == name]).reshape(-1, 2)
        d = np.sqrt(((xy[:, None] - sim.positions[k][None] * PS) ** 2).sum(-1)).min(1)
        good += int((d < 40.0).sum())
    assert good >= 0.9 * len(rows)
