"""End to end: simulated micrographs -> find-ctf -> find-particles -> package -> reconstruct (issues #11, #15).

One project, every step through the command line as a user runs it:

* ``simulate micrographs`` (realistic physics: the 8-copy ring of PDB 8ZPM,
  ~356 kDa, 250 Å of ice, 1.5-2 µm underfocus, 50 e/Å^2, counting detector)
  writes 20 micrographs of 1024^2 at 3 Å/pixel with ~2,900 particles, and its
  truth (``micrograph_truth.json``: each micrograph's CTF; ``*_coords.txt``:
  each particle's centre and PSI THETA PHI);
* ``import ctf`` (the true CTF) + ``import positions`` (the true centres) ->
  ``package create --from-positions``: the reference chain "true/true";
* ``find-ctf`` -> ``package create --from-positions`` of the same true
  positions: "true positions + estimated CTF" (#11);
* ``find-particles`` (template-free, on the estimated CTF) ->
  ``package create --from-positions --positions-job``: "picked + estimated CTF" (#15).

Each package's particles get the true angles of the particle they show (a
pick: the nearest true centre within 0.2 diameters; a false pick gets random
angles and stays in) and keep their package's stack, CTF and shifts (``import
particles``).  Unrefined, they are reconstructed (``reconstruct``) for the
#11 comparison (true positions, true vs estimated CTF).

Picks are centred by a disc (template-free), about 10 Å (median) from the
true centres of this 180 x 110 Å ring, so the picks as picked give no map
beyond ~25 Å.  A user refines them, so for #15 both the true chain (true
positions + true CTF) and the picked chain (picks + estimated CTF) go through
the same ``manual-refine`` (under ``mpiexec -n 3`` when there is one): one
local round of angles and shifts, from the assigned angles and the package's
shifts, shift range 40 Å, against a starting model that does not give the
answer away (the true map low-pass filtered to 25 Å, what ab initio gives),
aligned to 25 Å; then a second round against the map the first made,
aligned to 10 Å (shift range 10 Å), as a user's next round.  The maps of the
second round are compared, and the matched
particles' angular and shift errors before and after.  Every map is compared with the true map (the
solvent-excluded Coulomb potential the simulator projects) by the FSC in the
same soft sphere (radius 120 Å), shell by shell.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cistem_mpi.cli import main
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.simulate import assembly_map
from cistem_mpi.io.ctf_estimates import write_relion_ctf_star
from cistem_mpi.io.mrc import read_mrc
from cistem_mpi.io.par import write_par
from cistem_mpi.io.param_store import read_params_h5
from cistem_mpi.io.mrc import write_mrc
from cistem_mpi.kernels.filters import lowpass
from cistem_mpi.kernels.fsc import fsc
from cistem_mpi.kernels.masks import sphere_mask
from cistem_mpi.kernels.refinement import angular_change
from cistem_mpi.kernels.simulate import SCATTERING_TO_VOLTS, solvent_excluded_potential
from runtime_helpers import MPIEXEC, cli, run

pytestmark = pytest.mark.slow

PS, BOX, N_MICROGRAPHS = 3.0, 96, 20
PICK = ["--characteristic-radius", "72.5", "--maximum-radius", "100", "--highest-resolution", "10",
        "--edge", "32", "--threshold", "5"]
#: The refinement's starting model: the true map low-pass filtered to this resolution (Å), aligned to it.
START_RESOLUTION = 25.0
#: The shift range searched (Å): covers every matched pick's centring error (<= 0.2 diameters, 36 Å;
#: median 9.8 Å, 95 % within 20.5 Å, 1.8 % beyond 25 Å, which a 25 Å range leaves uncentred).
MAX_SHIFT = 40.0
REFINE = ["--high-resolution", str(START_RESOLUTION), "--max-shift", str(MAX_SHIFT)]
#: The second round: aligned to 10 Å (where the first round's map still has FSC ~0.9 against the truth).
ROUND2 = ["--high-resolution", "10", "--max-shift", "10"]


def _ok(argv: list[str]) -> None:
    assert main(argv) == 0, argv


def _job(root: Path, kind: str) -> int:
    with Project.open(root, readonly=True) as p:
        return int(p.conn.execute("SELECT max(id) FROM jobs WHERE type = ?", (kind,)).fetchone()[0])


def _package(root: Path) -> dict:
    """The newest refinement package: stack, parameters, and the position (image, x, y Å) of each particle."""
    with Project.open(root, readonly=True) as p:
        pid, sid = p.conn.execute("SELECT id, stack_id FROM refinement_packages ORDER BY id DESC").fetchone()
        stack = p.resolve(p.conn.execute("SELECT path FROM particle_stacks WHERE id = ?", (sid,)).fetchone()[0])
        run = p.conn.execute("SELECT max(id) FROM refinements WHERE package_id = ?", (pid,)).fetchone()[0]
        h5 = p.conn.execute("SELECT params_path FROM refinement_classes WHERE refinement_id = ?", (run,)).fetchone()[0]
        pos = p.conn.execute("SELECT pp.image_id, pp.x, pp.y FROM refinement_package_members m "
                             "JOIN particle_positions pp ON pp.id = m.parent_position "
                             "WHERE m.package_id = ? ORDER BY m.position", (pid,)).fetchall()
        order = {r[0]: k for k, r in enumerate(p.conn.execute("SELECT id FROM images ORDER BY id"))}
        params = read_params_h5(p.resolve(h5))
    pos = np.array(pos, dtype=np.float64)
    return {"stack": stack, "params": params, "micrograph": np.array([order[int(i)] for i in pos[:, 0]]),
            "xy": pos[:, 1:]}


def _with_truth(pkg: dict, truth: list[np.ndarray], radius: float, seed: int = 0):
    """Parameters with each particle's true angles (the nearest true centre within 0.2 diameters).

    The package's shift (the pick) stays.  Returns the parameters, which
    particles were matched, and each one's true parameters (angles, and the
    shift that would centre it, in the package's convention).
    """
    par = pkg["params"].copy()
    rng = np.random.default_rng(seed)
    matched = np.zeros(len(par), bool)
    truth_par = par.copy()
    for i, (k, (x, y)) in enumerate(zip(pkg["micrograph"], pkg["xy"])):
        t = truth[k]
        d = np.hypot(t[:, 0] * PS - x, t[:, 1] * PS - y)
        j = int(np.argmin(d))
        if d[j] < 0.4 * radius:
            matched[i] = True
            par["psi"][i], par["theta"][i], par["phi"][i] = t[j, 2:5]
            # the particle sits at (true - pick) Å from the pick, which the package's shift already refers to
            truth_par["shx"][i] -= x - t[j, 0] * PS
            truth_par["shy"][i] -= y - t[j, 1] * PS
        else:  # a false pick: junk, as it would be
            par["psi"][i], par["phi"][i] = rng.uniform(0, 360, 2)
            par["theta"][i] = np.degrees(np.arccos(rng.uniform(-1, 1)))
    for k in ("psi", "theta", "phi"):
        truth_par[k] = par[k]
    return par, matched, truth_par


def _errors(par: np.ndarray, truth_par: np.ndarray, matched: np.ndarray) -> dict:
    """Angular (°) and shift (Å) errors of the matched particles: median, 95th percentile, rms."""
    ang = angular_change(truth_par[matched], par[matched])
    sh = np.hypot(par["shx"][matched] - truth_par["shx"][matched], par["shy"][matched] - truth_par["shy"][matched])
    out = {}
    for name, e in (("angle", ang), ("shift", sh)):
        out.update({f"{name}_median": round(float(np.median(e)), 2),
                    f"{name}_p95": round(float(np.percentile(e, 95)), 2),
                    f"{name}_rms": round(float(np.sqrt(np.mean(e ** 2))), 2)})
    return out


def _newest_volume(root: Path) -> np.ndarray:
    """The map the last reconstruct or refinement registered."""
    with Project.open(root, readonly=True) as p:
        vol, _ = read_mrc(p.resolve(p.conn.execute("SELECT path FROM volumes ORDER BY id DESC").fetchone()[0]))
    return vol


def _newest_params(root: Path) -> np.ndarray:
    """The parameters of the newest refinement (class 1)."""
    with Project.open(root, readonly=True) as p:
        h5 = p.conn.execute("SELECT params_path FROM refinement_classes "
                            "ORDER BY refinement_id DESC, class_number").fetchone()[0]
        return read_params_h5(p.resolve(h5))


def _refine(root: Path, start: Path) -> None:
    """One local round against the starting model, then ROUND2 against the map it made; under ``mpiexec -n 3``
    (both cores work) when there is one."""
    for argv in (["manual-refine", "-p", str(root), "--reference", str(start), *REFINE],
                 ["manual-refine", "-p", str(root), *ROUND2]):
        if Path(MPIEXEC).exists() or shutil.which(MPIEXEC):
            res = run([MPIEXEC, "-n", "3", *cli(*argv)], timeout=1800)
            assert res.returncode == 0, res.stderr[-3000:]
        else:
            _ok(argv)


def _import(root: Path, stack: Path, par: np.ndarray, name: str, out: Path) -> None:
    path = out / f"{name}.par"
    write_par(path, par)
    _ok(["import", "particles", "-p", str(root), str(stack), "--params", str(path), "--pixel-size", str(PS),
         "--name", name])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("chain")
    data, root = base / "data", base / "proj"
    _ok(["simulate", "micrographs", "--out", str(data), "-n", str(N_MICROGRAPHS), "--size", "1024", "1024",
         "--particles-per-micrograph", "300", "--pixel-size", str(PS), "--exposure", "50", "--defocus", "17500",
         "--defocus-spread", "2500", "--astigmatism", "200", "--ice-thickness", "250", "--seed", "7"])
    info = json.loads((data / "micrograph_truth.json").read_text())
    rows = info["micrographs"]
    radius = float(info["particle_radius_angstrom"][0])
    write_relion_ctf_star(base / "true_ctf.star", [r["micrograph"] for r in rows], [r["df1"] for r in rows],
                          [r["df2"] for r in rows], [r["angast"] for r in rows], [r["pshift"] for r in rows],
                          pixel_size=PS, voltage=300.0, cs=2.7, amplitude_contrast=0.07)
    mics = sorted(str(p) for p in data.glob("micrograph_????.mrc"))
    coords = sorted(data.glob("micrograph_????_coords.txt"))
    truth = [np.loadtxt(c, ndmin=2) for c in coords]  # x y (px) psi theta phi, in the order imported
    _ok(["project", "create", str(root)])
    _ok(["import", "images", "-p", str(root), "--pixel-size", str(PS), *mics])
    _ok(["import", "ctf", "-p", str(root), str(base / "true_ctf.star")])
    _ok(["import", "positions", "-p", str(root), *map(str, coords)])
    true_job = _job(root, "import_positions")
    _ok(["package", "create", "-p", str(root), "--from-positions", "--box", str(BOX)])
    true_true = _package(root)
    # 3 Å/px: the fit ends at 8 Å (find-ctf's default 5 Å is past Nyquist)
    _ok(["find-ctf", "-p", str(root), "--max-resolution", "8"])
    _ok(["package", "create", "-p", str(root), "--from-positions", "--box", str(BOX), "--positions-job", str(true_job)])
    true_est = _package(root)
    _ok(["find-particles", "-p", str(root), *PICK])
    _ok(["package", "create", "-p", str(root), "--from-positions", "--box", str(BOX), "--positions-job",
         str(_job(root, "find_particles"))])
    picked = _package(root)
    with Project.open(root, readonly=True) as p:
        est = np.array(p.conn.execute("SELECT e.df1, e.df2 FROM ctf_estimates e WHERE e.job_id = ? ORDER BY e.image_id",
                                      (_job(root, "find_ctf"),)).fetchall())

    vol = solvent_excluded_potential(assembly_map(8, PS) * np.float32(SCATTERING_TO_VOLTS), PS)
    pad = (BOX - vol.shape[0]) // 2
    ref = np.pad(vol, [(pad, BOX - vol.shape[0] - pad)] * 3)
    # the starting model: flat to 30 Å, nothing beyond 22 Å
    start = base / "start_25A.mrc"
    write_mrc(start, lowpass(ref, PS / START_RESOLUTION, PS / 22.0 - PS / 30.0), PS)

    maps, info_out = {}, {"n_true": int(sum(len(t) for t in truth)), "defocus_error": est.mean(1) - np.array(
        [0.5 * (r["df1"] + r["df2"]) for r in rows])}
    for name, pkg, refine in (("true_true", true_true, True), ("true_est", true_est, False),
                              ("picked_est", picked, True)):
        par, matched, truth_par = _with_truth(pkg, truth, radius)
        _import(root, pkg["stack"], par, name, base)
        _ok(["reconstruct", "-p", str(root)])
        maps[name] = _newest_volume(root)
        info_out[name] = {"n": len(par), "matched": int(matched.sum()), "before": _errors(par, truth_par, matched)}
        if refine:
            _refine(root, start)
            maps[name + "_refined"] = _newest_volume(root)
            info_out[name]["after"] = _errors(_newest_params(root), truth_par, matched)
    maps["start"] = lowpass(ref, PS / START_RESOLUTION, PS / 22.0 - PS / 30.0)
    mask = sphere_mask(BOX, 120.0 / PS, 6.0)
    curves = {}
    for name, m in maps.items():
        freq, curves[name] = fsc(m, ref, mask)

    def shells(name: str) -> slice:  # shells 1..last before the FSC falls below 0.143 (shell 0 is the mean)
        below = np.nonzero(curves[name][1:] < 0.143)[0]
        return slice(1, int(below[0]) + 1 if below.size else len(freq))

    print("\nshell  res(Å)  " + "  ".join(f"{k:>20s}" for k in curves))
    for s in range(1, len(freq)):
        print(f"{s:5d} {PS / freq[s]:7.1f} " + "  ".join(f"{curves[k][s]:20.3f}" for k in curves))
    print(info_out)
    return {"fsc": curves, "shells": shells("true_true"), "refined_shells": shells("true_true_refined"),
            "freq": freq, "info": info_out}


def test_true_chain_is_good_enough_to_judge_the_others(chain):
    # the reference chain must resolve something: FSC against the truth >= 0.143 to <= 10 Å
    res = PS / chain["freq"][chain["shells"].stop - 1]
    assert res <= 10.0, res
    assert chain["info"]["true_true"]["n"] == chain["info"]["n_true"] >= 2000


def test_estimated_ctf_reconstructs_as_well_as_true_ctf(chain):
    """#11: true positions + find-ctf's CTF within 0.02 per shell of true positions + true CTF."""
    s = chain["shells"]
    diff = chain["fsc"]["true_est"][s] - chain["fsc"]["true_true"][s]
    assert np.all(diff >= -0.02), (np.round(diff, 3), chain["info"]["defocus_error"])


