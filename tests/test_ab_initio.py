"""The ``ab-initio`` job: registration, bad input, resume, ranks; acceptance against the truth (slow)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cistem_mpi.db.project import Project
from cistem_mpi.drivers.simulate import simulate_conformations, simulate_particles
from cistem_mpi.io.param_store import read_params_h5
from cistem_mpi.kernels import ab_initio as ai
from helpers_jobs import db_dump

CLI = [sys.executable, "-m", "cistem_mpi"]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
#: Small and quick: box 32 at 4 Å (a 128 Å box around the 107 Å long 8ZPM).
BOX, PS = 32, 4.0
QUICK = ["--rounds", "3", "--starts", "2"]


def _project(base: Path, sim, ps: float, symmetry: str | None = None) -> Path:
    root = base / "proj"
    Project.create(root).close()
    cmd = CLI + ["import", "particles", "-p", str(root), str(sim.stack), "--params", str(sim.par),
                 "--pixel-size", str(ps)]
    if symmetry:
        cmd += ["--symmetry", symmetry]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return root


def _run(args: list[str], root: Path, timeout: float = 900, ranks: int = 1) -> subprocess.CompletedProcess:
    cmd = CLI + args + ["-p", str(root)]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _job_result(root: Path, job_type: str = "ab_initio") -> dict:
    with Project.open(root, readonly=True) as p:
        row = p.conn.execute("SELECT result FROM jobs WHERE type = ? AND status = 'finished' ORDER BY id DESC",
                             (job_type,)).fetchone()
        return json.loads(row[0])


def _startup_params(root: Path) -> list[np.ndarray]:
    with Project.open(root, readonly=True) as p:
        rows = p.conn.execute("SELECT params_path FROM refinement_classes WHERE refinement_id = (SELECT max(id) "
                              "FROM refinements WHERE kind = 'startup') ORDER BY class_number").fetchall()
        return [read_params_h5(p.resolve(r[0])) for r in rows]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp("abinitio")
    sim = simulate_particles(base / "data", n_particles=160, box=BOX, pixel_size=PS, snr=0.2, seed=7)
    return sim, _project(base, sim, PS)


def _copy(root: Path, dst: Path) -> Path:
    shutil.copytree(root, dst)
    Project.open(dst).close()  # the moved project records its new directory once
    return dst


# ------------------------------------------------------------------ the job
@pytest.mark.slow  # two starts x three rounds and a manual-refine: over 20 s
def test_startup_volumes_and_refinement_are_registered(small, tmp_path):
    sim, root = small
    proj = _copy(root, tmp_path / "p")
    r = _run(["ab-initio"] + QUICK, proj)
    assert r.returncode == 0, r.stderr
    assert "handedness" in json.dumps(_job_result(proj))
    with Project.open(proj, readonly=True) as p:
        vols = p.conn.execute("SELECT * FROM volumes WHERE kind = 'startup' ORDER BY run_number").fetchall()
        # one run number per start; the last start's volume belongs to the refinement
        assert [v["display_name"] for v in vols] == ["Volume From Startup #1 - Class #1",
                                                     "Volume From Startup #2 - Class #1"]
        assert [v["path"] for v in vols] == ["Assets/Volumes/startup_volume_1_1.mrc",
                                             "Assets/Volumes/startup_volume_2_1.mrc"]
        ref = p.conn.execute("SELECT * FROM refinements WHERE kind = 'startup'").fetchone()
        assert (ref["id"], ref["parent_id"], ref["n_classes"], ref["round"]) == (2, 1, 1, 6)
        assert vols[1]["refinement_id"] == ref["id"] and vols[0]["refinement_id"] is None
        for v in vols:
            for col in ("path", "half_map_1", "half_map_2", "orth_view"):
                assert (proj / v[col]).is_file()
            assert np.isfinite(mrcfile.read(proj / v["path"])).all()
    stem = proj / "Assets/Volumes/OrthViews/startup_volume_2_1"
    assert stem.with_suffix(".png").is_file() and (proj / "Assets/Volumes/OrthViews/startup_volume_2_1_fsc.png").is_file()
    assert not list(proj.rglob(".*.part"))  # every staged file renamed
    params = _startup_params(proj)[0]
    assert len(params) == 160 and np.all(params["score"] != 0) and np.all(params["occ"] == 100.0)
    rounds = _job_result(proj)["rounds"]
    assert len(rounds) == 6  # 2 starts x 3 rounds
    assert [x["resolution_limit"] for x in rounds] == [20.0, 20.0, 8.0] * 2
    for x in rounds:
        assert x["used"][0] > 0 and x["searched"] > 0 and np.isfinite(x["map_change"][0])
    # the startup refinement is the newest: manual-refine and auto-refine (same starting refinement and
    # --reference handling) start from it with the startup volume as the reference
    r = _run(["manual-refine", "--reference", str(proj / "Assets/Volumes/startup_volume_2_1.mrc"),
              "--high-resolution", "12", "--angle-step", "5"], proj)
    assert r.returncode == 0, r.stderr
    with Project.open(proj, readonly=True) as p:
        last = p.conn.execute("SELECT * FROM refinements ORDER BY id DESC").fetchone()
        assert last["kind"] == "local" and last["parent_id"] == 2  # the startup refinement


@pytest.mark.parametrize("case", ["too_few_particles", "unknown_symmetry", "mask_too_big", "few_percent"])
def test_bad_input_is_refused_before_the_job_exists(small, tmp_path, case):
    sim, root = small
    proj = _copy(root, tmp_path / "p")
    before = db_dump(proj)
    args = {"too_few_particles": ["--classes", "4"],  # 160 / 4 = 40 per class < 50
            "unknown_symmetry": ["--symmetry", "Q7"],
            "mask_too_big": ["--mask-radius", "70"],  # 70 Å = 17.5 px + edge > 16 px
            "few_percent": ["--start-percent", "10"]}[case]  # 16 particles
    r = _run(["ab-initio"] + args, proj)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    expect = {"too_few_particles": "160 particles into 4 classes is 40 per class; at least 50",
              "unknown_symmetry": "--symmetry: unknown symmetry",
              "mask_too_big": "box too small for the mask", "few_percent": "10.0 % of 160 particles = 16"}[case]
    assert expect in line
    assert db_dump(proj) == before
    assert not (proj / "Assets/Volumes/startup_volume_1_1.mrc").exists()


def _kill_after_checkpoint(cmd: list[str], scratch: Path, iteration: str, timeout: float = 600) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end and proc.poll() is None:
        if list(scratch.glob(f"**/{iteration}/manifest.json")):
            break
        time.sleep(0.1)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_resume_after_kill_gives_the_uninterrupted_result(small, tmp_path):
    sim, root = small
    a, b = _copy(root, tmp_path / "a"), _copy(root, tmp_path / "b")
    # one start of two rounds, killed after the first: the smallest run that resumes mid-start
    args = ["ab-initio", "--rounds", "2", "--starts", "1", "--start-resolution", "16", "--end-resolution", "12"]
    assert _run(args, a).returncode == 0
    _kill_after_checkpoint(CLI + args + ["-p", str(b)], b / "Scratch", "iter_000001")
    with Project.open(b, readonly=True) as p:
        job = p.conn.execute("SELECT * FROM jobs WHERE type = 'ab_initio'").fetchone()
        assert p.conn.execute("SELECT count(*) FROM volumes").fetchone()[0] == 0
    r = _run(args + ["--resume", str(job["id"])], b)
    assert r.returncode == 0, r.stderr
    assert "resuming after start 1 round 1" in r.stderr
    assert np.array_equal(_startup_params(a)[0], _startup_params(b)[0])
    name = "startup_volume_1_1.mrc"
    assert np.array_equal(mrcfile.read(a / "Assets/Volumes" / name), mrcfile.read(b / "Assets/Volumes" / name))


@pytest.mark.slow  # two jobs, one on 3 ranks: over 20 s
@pytest.mark.mpi
def test_same_result_from_1_and_3_ranks(small, tmp_path):
    if MPIEXEC is None:
        pytest.skip("mpiexec not found")
    sim, root = small
    args = ["ab-initio", "--rounds", "2", "--starts", "1", "--seed", "3"]
    out = {}
    for n in (1, 3):
        proj = _copy(root, tmp_path / f"p{n}")
        r = _run(args, proj, ranks=n)
        assert r.returncode == 0, r.stderr
        out[n] = (_startup_params(proj)[0], mrcfile.read(proj / "Assets/Volumes/startup_volume_1_1.mrc"))
    p1, p3 = out[1][0], out[3][0]
    # Each particle is searched by the same code on any rank against references that differ by float32
    # rounding only: the same grid orientation for every particle, shifts and scores to rounding.
    for col in ("phi", "theta", "psi"):
        assert np.array_equal(p1[col], p3[col])
    for col in ("shx", "shy", "score"):
        assert np.allclose(p1[col], p3[col], atol=1e-3)
    assert np.abs(out[1][1] - out[3][1]).max() <= 1e-4 * np.abs(out[1][1]).max()


# ------------------------------------------------------------------ acceptance (slow)
def _true_parameter_map(sim) -> np.ndarray:
    from cistem_mpi.drivers.reconstruct import ReconstructionSettings, reconstruct_particles
    from cistem_mpi.drivers.runtime import get_world

    return reconstruct_particles(get_world(), str(sim.stack), sim.particles, ReconstructionSettings(bfactor=0.0)).volume


#: The acceptance problem: realistic rather than tiny. Box 48 at 3 Å/px (144 Å around the 107 Å long 8ZPM),
#: 1000 particles at SNR 0.07, 20 rounds of one start (cisTEM's schedule for 20 rounds: every round up to
#: 65 % at the 20 Å start limit, then 11 -> 8 Å). About 3.5 min of CPU per seed on an idle core.
ACCEPT = {"box": 48, "pixel_size": 3.0, "n_particles": 1000, "snr": 0.07, "rounds": 20}
#: Measured on this problem (FSC 0.5 vs the truth after alignment by rotation, shift and hand): seeds 1, 2, 3 give
#: 11.06, 11.28 and 11.07 Å against 8.86, 8.86 and 8.78 Å with the true parameters (1.25-1.27x; the bar is 1.5x).
#: (Figures of 25-97 Å reported earlier came from align_to_reference's half-box shift error, since fixed: the maps
#: were fine, their alignment to the truth was not.)  Each seed costs ~3.5 min of CPU: CI runs seed 1, and
#: AB_INITIO_ACCEPTANCE=1 runs all three.
_RUN_ALL_SEEDS = bool(os.environ.get("AB_INITIO_ACCEPTANCE"))


def _accept_param(seed: int):
    if seed != 1 and not _RUN_ALL_SEEDS:
        return pytest.param(seed, marks=pytest.mark.skip(reason="passes (see ACCEPT's note); CI time: "
                                                                "AB_INITIO_ACCEPTANCE=1 runs seeds 2 and 3"))
    return seed


@pytest.mark.slow
@pytest.mark.parametrize("seed", [_accept_param(s) for s in (1, 2, 3)])
def test_map_from_random_starts_matches_the_truth(tmp_path, seed):
    """No reference: aligned to the truth by rotation, shift and hand, FSC 0.5 within 1.5x of the
    reconstruction from the true parameters."""
    box, ps = ACCEPT["box"], ACCEPT["pixel_size"]
    sim = simulate_particles(tmp_path / "data", n_particles=ACCEPT["n_particles"], box=box, pixel_size=ps,
                             snr=ACCEPT["snr"], seed=seed)
    proj = _project(tmp_path, sim, ps)
    r = _run(["ab-initio", "--rounds", str(ACCEPT["rounds"]), "--starts", "1", "--seed", str(seed)], proj,
             timeout=3600)
    assert r.returncode == 0, r.stderr
    truth = mrcfile.read(sim.map)
    mask = 0.45 * box * ps
    res_true = ai.fsc_resolution(_true_parameter_map(sim), truth, ps, 0.5, mask)
    fit = ai.align_to_reference(mrcfile.read(proj / "Assets/Volumes/startup_volume_1_1.mrc"), truth)
    assert set(fit["cc_by_hand"]) == {False, True}  # both hands tried: projections cannot tell them apart
    res = ai.fsc_resolution(fit["aligned"], truth, ps, 0.5, mask)
    print(f"seed {seed}: ab initio {res:.2f} Å, true parameters {res_true:.2f} Å, hand "
          f"{'mirrored' if fit['mirrored'] else 'as the truth'}, cc by hand {fit['cc_by_hand']}")
    assert res <= 1.5 * res_true


def _c4_map(box: int, ps: float) -> np.ndarray:
    """A C4 tetramer around z from the 8ZPM map moved off the axis."""
    from cistem_mpi.drivers.simulate import builtin_map

    from cistem_mpi.kernels.resample import fourier_crop, pad_center

    half = fourier_crop(builtin_map(box, ps), box // 2) * 0.5  # the monomer at half its size
    mono = ai.shift_volume(pad_center(half, box), np.array([box / 6, 0.0, 0.0]))
    return ai.symmetrise(mono, "C4") * 4


@pytest.mark.slow
def test_c4_symmetry_axes_are_found(tmp_path):
    vol = _c4_map(BOX, PS)
    turn = np.eye(3)
    sim = simulate_particles(tmp_path / "data", n_particles=300, box=BOX, pixel_size=PS, snr=0.2, seed=4, volume=vol)
    proj = _project(tmp_path, sim, PS, symmetry="C4")
    r = _run(["ab-initio", "--rounds", "8", "--starts", "1"], proj, timeout=1800)
    assert r.returncode == 0, r.stderr
    res = _job_result(proj)
    assert res["symmetry_alignment"] and res["rounds"][-1]["symmetry"] == "C4"
    out = mrcfile.read(proj / "Assets/Volumes/startup_volume_1_1.mrc")
    # the map is C4-symmetric about z (the standard axis), i.e. the axis was found and imposed
    assert ai.symmetry_score(out, "C4", turn) > 0.95
    fit = ai.align_to_reference(out, vol)
    assert fit["cc"] > 0.8


@pytest.mark.slow
def test_two_conformations_give_two_maps(tmp_path):
    sim = simulate_conformations(tmp_path / "data", n_particles=600, box=BOX, pixel_size=PS, snr=0.2, seed=5,
                                 fraction_first=0.5)
    proj = _project(tmp_path, sim, PS)
    r = _run(["ab-initio", "--classes", "2", "--rounds", "12", "--starts", "1"], proj, timeout=1800,
             ranks=3 if MPIEXEC else 1)
    assert r.returncode == 0, r.stderr
    truths = [mrcfile.read(sim.map), mrcfile.read(sim.map.with_name(sim.map.stem + "_class2.mrc"))]
    maps = [mrcfile.read(proj / f"Assets/Volumes/startup_volume_1_{c}.mrc") for c in (1, 2)]
    cc = np.array([[ai.align_to_reference(m, t)["cc"] for t in truths] for m in maps])
    assign = np.argmax(np.stack([p["occ"] for p in _startup_params(proj)], axis=1), axis=1)
    right = max(np.mean(assign == sim.classes), np.mean(assign != sim.classes))
    print("cc map x truth", cc.round(3), "particles in the right class", round(float(right), 3),
          "classification", _job_result(proj)["classification"])
    # measured on 1 rank for seeds 5-8: 71, 67, 84, 68 % right (chance: 50 %), each map nearer its own truth
    assert right >= 0.6, right
    # some labelling: each map closer to its own truth than to the other one
    assert (cc[0, 0] > cc[0, 1] and cc[1, 1] > cc[1, 0]) or (cc[0, 1] > cc[0, 0] and cc[1, 0] > cc[1, 1])


@pytest.mark.slow
def test_auto_refine_from_the_startup_volume(tmp_path):
    """ab-initio -> auto-refine reaches within 10 % of the resolution auto-refine reaches from the true map."""
    sim = simulate_particles(tmp_path / "data", n_particles=400, box=BOX, pixel_size=PS, snr=0.1, seed=1)
    proj = _project(tmp_path, sim, PS)
    assert _run(["ab-initio", "--rounds", "15", "--starts", "1"], proj, timeout=1800).returncode == 0
    ref = _copy(proj, tmp_path / "from_truth")
    r = _run(["auto-refine", "--max-rounds", "3", "--reference", str(proj / "Assets/Volumes/startup_volume_1_1.mrc")],
             proj, timeout=1800)
    assert r.returncode == 0, r.stderr
    r = _run(["auto-refine", "--max-rounds", "3", "--refinement", "1", "--reference", str(sim.map)], ref, timeout=1800)
    assert r.returncode == 0, r.stderr
    res = [_job_result(p, "auto_refine")["resolution_history"][-1] for p in (proj, ref)]
    print("auto-refine from startup / from truth:", res)
    # at 4 Å/px both reach Nyquist (8 Å): the comparison then only shows that the startup map is good enough
    assert res[0] <= 1.1 * res[1]
