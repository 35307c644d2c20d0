"""Micrographs -> CTF estimates + particle positions -> refinement package (stack cut out) -> map.

Ground truth: simulated micrographs of PDB 8ZPM with known particle positions,
orientations and per-micrograph CTF.  The CTF estimates are imported from a
RELION ``micrographs_ctf.star`` and the positions from plain ``x y`` files,
as a user would import the results of other programs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cistem_mpi.cli import main
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.simulate import builtin_map, simulate_micrographs
from cistem_mpi.io.ctf_estimates import write_relion_ctf_star
from cistem_mpi.io.mrc import open_stack, read_mrc
from cistem_mpi.io.par import write_par
from cistem_mpi.io.param_store import read_params_h5
from cistem_mpi.kernels.extraction import box_corners, cut_boxes, edge_mean, normalise_boxes, replace_outliers
from cistem_mpi.kernels.fsc import fsc
from helpers_jobs import db_dump
from runtime_helpers import mpi_cli, run

BOX, PIXEL = 64, 2.5
CLI = [sys.executable, "-m", "cistem_mpi"]


@pytest.fixture(scope="module")
def micrographs(tmp_path_factory):
    base = tmp_path_factory.mktemp("mics")
    sim = simulate_micrographs(base / "data", n_micrographs=4, shape=(640, 640), n_per_micrograph=40, box=BOX,
                               pixel_size=PIXEL, exposure=2000.0, seed=3, defocus_mean=12000.0, defocus_spread=3000.0,
                               ice_phase_sigma=0.01)
    names = [p.stem for p in sim.micrographs]
    write_relion_ctf_star(base / "micrographs_ctf.star", [f"MotionCorr/job002/{n}.mrc" for n in names],
                          sim.ctf[:, 0], sim.ctf[:, 1], sim.ctf[:, 2], sim.ctf[:, 3],
                          pixel_size=PIXEL, voltage=300.0, cs=2.7, amplitude_contrast=0.07)
    root = base / "proj"
    assert main(["project", "create", str(root)]) == 0
    assert main(["import", "images", "-p", str(root), *map(str, sim.micrographs)]) == 0
    assert main(["import", "ctf", "-p", str(root), str(base / "micrographs_ctf.star")]) == 0
    assert main(["import", "positions", "-p", str(root), *map(str, sim.coordinates)]) == 0
    return {"sim": sim, "root": root, "base": base}


@pytest.fixture
def project(micrographs, tmp_path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(micrographs["root"], dst)
    Project.open(dst).close()  # records the new place (a moved project), so later dumps compare like with like
    return dst


def _truth_rows(sim):
    """Per particle in stack order (image, then file order): x, y (px), psi, theta, phi."""
    rows = [np.loadtxt(c, ndmin=2) for c in sim.coordinates]
    return np.concatenate(rows)


def test_imported_ctf_and_positions_are_the_truth(micrographs):
    sim = micrographs["sim"]
    with Project.open(micrographs["root"], readonly=True) as p:
        imgs = {r["name"]: r["id"] for r in p.conn.execute("SELECT id, name FROM images")}
        for k, mic in enumerate(sim.micrographs):
            est = p.conn.execute("SELECT * FROM ctf_estimates WHERE image_id = ?", (imgs[mic.stem],)).fetchone()
            np.testing.assert_allclose([est["df1"], est["df2"], est["angast"], est["pshift"]], sim.ctf[k],
                                       rtol=0, atol=0.01)
            pos = np.array(p.conn.execute("SELECT x, y FROM particle_positions WHERE image_id = ? ORDER BY id",
                                          (imgs[mic.stem],)).fetchall())
            np.testing.assert_allclose(pos / PIXEL, sim.positions[k], atol=1e-3)  # stored in Å


def test_package_from_positions_cuts_the_stack_and_carries_ctf_and_shifts(project, micrographs):
    sim = micrographs["sim"]
    assert main(["package", "create", "-p", str(project), "--from-positions", "--box", str(BOX)]) == 0
    with Project.open(project, readonly=True) as p:
        pkg = p.conn.execute("SELECT * FROM refinement_packages").fetchone()
        stack = p.conn.execute("SELECT * FROM particle_stacks WHERE id = ?", (pkg["stack_id"],)).fetchone()
        run_ = p.conn.execute("SELECT max(id) FROM refinements").fetchone()[0]
        members = p.conn.execute("SELECT position, parent_position FROM refinement_package_members "
                                 "WHERE package_id = ? ORDER BY position", (pkg["id"],)).fetchall()
        pos_ids = [r[0] for r in p.conn.execute("SELECT id FROM particle_positions ORDER BY image_id, id")]
        stack_path = p.resolve(stack["path"])
        params = read_params_h5(p.resolve(f"Assets/Parameters/params_{run_}_1.h5"))
    n = sum(len(q) for q in sim.positions)
    assert pkg["n_particles"] == stack["n_particles"] == n and stack["box"] == BOX
    assert [r[1] for r in members] == pos_ids  # parent_position = the particle_positions id
    # every image equals an independent cut of the micrograph (centre pixel = rounded position)
    with open_stack(stack_path) as st:
        got = np.asarray(st[:])
    start = 0
    for k, mic in enumerate(sim.micrographs):
        data, _ = read_mrc(mic)
        img = replace_outliers(data[0] if data.ndim == 3 else data)
        xy = np.loadtxt(sim.coordinates[k], ndmin=2)[:, :2]  # what was imported (3 decimals)
        x0, y0, dx, dy = box_corners(xy[:, 0], xy[:, 1], BOX)
        ref = normalise_boxes(cut_boxes(img, x0, y0, BOX, edge_mean(img)))
        m = len(ref)
        np.testing.assert_array_equal(got[start:start + m], ref)
        sel = slice(start, start + m)
        np.testing.assert_allclose(params["df1"][sel], sim.ctf[k, 0], atol=0.01)
        np.testing.assert_allclose(params["df2"][sel], sim.ctf[k, 1], atol=0.01)
        np.testing.assert_allclose(params["angast"][sel], sim.ctf[k, 2], atol=0.01)
        np.testing.assert_allclose(params["shx"][sel], dx * PIXEL, atol=1e-4)
        np.testing.assert_allclose(params["shy"][sel], dy * PIXEL, atol=1e-4)
        start += m
    assert np.all(params["position"] == np.arange(1, n + 1)) and np.all(params["occ"] == 100)


def test_particles_cut_from_micrographs_reconstruct_the_structure(project, micrographs, tmp_path):
    """True orientations + the package's CTF and shifts -> the map of the structure (signs, centre, CTF)."""
    from cistem_mpi.drivers.reconstruct import ReconstructionSettings, reconstruct_particles
    from cistem_mpi.drivers.runtime import World
    from cistem_mpi.io.params import Optics, ParticleSet

    sim = micrographs["sim"]
    assert main(["package", "create", "-p", str(project), "--from-positions", "--box", str(BOX)]) == 0
    with Project.open(project, readonly=True) as p:
        stack_path = p.resolve(p.conn.execute("SELECT path FROM particle_stacks").fetchone()[0])
        run_ = p.conn.execute("SELECT max(id) FROM refinements").fetchone()[0]
        params = read_params_h5(p.resolve(f"Assets/Parameters/params_{run_}_1.h5"))
    truth = _truth_rows(sim)
    params["psi"], params["theta"], params["phi"] = truth[:, 2], truth[:, 3], truth[:, 4]
    optics = Optics(pixel_size=PIXEL, voltage=300.0, cs=2.7, amplitude_contrast=0.07)
    ref = builtin_map(BOX, PIXEL)

    def shells(par):
        res = reconstruct_particles(World(None), str(stack_path), ParticleSet(params=par, optics=[optics]),
                                    ReconstructionSettings())
        return fsc(res.volume, ref)[1]

    with_shift = shells(params)
    no_shift = params.copy()
    no_shift["shx"] = no_shift["shy"] = 0.0
    without = shells(no_shift)
    band = slice(2, 12)  # 80 Å .. 13 Å
    print("FSC(map, truth) shells 2-11:", np.round(with_shift[band], 3), "without sub-pixel shifts:",
          np.round(without[band], 3))
    # measured: 0.945 0.981 0.976 0.951 0.903 0.895 0.871 (80-20 Å); an inverted or off-centre cut fails this
    assert with_shift[2:9].min() > 0.85
    assert with_shift[band].mean() > without[band].mean()  # keeping the sub-pixel residual helps


