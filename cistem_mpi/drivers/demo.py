"""``cistem-mpi demo``: the pipeline end to end on the built-in dataset.

The dataset is simulated from the built-in structure (PDB 8ZPM, CC0) with
known parameters, so the demo can say how close the result is to the truth.
Each step is a real ``cistem-mpi`` job started the way a user would start it
(``mpiexec -n N cistem-mpi ...``), so the demo also proves the installation
and the MPI launch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cistem_mpi.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    p = sub.add_parser("demo", help="simulate the built-in dataset and run the pipeline on it end to end")
    p.add_argument("--directory", default="demo_project", help="project directory to create (default demo_project)")
    p.add_argument("--ranks", type=int, default=3, help="MPI ranks for the parallel jobs (default 3: controller + 2)")
    p.add_argument("--particles", type=int, default=1000)
    p.add_argument("--snr", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=4, help="most auto-refine rounds")
    p.add_argument("--force", action="store_true", help="replace an existing demo directory")
    p.set_defaults(func=run)


def _launcher(ranks: int) -> list[str]:
    if ranks <= 1:
        return []
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if mpiexec is None:
        print("mpiexec not found: running every job on one rank")
        return []
    return [mpiexec, "-n", str(ranks)]


def _step(title: str, cmd: list[str]) -> float:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise InputError(cmd[cmd.index("-p") + 1] if "-p" in cmd else None, f"demo step failed: {title}")
    dt = time.monotonic() - t0
    print(f"   ({dt:.1f} s)", flush=True)
    return dt


def run(args: argparse.Namespace) -> int:
    """Simulate, create a project, import (movies, micrographs + CTF + positions -> package, particles),
    reconstruct, auto-refine, report."""
    from cistem_mpi.db.project import Project
    from cistem_mpi.drivers.simulate import simulate_micrographs, simulate_movies, simulate_particles
    from cistem_mpi.io.ctf_estimates import write_relion_ctf_star
    from cistem_mpi.io.par import write_par
    from cistem_mpi.io.param_store import read_params_h5
    from cistem_mpi.kernels.euler import angular_distance, rotation_matrix

    root = Path(args.directory).absolute()
    data = root.with_name(root.name + "-data")
    if root.exists() or data.exists():
        if not args.force:
            raise InputError(root, "already exists (use --force to replace the demo)")
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    cli = [sys.executable, "-m", "cistem_mpi"]
    mpi = _launcher(args.ranks)
    times: dict[str, float] = {}
    t0 = time.monotonic()

    print(f"== simulating {args.particles} particles of PDB 8ZPM (box 64, 2.5 Å/px, SNR {args.snr}) into {data}")
    sim = simulate_particles(data, n_particles=args.particles, box=64, pixel_size=2.5, snr=args.snr, seed=2026)
    movies = simulate_movies(data / "movies", n_movies=2, shape=(256, 256), n_frames=10, pixel_size=1.5,
                             exposure_per_frame=1.5, formats=("tiff",), seed=2026)
    mics = simulate_micrographs(data / "micrographs", n_micrographs=3, shape=(512, 512), n_per_micrograph=25,
                                box=64, pixel_size=2.5, exposure=200.0, seed=2026)
    ctf_star = data / "micrographs" / "micrographs_ctf.star"  # as RELION's CtfFind job writes it
    write_relion_ctf_star(ctf_star, [m.name for m in mics.micrographs], *mics.ctf.T, pixel_size=2.5,
                          voltage=300.0, cs=2.7, amplitude_contrast=0.07)
    truth = sim.particles.params
    # the refinement starts from parameters off by a few degrees and Å, as after a coarse search
    rng = np.random.default_rng(7)
    start = truth.copy()
    for col in ("phi", "theta", "psi"):
        start[col] += rng.uniform(-5, 5, len(start))
    for col in ("shx", "shy"):
        start[col] += rng.uniform(-5, 5, len(start))
    start_par = data / "start.par"
    write_par(start_par, start)
    times["simulate"] = time.monotonic() - t0

    times["create"] = _step("create the project", cli + ["project", "create", str(root)])
    cmd = cli + ["import", "movies", "-p", str(root), *map(str, movies.movies["tiff"]), "--pixel-size", "1.5",
                 "--dose-per-frame", "1.5", "--gain", str(movies.gain)]
    times["import movies"] = _step("import movies (LZW TIFF) with their gain reference", cmd)
    times["import images"] = _step("import micrographs", cli + ["import", "images", "-p", str(root),
                                                             *map(str, mics.micrographs)])
    times["import ctf"] = _step("import their CTF estimates (RELION micrographs_ctf.star)",
                                cli + ["import", "ctf", "-p", str(root), str(ctf_star)])
    times["import positions"] = _step("import particle positions (x y text files)",
                                      cli + ["import", "positions", "-p", str(root), *map(str, mics.coordinates)])
    times["package from positions"] = _step(
        f"refinement package from the positions: particles cut out of the micrographs ({args.ranks} ranks)",
        mpi + cli + ["package", "create", "-p", str(root), "--from-positions", "--box", "64",
                     "--name", "8ZPM from micrographs"])
    times["import particles"] = _step(
        "import the particle stack with its starting parameters",
        cli + ["import", "particles", "-p", str(root), str(sim.stack), "--params", str(start_par),
               "--pixel-size", "2.5", "--name", "8ZPM demo"])
    times["reconstruct"] = _step(f"reconstruct from the starting parameters ({args.ranks} ranks)",
                                 mpi + cli + ["reconstruct", "-p", str(root), "--mask-radius", "70"])
    times["auto-refine"] = _step(f"auto refine ({args.ranks} ranks)",
                                 mpi + cli + ["auto-refine", "-p", str(root), "--max-rounds", str(args.rounds),
                                              "--mask-radius", "70"])

    with Project.open(root, readonly=True) as p:
        vols = p.conn.execute("SELECT display_name, path, resolution FROM volumes ORDER BY id").fetchall()
        last = p.conn.execute("SELECT params_path FROM refinement_classes ORDER BY refinement_id DESC LIMIT 1").fetchone()
        final = read_params_h5(p.resolve(last[0]))
    err0 = angular_distance(rotation_matrix(start["phi"], start["theta"], start["psi"]),
                            rotation_matrix(truth["phi"], truth["theta"], truth["psi"]))
    err1 = angular_distance(rotation_matrix(final["phi"], final["theta"], final["psi"]),
                            rotation_matrix(truth["phi"], truth["theta"], truth["psi"]))
    print("\n== result")
    for name, path, res in vols:
        print(f"   {name:34s} {res:6.2f} Å   {path}")
    print(f"   angular error vs truth: median {np.median(err0):.2f}° before, {np.median(err1):.2f}° after refinement")
    print(f"   orth views and FSC curves: {root / 'Assets/Volumes/OrthViews'}")
    print(f"   jobs: cistem-mpi status -p {root}")
    print(f"   total {time.monotonic() - t0:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    summary = {"resolutions": {n: r for n, _, r in vols}, "median_angle_error_before": float(np.median(err0)),
               "median_angle_error_after": float(np.median(err1)), "seconds": times}
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return 0
