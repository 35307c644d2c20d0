"""The ``find-ctf`` job end to end: simulated micrographs in a project, outputs, ranks, bad input."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cistem_mpi.cli import main
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.simulate import simulate_micrographs
from cistem_mpi.io.ctf_estimates import read_ctf_estimates
from cistem_mpi.io.ctffind_output import read_ctffind_avrot
from cistem_mpi.io.mrc import write_mrc
from helpers_jobs import db_dump

CLI = [sys.executable, "-m", "cistem_mpi"]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
PX = 1.5


def _run(args, timeout=600):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A project with 3 simulated 1024² micrographs (known CTF) imported as images."""
    base = tmp_path_factory.mktemp("findctf")
    sim = simulate_micrographs(base / "sim", n_micrographs=3, shape=(1024, 1024), pixel_size=PX,
                               defocus_mean=15000.0, defocus_spread=8000.0, astigmatism=800.0, exposure=40.0,
                               seed=1, n_per_micrograph=10)
    root = base / "proj"
    Project.create(root).close()
    assert main(["import", "images", "-p", str(root), "--pixel-size", str(PX)] + [str(m) for m in sim.micrographs]) == 0
    return sim, root


def _copy(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest)
    return dest


def _estimates(root: Path) -> list[sqlite3.Row]:
    with Project.open(root, readonly=True) as p:
        return list(p.conn.execute("SELECT e.*, i.name AS image_name FROM ctf_estimates e "
                                   "JOIN images i ON i.id = e.image_id ORDER BY e.id"))


def _job_result(root: Path) -> dict:
    with Project.open(root, readonly=True) as p:
        row = p.conn.execute("SELECT result FROM jobs WHERE type = 'find_ctf' ORDER BY id DESC LIMIT 1").fetchone()
        return json.loads(row["result"])


