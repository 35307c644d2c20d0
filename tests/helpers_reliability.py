"""Small projects for the reliability tests (issue #13): simulated particles imported into a project."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "cistem_mpi"]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


def run_cli(*args: str, timeout: float = 600, ranks: int = 1, check: bool = False) -> subprocess.CompletedProcess:
    """``cistem-mpi ARGS`` in a subprocess (on ``ranks`` MPI ranks when > 1)."""
    cmd = CLI + [str(a) for a in args]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}: exit {r.returncode}\n{r.stderr}")
    return r


def simulated(out: Path, n: int = 60, box: int = 32, pixel_size: float = 4.0, seed: int = 5, snr: float = 0.5):
    """Simulated particles (the ``simulate particles`` library call: no subprocess)."""
    from cistem_mpi.drivers.simulate import builtin_map, simulate_particles

    vol = builtin_map(box, pixel_size)
    return simulate_particles(out, n_particles=n, box=box, pixel_size=pixel_size, snr=snr, seed=seed, volume=vol)


def imported_project(tmp: Path, n: int = 60, box: int = 32, pixel_size: float = 4.0, seed: int = 5):
    """(sim, project root): a project with the simulated particles imported from their .par."""
    from cistem_mpi.cli import main

    sim = simulated(tmp / "sim", n, box, pixel_size, seed)
    root = tmp / "p"
    assert main(["project", "create", str(root)]) == 0
    assert main(["import", "particles", "-p", str(root), str(sim.stack), "--params", str(sim.par),
                 "--pixel-size", str(pixel_size)]) == 0
    return sim, root


def db_rows(root: Path, sql: str) -> list[tuple]:
    """Rows of a query on the project database (read-only)."""
    db = next(Path(root).glob("*.db"))
    conn = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def asset_files(root: Path) -> set[str]:
    """Every file under Assets (project-relative)."""
    base = Path(root)
    return {p.relative_to(base).as_posix() for p in (base / "Assets").rglob("*") if p.is_file()}


def unregistered_files(root: Path) -> set[str]:
    """Files under Assets that no registered row points at."""
    from cistem_mpi.db.project import Project

    with Project.open(root, readonly=True) as p:
        registered = {Path(x).resolve() for x in p.registered_files()}
    base = Path(root)
    out = set()
    for f in (base / "Assets").rglob("*"):
        if f.is_file() and f.resolve() not in registered:
            # derived files a volume registers by its stem (sharpened map, pictures)
            if f.suffix == ".png" or f.name.endswith("_sharpened.mrc"):
                stem = f.name.replace("_sharpened.mrc", ".mrc").replace("_fsc.png", ".mrc").replace(".png", ".mrc")
                vol = base / "Assets" / "Volumes" / stem
                if vol.resolve() in registered:
                    continue
            if f.suffix in (".par", ".star"):  # parameter files beside a registered .h5
                if f.with_suffix(".h5").resolve() in registered:
                    continue
            out.add(f.relative_to(base).as_posix())
    return out
