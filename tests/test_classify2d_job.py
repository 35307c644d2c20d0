"""classify-2d as a job: registration, outputs, selection, bad input, ranks (small simulated data sets)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cistem_mpi.db import classification as cdb
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.simulate import simulate_particles
from cistem_mpi.io.param_store import read_params_column, read_params_h5
from cistem_mpi.kernels import classify2d as c2
from helpers_jobs import db_dump

CLI = [sys.executable, "-m", "cistem_mpi"]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
#: 8 well-separated views (theta, phi) of 8ZPM
VIEWS = np.array([[0, 0], [90, 0], [90, 90], [45, 45], [135, 45], [60, 160], [120, 250], [30, 300]], float)
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def view_particles(out: Path, n: int, box: int = 64, pixel_size: float = 2.5, snr: float = 0.05, seed: int = 3,
                   n_views: int = 8):
    """Particles of ``n_views`` views with random in-plane angles and shifts; returns (sim, true view)."""
    rng = np.random.default_rng(seed + 100)
    true = rng.integers(0, n_views, n)
    ang = np.stack([rng.uniform(0, 360, n), VIEWS[true, 0], VIEWS[true, 1]], axis=1)
    sim = simulate_particles(out, n_particles=n, box=box, pixel_size=pixel_size, snr=snr, seed=seed, angles=ang,
                             max_shift=5.0)
    return sim, true


def project_from(tmp: Path, stack: Path, par: Path, pixel_size: float) -> Path:
    root = tmp / "proj"
    Project.create(root).close()
    r = subprocess.run(CLI + ["import", "particles", "-p", str(root), str(stack), "--pixel-size", str(pixel_size),
                              "--params", str(par)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    return root


def run(args: list[str], ranks: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = CLI + args
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def final_classes(root: Path) -> tuple[int, np.ndarray, list]:
    with Project.open(root, readonly=True) as p:
        row = p.conn.execute("SELECT * FROM classifications_2d ORDER BY number DESC").fetchone()
        cls = read_params_column(p.resolve(row["params_path"]), "class_2d")
        return int(row["number"]), np.asarray(cls), [dict(r) for r in cdb.class_rows(p.conn, row["number"])]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp("c2d")
    sim, true = view_particles(base / "data", 160, box=48, pixel_size=3.0, snr=0.2, n_views=4)
    return project_from(base, sim.stack, sim.par, 3.0), sim, true


FAST = ["--classes", "4", "--rounds", "3", "--all-particles-rounds", "1", "--start-resolution", "30",
        "--finish-resolution", "15", "--mask-radius", "55", "--search-range", "9"]


def test_job_registers_every_round_with_its_outputs(small, tmp_path):
    root0, sim, true = small
    root = tmp_path / "p"
    shutil.copytree(root0, root)
    r = run(["classify-2d", "-p", str(root)] + FAST)
    assert r.returncode == 0, r.stderr
    assert "automatic ranking" in r.stderr and "--select auto" in r.stderr
    with Project.open(root, readonly=True) as p:
        rows = p.conn.execute("SELECT * FROM classifications_2d ORDER BY number").fetchall()
        assert [x["number"] for x in rows] == [1, 2, 3] and [x["iteration"] for x in rows] == [1, 2, 3]
        assert rows[0]["parent_id"] is None and rows[1]["parent_id"] == rows[0]["id"]
        assert [x["resolution_limit"] for x in rows] == pytest.approx([30.0, 22.5, 15.0])
        for x in rows:
            assert x["path"] == f"Assets/ClassAverages/class_averages_{x['number']:04d}.mrc"
            with mrcfile.open(p.resolve(x["path"])) as m:
                assert m.data.shape == (4, 48, 48) and float(m.voxel_size.x) == pytest.approx(3.0)
                assert np.all(np.isfinite(m.data))
            assert p.resolve(x["path"]).with_suffix(".png").is_file()
            params = read_params_h5(p.resolve(x["params_path"]))
            cls = read_params_column(p.resolve(x["params_path"]), "class_2d")
            assert len(params) == len(cls) == 160 and set(np.unique(cls)) <= {1, 2, 3, 4}
            for col in ("psi", "shx", "shy", "logp", "sigma", "occ", "score"):
                assert np.all(np.isfinite(params[col]))
            assert np.all((params["occ"] >= 0) & (params["occ"] <= 100.0001))
            stem = p.resolve(x["params_path"]).with_suffix("")
            data = Path(f"{stem}_data.star").read_text()
            assert "rlnClassNumber" in data and "rlnAnglePsi" in data
            model = Path(f"{stem}_model.star").read_text()
            assert "data_model_classes" in model and f"000004@class_averages_{x['number']:04d}.mrc" in model
            classes = cdb.class_rows(p.conn, x["number"])
            assert sorted(c["rank"] for c in classes) == [1, 2, 3, 4]
            assert sum(c["population"] for c in classes) == 160
        # no staged leftovers
        assert not list((root / "Assets").rglob(".*.part"))
    assert list((root / "Scratch" / "Refine2DScratch" / "Startup").glob("startup_classes_job_*.mrc"))
    # the chosen classes feed package create (by number and by the automatic selection)
    number, cls, ranking = final_classes(root)
    chosen = [c["class_number"] for c in ranking if c["selected"]]
    r = run(["package", "create", "-p", str(root), "--from-classification", str(number), "--select", "auto"])
    assert r.returncode == 0, r.stderr
    with Project.open(root, readonly=True) as p:
        pkg = p.conn.execute("SELECT * FROM refinement_packages ORDER BY id DESC").fetchone()
        assert pkg["n_particles"] == int(np.isin(cls, chosen).sum())


def test_bad_input_is_one_clear_error_and_changes_nothing(small, tmp_path):
    root0, sim, true = small
    root = tmp_path / "p"
    shutil.copytree(root0, root)
    Project.open(root).close()  # a copied project records its new place on first open

    def tables() -> list[str]:  # (rows of earlier jobs' records may be refreshed, e.g. liveness)
        dump = db_dump(root)
        return [ln for ln in dump if not ln.startswith('INSERT INTO "jobs"')] + [str(len(dump))]

    before = tables()
    for extra, word in ((["--classes", "500"], "--classes"), (["--mask-radius", "100"], "--mask-radius"),
                        (["--finish-resolution", "5"], "Nyquist"), (["--start-resolution", "4"], "Nyquist")):
        r = run(["classify-2d", "-p", str(root)] + extra)
        assert r.returncode == 2, (extra, r.stderr)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and word in lines[0], r.stderr
    assert tables() == before


def test_an_empty_class_is_reseeded_from_the_largest():
    from cistem_mpi.drivers.classify_2d import class_averages

    rng = np.random.default_rng(0)
    k, m, n = 3, 16, 32
    num, den = c2.new_sums(k, m)
    num[:, 0] = rng.normal(size=(2, m, m // 2 + 1))
    num[:, 1] = 5 * rng.normal(size=(2, m, m // 2 + 1))
    den[:, :2] = 1.0
    s = c2.ClassifySettings(n=n, m=m, pixel_size=3.0, mask_radius=12, mask_edge=3, low_resolution=300,
                            search_range=3, shift_sigma=3, psi_step=0)

    class Log:
        def info(self, *a):
            self.msg = a

    plan = {"n_classes": k, "auto_centre": False}
    out = class_averages(plan, s, {"num": num, "den": den, "pop": np.array([40.0, 60.0, 0.0])}, 100, Log())
    assert out["reseeded"] == [3]
    assert out["pop_soft"][2] == out["pop_soft"][1] == 30.0
    assert np.abs(out["images"][2]).max() > 0
    assert not np.allclose(out["images"][2], out["images"][1])  # the two half sets differ: they can separate


@pytest.mark.mpi
def test_same_classes_from_1_and_3_ranks(small, tmp_path):
    if MPIEXEC is None:
        pytest.skip("mpiexec not found")
    root0, sim, true = small
    out = {}
    for ranks in (1, 3):
        root = tmp_path / f"p{ranks}"
        shutil.copytree(root0, root)
        r = run(["classify-2d", "-p", str(root)] + FAST, ranks=ranks)
        assert r.returncode == 0, r.stderr
        number, cls, _ = final_classes(root)
        with Project.open(root, readonly=True) as p:
            row = cdb.classification_by_number(p.conn, number)
            params = read_params_h5(p.resolve(row["params_path"]))
            avg = mrcfile.read(p.resolve(row["path"]))
        out[ranks] = (cls, params, avg)
    # every particle is classified by the same code whatever rank gets it; the class sums are added in
    # another order (float rounding), so the next round's references differ in the last bits only
    assert np.array_equal(out[1][0], out[3][0])
    assert np.allclose(out[1][1]["psi"], out[3][1]["psi"], atol=1e-3)
    scale = np.abs(out[1][2]).max()
    assert np.abs(out[1][2] - out[3][2]).max() <= 1e-4 * scale
