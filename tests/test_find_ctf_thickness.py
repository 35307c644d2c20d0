"""``find-ctf --thickness`` and ``--from-frames`` as jobs: database, ctffind files, job result, fall-backs, truth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cistem_mpi.cli import main
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.simulate import simulate_micrographs, simulate_movies
from cistem_mpi.io.ctf_estimates import read_ctf_estimates
from cistem_mpi.io.ctffind_output import read_ctffind_avrot

PX = 1.5
KEYS = ("image_id", "df1", "df2", "angast", "pshift", "score", "fit_resolution")


def _tol(d: float) -> float:
    return max(0.01 * d, 50.0)


def _estimates(root: Path) -> list:
    with Project.open(root, readonly=True) as p:
        return list(p.conn.execute("SELECT * FROM ctf_estimates ORDER BY id"))


def _result(root: Path) -> dict:
    with Project.open(root, readonly=True) as p:
        row = p.conn.execute("SELECT result FROM jobs WHERE type = 'find_ctf' ORDER BY id DESC LIMIT 1").fetchone()
        return json.loads(row["result"])


@pytest.fixture(scope="module")
def thick(tmp_path_factory):
    """One simulated 2000 Å thick sample (the CTF integrated over the slab), imported as an image."""
    base = tmp_path_factory.mktemp("thick")
    sim = simulate_micrographs(base / "sim", n_micrographs=1, shape=(1024, 1024), pixel_size=PX,
                               defocus_mean=15000.0, defocus_spread=5000.0, astigmatism=500.0, exposure=40.0, seed=20,
                               n_per_micrograph=10, thickness_angstrom=2000.0)
    root = base / "proj"
    Project.create(root).close()
    assert main(["import", "images", "-p", str(root), "--pixel-size", str(PX), str(sim.micrographs[0])]) == 0
    return sim, root


def test_thickness_job_writes_the_column_the_txt_and_the_summary(thick, tmp_path):
    sim, root = thick
    proj = tmp_path / "p"
    shutil.copytree(root, proj)
    assert main(["find-ctf", "-p", str(proj), "--thickness"]) == 0
    (row,) = _estimates(proj)
    d1, d2 = float(max(sim.ctf[0][:2])), float(min(sim.ctf[0][:2]))
    # against the truth: thickness within 15 %, defocus within the bounds
    assert abs(row["thickness"] - 2000.0) < 300.0
    assert abs(row["df1"] - d1) < _tol(d1) and abs(row["df2"] - d2) < _tol(d2)
    # ctffind5's column 10 in the .txt, read back by `import ctf`'s reader for the other columns
    cols = (proj / row["output_path"]).read_text().splitlines()[-1].split()
    assert len(cols) == 10 and float(cols[9]) == pytest.approx(row["thickness"], abs=1e-5)
    est = read_ctf_estimates(proj / row["output_path"])[0]
    assert est.df1 == pytest.approx(row["df1"], abs=1e-5)
    # the _avrot fit row is the slab model (0..1)
    av = read_ctffind_avrot(proj / row["avrot_path"])
    assert av.shape[0] == 6 and np.isfinite(av).all() and 0.0 <= av[3].min() and av[3].max() <= 1.0
    res = _result(proj)
    assert res["median_thickness"] == pytest.approx(row["thickness"])
    assert sum(res["thickness_histogram"]["counts"]) == 1


def test_bad_thickness_options_one_line(thick, capfd):
    _, root = thick
    for extra, named in ((["--thickness-resolution", "3", "30"], "--thickness-resolution"),
                         (["--thickness-range", "3000", "1000"], "--thickness-range"),
                         (["--from-frames", "0"], "--from-frames")):
        capfd.readouterr()
        assert main(["find-ctf", "-p", str(root), "--thickness", *extra]) == 2
        lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and named in lines[0]


def test_from_frames_falls_back_to_the_image_without_a_movie(thick, tmp_path, capfd):
    """An imported micrograph has no movie: fitted from the image (the same numbers), with a warning."""
    _, root = thick
    proj = tmp_path / "p"
    shutil.copytree(root, proj)
    assert main(["find-ctf", "-p", str(proj), "--box", "256"]) == 0
    capfd.readouterr()
    assert main(["find-ctf", "-p", str(proj), "--box", "256", "--from-frames"]) == 0
    err = capfd.readouterr().err
    assert "fitted from the image, not its frames: no movie" in err
    a, b = _estimates(proj)
    assert tuple(a[k] for k in KEYS) == tuple(b[k] for k in KEYS)
    # without --thickness: no thickness in the row, 0 in ctffind's column 10, none in the result
    assert a["thickness"] is None and float((proj / a["output_path"]).read_text().split()[-1]) == 0.0
    res = _result(proj)
    assert "median_thickness" not in res
    assert res["from_frames"] == 3 and res["fitted_from_frames"] == 0 and len(res["fitted_from_image"]) == 1


def _movie_project(base: Path, epf: float, frames: int, local: float, seed: int):
    sim = simulate_movies(base / "sim", 2, (1024, 1024), frames, epf, PX, seed=seed, formats=("tiff",),
                          n_per_micrograph=10, defocus_mean=15000, defocus_spread=6000, astigmatism=400,
                          local_motion_px=local, drift_total_px=6.0, ice_phase_sigma=0.08)
    root = base / "proj"
    Project.create(root).close()
    assert main(["import", "movies", "-p", str(root), *map(str, sim.movies["tiff"]), "--pixel-size", str(PX),
                 "--dose-per-frame", str(epf), "--gain", str(sim.gain)]) == 0
    assert main(["align-movies", "-p", str(root)]) == 0
    return sim, root


def _errors(rows, sim) -> list[float]:
    out = []
    for r, t in zip(rows, sim.ctf):
        out += [abs(r["df1"] - max(t[0], t[1])), abs(r["df2"] - min(t[0], t[1]))]
    return out


@pytest.mark.slow
def test_from_frames_against_truth_on_simulated_movies(tmp_path, capsys):
    """Low-dose movies (20 frames of 1.5 e/Å², 1024², drifting): fits from 3-frame sums against the truth.

    * ``--from-frames`` (3-frame sums): DF1 and DF2 within the issue's bounds;
    * ``--from-frames 20`` (one sum of every frame, moved by the recorded
      shifts) reproduces the fit of align-movies' unweighted sum: the
      frames are read, gain-corrected and shifted as align-movies does.

    The errors of the aligned sum and of the 3-frame sums are printed: with
    exact trajectories the aligned sum is the better spectrum (it keeps the
    cross terms between groups; here its errors were 57/45/27/64 Å against
    74/51/119/27 Å).
    """
    sim, root = _movie_project(tmp_path, 1.5, 20, 0.0, 5)
    assert main(["find-ctf", "-p", str(root)]) == 0
    assert main(["find-ctf", "-p", str(root), "--from-frames"]) == 0
    assert main(["find-ctf", "-p", str(root), "--from-frames", "20"]) == 0
    rows = _estimates(root)
    summed, framed, whole = rows[:2], rows[2:4], rows[4:]
    res = _result(root)
    assert res["fitted_from_frames"] == 2 and res["fitted_from_image"] == []
    e_sum, e_frames = _errors(summed, sim), _errors(framed, sim)
    with capsys.disabled():
        print("\ndefocus errors (Å): aligned sum", [round(e) for e in e_sum], "3-frame sums",
              [round(e) for e in e_frames])
    bounds = [_tol(max(t[0], t[1])) for t in sim.ctf for _ in (0, 1)]
    assert all(e < b for e, b in zip(e_frames, bounds)), (e_frames, bounds)
    for a, b in zip(summed, whole):
        assert abs(a["df1"] - b["df1"]) < 20 and abs(a["df2"] - b["df2"]) < 20
    assert "num. frames averaged: 3" in (root / framed[0]["avrot_path"]).read_text()