def test_extraction_is_the_same_on_three_ranks(project, micrographs, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(project, one)
    assert main(["package", "create", "-p", str(one), "--from-positions", "--box", "48"]) == 0
    res = run(mpi_cli(3, "package", "create", "-p", str(project), "--from-positions", "--box", "48"), timeout=120)
    assert res.returncode == 0, res.stderr
    stacks = []
    for root, ranks in ((one, 1), (project, 3)):
        with Project.open(root, readonly=True) as p:
            path = p.resolve(p.conn.execute("SELECT path FROM particle_stacks").fetchone()[0])
            assert p.conn.execute("SELECT ranks FROM jobs ORDER BY id DESC LIMIT 1").fetchone()[0] == ranks
        with open_stack(path) as st:
            stacks.append((np.asarray(st[:]).copy(), st.header))
    assert np.array_equal(stacks[0][0], stacks[1][0])  # images bit for bit
    assert stacks[0][1].voxel_size == stacks[1][1].voxel_size and stacks[0][1].shape == stacks[1][1].shape


def test_bad_inputs_leave_the_project_as_it_was(project, micrographs, tmp_path):
    before = db_dump(project)
    bad_box = subprocess.run(CLI + ["package", "create", "-p", str(project), "--from-positions", "--box", "4000"],
                             capture_output=True, text=True)
    no_box = subprocess.run(CLI + ["package", "create", "-p", str(project), "--from-positions"],
                            capture_output=True, text=True)
    outside = tmp_path / "micrograph_0001_far.txt"
    outside.write_text("10 10\n700 20\n")
    far = subprocess.run(CLI + ["import", "positions", "-p", str(project), str(outside)], capture_output=True,
                         text=True)
    unknown = tmp_path / "other_mic_autopick.txt"
    unknown.write_text("10 10\n")
    nomatch = subprocess.run(CLI + ["import", "positions", "-p", str(project), str(unknown)], capture_output=True,
                             text=True)
    for r, words in ((bad_box, "larger than image"), (no_box, "--box"), (far, "outside"),
                     (nomatch, "give --image")):
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert db_dump(project) == before
    assert not list((project / "Assets" / "ParticleStacks").glob("*.mrcs*"))


def test_image_without_ctf_is_refused(tmp_path, micrographs):
    sim = micrographs["sim"]
    root = tmp_path / "proj"
    assert main(["project", "create", str(root)]) == 0
    assert main(["import", "images", "-p", str(root), str(sim.micrographs[0])]) == 0
    assert main(["import", "positions", "-p", str(root), str(sim.coordinates[0])]) == 0
    before = db_dump(root)
    r = subprocess.run(CLI + ["package", "create", "-p", str(root), "--from-positions", "--box", "64"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "has no CTF estimate" in r.stderr
    assert db_dump(root) == before


def test_bad_input_on_three_ranks_stops_the_waiting_workers(project):
    before = db_dump(project)
    res = run(mpi_cli(3, "package", "create", "-p", str(project), "--from-positions", "--box", "4000"), timeout=60)
    assert res.returncode == 2 and "larger than image" in res.stderr, res.stderr
    assert res.elapsed < 30  # type: ignore[attr-defined]
    assert db_dump(project) == before


def test_package_from_positions_stores_a_split_that_keeps_micrographs_apart(project, micrographs, monkeypatch):
    """From SPLIT_MIN_PARTICLES on (500, lowered here for 160 particles) the halves follow the stack blocks."""
    import cistem_mpi.drivers.package as package
    from cistem_mpi.io.param_store import read_params_column

    monkeypatch.setattr(package, "SPLIT_MIN_PARTICLES", 100)
    assert main(["package", "create", "-p", str(project), "--from-positions", "--box", "32"]) == 0
    with Project.open(project, readonly=True) as p:
        path = p.resolve(p.conn.execute("SELECT params_path FROM refinement_classes").fetchone()[0])
    half = read_params_column(path, "half_set")
    assert np.array_equal(half, np.where((np.arange(160) // 16) % 2 == 1, 1, 2))  # 4 micrographs < 20: 10 blocks