def test_job_fits_every_image_and_writes_ctffind_files(imported, tmp_path):
    sim, root = imported
    proj = _copy(root, tmp_path / "p")
    assert main(["find-ctf", "-p", str(proj), "--poor-fit-resolution", "2.9"]) == 0
    rows = _estimates(proj)
    assert len(rows) == 3
    for row, truth in zip(rows, sim.ctf):
        t1, t2, ta = float(truth[0]), float(truth[1]), float(truth[2])
        if t1 < t2:
            t1, t2, ta = t2, t1, ta + 90
        assert abs(row["df1"] - t1) < max(0.01 * t1, 50) and abs(row["df2"] - t2) < max(0.01 * t2, 50)
        if t1 - t2 > 200:
            assert abs((row["angast"] - ta + 90) % 180 - 90) < 5
        assert row["poor_fit"] == int(row["fit_resolution"] > 2.9)
        assert row["tilt_angle"] is None and row["thickness"] is None
        # ctffind's .txt, read back by the CTFFIND reader of `import ctf`
        txt = proj / row["output_path"]
        est = read_ctf_estimates(txt)
        assert len(est) == 1
        e = est[0]
        assert e.micrograph == f"{row['image_name']}.mrc"
        for a, b in ((e.df1, row["df1"]), (e.df2, row["df2"]), (e.angast, row["angast"]),
                     (e.pshift, row["pshift"]), (e.score, row["score"]), (e.fit_resolution, row["fit_resolution"])):
            assert a == pytest.approx(b, abs=2e-6 * max(1.0, abs(b)))
        assert len(txt.read_text().splitlines()[-1].split()) == 10  # ctffind5's columns
        av = read_ctffind_avrot(proj / row["avrot_path"])
        assert av.shape[0] == 6 and np.isfinite(av).all() and np.all(np.diff(av[0]) > 0)
        png = proj / row["diagnostic_path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the project-wide RELION export
    star = proj / "Assets/CTF/micrographs_ctf.star"
    got = read_ctf_estimates(star)
    assert [Path(g.micrograph).stem for g in got] == [row["image_name"] for row in rows]
    assert [g.df1 for g in got] == pytest.approx([row["df1"] for row in rows])
    res = _job_result(proj)
    assert res["ctf_estimates"] == 3 and res["failed"] == 0
    assert sum(res["defocus_histogram"]["counts"]) == 3 and sum(res["fit_resolution_histogram"]["counts"]) == 3
    assert res["poor_fits"] == sum(row["poor_fit"] for row in rows)
    assert (proj / res["summary_png"]).is_file()
    # no staged leftovers
    assert not list((proj / "Assets/CTF").glob(".*part"))

    # a second run adds the newest estimates under new names, the old files stay
    assert main(["find-ctf", "-p", str(proj), "--images", rows[0]["image_name"], "--phase-plate", "--tilt"]) == 0
    rows2 = _estimates(proj)
    assert len(rows2) == 4 and rows2[-1]["output_path"] != rows[0]["output_path"]
    new = rows2[-1]
    assert new["tilt_angle"] is not None and 0 <= new["tilt_angle"] < 10  # the simulated specimen is flat
    cols = (proj / new["output_path"]).read_text().splitlines()[-1].split()
    assert float(cols[7]) == pytest.approx(new["tilt_axis"], abs=1e-5)
    assert float(cols[8]) == pytest.approx(new["tilt_angle"], abs=1e-5)
    assert (proj / rows[0]["output_path"]).is_file()
    assert rows2[-1]["output_path"].endswith("_ctf_2.txt")
    assert len(read_ctf_estimates(proj / "Assets/CTF/micrographs_ctf.star")) == 3


@pytest.mark.mpi
def test_one_and_three_ranks_bit_identical(imported, tmp_path):
    if MPIEXEC is None:
        pytest.skip("mpiexec not found")
    _, root = imported
    out = {}
    for n in (1, 3):
        proj = _copy(root, tmp_path / f"p{n}")
        cmd = CLI + ["find-ctf", "-p", str(proj), "--box", "256"]
        if n > 1:
            cmd = [MPIEXEC, "-n", str(n)] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        rows = _estimates(proj)
        out[n] = ([tuple(row[k] for k in ("image_id", "df1", "df2", "angast", "pshift", "score", "fit_resolution"))
                   for row in rows],
                  [(proj / row["avrot_path"]).read_text().splitlines()[5:] for row in rows])
        with Project.open(proj, readonly=True) as p:
            assert p.conn.execute("SELECT ranks FROM jobs WHERE type = 'find_ctf'").fetchone()[0] == n
    assert out[1] == out[3]


def _bad_project(tmp_path, image: np.ndarray, px: float = PX, name: str = "bad") -> tuple[Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "proj"
    if not root.exists():
        Project.create(root).close()
    path = tmp_path / f"{name}.mrc"
    write_mrc(path, image.astype(np.float32), px)
    assert main(["import", "images", "-p", str(root), "--pixel-size", str(px), str(path)]) == 0
    return root, path


@pytest.mark.parametrize("case", ["small", "nan", "nyquist", "voltage0", "defocus_range", "resolution_range"])
def test_bad_input_one_line_naming_the_file(tmp_path, capfd, case):
    size = 400 if case == "small" else 600
    img = np.random.default_rng(0).poisson(50, size=(size, size)).astype(np.float32)
    extra: list[str] = []
    if case == "nan":
        img = img.copy()
        img[10, 10] = np.nan
        extra = ["--box", "256"]
    root, path = _bad_project(tmp_path, img)
    if case == "nyquist":
        extra = ["--max-resolution", "2.5"]
    elif case == "voltage0":
        with Project.open(root) as p:
            p.conn.execute("UPDATE images SET voltage = 0")
    elif case == "defocus_range":
        extra = ["--min-defocus", "20000", "--max-defocus", "20000"]
    elif case == "resolution_range":
        extra = ["--min-resolution", "5", "--max-resolution", "8"]
    before = db_dump(root)
    capfd.readouterr()
    code = main(["find-ctf", "-p", str(root)] + extra)
    err = capfd.readouterr().err
    assert code == 2, (code, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    named = {"small": str(path), "nan": str(path), "nyquist": str(path), "voltage0": str(path),
             "defocus_range": "--min-defocus", "resolution_range": "--min-resolution"}[case]
    assert named in lines[0] or Path(named).name in lines[0], lines[0]
    assert {"small": "smaller than the tile box", "nan": "NaN", "nyquist": "Nyquist", "voltage0": "0 kV",
            "defocus_range": "not below", "resolution_range": "not a lower resolution"}[case] in lines[0]
    assert db_dump(root) == before  # nothing registered, no job record left


def test_image_without_a_fit_is_skipped_and_reported(imported, tmp_path, capfd):
    sim, _ = imported
    noise = np.random.default_rng(3).poisson(90, size=(1024, 1024)).astype(np.float32)
    root, noise_path = _bad_project(tmp_path, noise, name="noise")
    good = tmp_path / "good.mrc"
    shutil.copy(sim.micrographs[0], good)
    assert main(["import", "images", "-p", str(root), "--pixel-size", str(PX), str(good)]) == 0
    capfd.readouterr()
    assert main(["find-ctf", "-p", str(root)]) == 0
    err = capfd.readouterr().err
    assert "skipped noise" in err and "no CTF fit inside the range" in err
    rows = _estimates(root)
    assert [row["image_name"] for row in rows] == ["good"]
    res = _job_result(root)
    assert res["failed"] == 1 and res["failures"][0]["name"] == "noise"
    assert not list((root / "Assets/CTF").glob("noise*"))
    # every image without a fit: the job fails with one line naming the file, nothing registered
    root2, _ = _bad_project(tmp_path / "only", noise, name="noise")
    before = db_dump(root2)
    capfd.readouterr()
    assert main(["find-ctf", "-p", str(root2)]) == 2
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].count("no CTF fit") == 1 and "noise.mrc" in lines[0]
    assert db_dump(root2) == before


def test_slurm_array_mode_gives_the_same_estimates(imported, tmp_path):
    _, root = imported
    plain = _copy(root, tmp_path / "plain")
    arr = _copy(root, tmp_path / "arr")
    assert main(["find-ctf", "-p", str(plain), "--box", "256"]) == 0
    d = tmp_path / "array"
    assert main(["find-ctf", "-p", str(arr), "--box", "256", "--array-prepare", str(d)]) == 0
    for task in (0, 1):
        assert main(["find-ctf", "-p", str(arr), "--array-run", str(d), "--array-task", str(task),
                     "--array-count", "2"]) == 0
    assert main(["find-ctf", "-p", str(arr), "--array-merge", str(d)]) == 0
    keys = ("image_id", "df1", "df2", "angast", "pshift", "score", "fit_resolution", "output_path")
    a = [tuple(r[k] for k in keys) for r in _estimates(plain)]
    b = [tuple(r[k] for k in keys) for r in _estimates(arr)]
    assert a == b and len(a) == 3
    for r in _estimates(arr):
        assert (arr / r["output_path"]).is_file() and (arr / r["diagnostic_path"]).is_file()


def test_unweighted_sum_is_fitted_when_there_is_one(imported, tmp_path):
    """align-movies' sum without dose weighting (images.unweighted_path) is the better spectrum: it is used."""
    sim, root = imported
    proj = _copy(root, tmp_path / "p")
    other = proj / "other_unweighted.mrc"
    shutil.copy(sim.micrographs[2], other)  # a different defocus, to see which file was fitted
    with Project.open(proj) as p:
        first = p.conn.execute("SELECT id, name FROM images ORDER BY id LIMIT 1").fetchone()
        p.conn.execute("UPDATE images SET unweighted_path = ? WHERE id = ?", (p.store_path(other), first["id"]))
    assert main(["find-ctf", "-p", str(proj), "--images", first["name"], "--box", "256"]) == 0
    assert main(["find-ctf", "-p", str(proj), "--images", first["name"], "--box", "256", "--use-weighted"]) == 0
    unweighted, weighted = _estimates(proj)
    for row, truth in ((unweighted, sim.ctf[2]), (weighted, sim.ctf[0])):
        mean = 0.5 * (truth[0] + truth[1])
        assert abs(0.5 * (row["df1"] + row["df2"]) - mean) < 0.01 * mean


def test_exported_txt_imports_back_as_the_same_estimate(imported, tmp_path):
    """`import ctf` of find-ctf's own .txt and .star gives the same numbers for the same images."""
    _, root = imported
    proj = _copy(root, tmp_path / "p")
    assert main(["find-ctf", "-p", str(proj), "--box", "256"]) == 0
    fitted = _estimates(proj)
    txts = [str(proj / r["output_path"]) for r in fitted]
    assert main(["import", "ctf", "-p", str(proj)] + txts) == 0
    assert main(["import", "ctf", "-p", str(proj), str(proj / "Assets/CTF/micrographs_ctf.star")]) == 0
    rows = _estimates(proj)
    assert len(rows) == 9
    for k in (3, 6):
        for a, b in zip(fitted, rows[k:k + 3]):
            assert a["image_id"] == b["image_id"]
            for key in ("df1", "df2", "angast", "fit_resolution", "score"):
                assert b[key] == pytest.approx(a[key], abs=2e-6 * max(1.0, abs(a[key])))


def test_fit_resolution_never_finer_than_nyquist_at_3_angstrom_pixels(tmp_path):
    """3 Å/px (Nyquist 6 Å), ``--max-resolution 8``: the Thon rings stay good to the edge of the spectrum.

    The FRC's bins run out to the spectrum's corner (sqrt 2 x Nyquist); the fit resolution used to be
    reported from the last of them, 4.25 Å, for every image.  It must stop at Nyquist (issue #11: never
    better than the information limit, which here is past Nyquist: B = 50 Å²).
    """
    px = 3.0
    sim = simulate_micrographs(tmp_path / "sim", n_micrographs=1, shape=(1024, 1024), pixel_size=px,
                               defocus_mean=15000.0, defocus_spread=0.0, astigmatism=300.0, exposure=40.0,
                               seed=4, n_per_micrograph=10)
    root = tmp_path / "proj"
    Project.create(root).close()
    assert main(["import", "images", "-p", str(root), "--pixel-size", str(px)] + [str(m) for m in sim.micrographs]) == 0
    assert main(["find-ctf", "-p", str(root), "--max-resolution", "8"]) == 0
    (row,) = _estimates(root)
    assert abs(0.5 * (row["df1"] + row["df2"]) - 0.5 * float(sim.ctf[0][0] + sim.ctf[0][1])) < 150
    assert row["fit_resolution"] >= 2.0 * px  # Nyquist of the fitted spectrum (no resampling at 3 Å)
    assert row["fit_resolution"] < 2.0 * px * 1.05  # and the good fit does reach it
    # the ctffind .txt carries the same number
    est = read_ctf_estimates(root / row["output_path"])
    assert est[0].fit_resolution >= 2.0 * px