def test_refinement_from_a_low_resolution_start_keeps_the_true_chain(chain):
    """The true chain refined against the 25 Å model is a fair yardstick: it keeps its true angles and
    centres (to a few degrees and Å) and resolves far beyond the model (FSC >= 0.143 to <= 10 Å)."""
    after = chain["info"]["true_true"]["after"]
    assert after["angle_p95"] < 3.0 and after["shift_p95"] < 2.0, chain["info"]["true_true"]
    res = PS / chain["freq"][chain["refined_shells"].stop - 1]
    assert res <= 10.0, res
    s = chain["refined_shells"]
    loss = chain["fsc"]["true_true"][s] - chain["fsc"]["true_true_refined"][s]
    assert np.all(loss <= 0.2), np.round(loss, 3)


def test_picked_particles_refined_reconstruct_as_well_as_the_true_ones(chain):
    """#15: find-particles' picks + find-ctf's CTF, refined, within 0.05 per shell of the true chain refined
    alike, over the shells where the refined true chain has FSC >= 0.5 (to 8.0 Å here)."""
    info = chain["info"]["picked_est"]
    assert info["matched"] >= 0.9 * chain["info"]["n_true"] and info["matched"] >= 0.95 * info["n"], info
    # the refinement centred the picks (their error fell from 9.8 Å median) and kept their angles
    assert info["after"]["shift_p95"] < 2.0 < 10.0 < info["before"]["shift_p95"], info
    assert info["after"]["angle_p95"] < 3.0, info
    # ... which is what made the map: the picks as picked fall short at 20 Å
    k = int(np.argmin(np.abs(PS / chain["freq"][1:] - 20.0))) + 1
    assert chain["fsc"]["picked_est_refined"][k] > chain["fsc"]["picked_est"][k] + 0.1, k
    true = chain["fsc"]["true_true_refined"]
    s = slice(1, int(np.nonzero(true[1:] < 0.5)[0][0]) + 1)
    diff = chain["fsc"]["picked_est_refined"][s] - true[s]
    assert np.all(diff >= -0.05), np.round(diff, 3)


def test_picked_particles_refined_match_the_true_ones_to_fsc_0143(chain):
    """#15's full criterion: within 0.05 per shell of the true chain to its FSC 0.143 (6.1 Å here).

    After the first round alone it missed at one shell (6.5 Å: 0.148 against 0.242): aligned to 25 Å, both
    chains were limited by their angular error (1.0° median), and the picks' outliers weighed more.  The
    second round, aligned to 10 Å, halves both chains' errors (0.6° / 0.3 Å median), as a user's next round
    would; the largest shortfall is then 0.02."""
    s = chain["refined_shells"]
    diff = chain["fsc"]["picked_est_refined"][s] - chain["fsc"]["true_true_refined"][s]
    assert np.all(diff >= -0.05), np.round(diff, 3)
