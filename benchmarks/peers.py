"""Run cisTEM's console programs (the peers) for side-by-side benchmarks.

cisTEM is not part of this repository and is never built by it.  Point
``CISTEM_BIN`` at a directory holding cisTEM's console programs
(``ctffind``, ``find_particles``, ...); if they need extra shared libraries,
set ``LD_LIBRARY_PATH`` yourself (it is passed through).  Without
``CISTEM_BIN`` (or without the program in it) :func:`find_peer` returns
``None`` and the benchmarks print "peer: not available" instead of a column.

cisTEM programs ask their questions on stdin, one answer per line;
:func:`run_peer` feeds a list of answers and measures the child's CPU time
(user + system, ``resource.getrusage(RUSAGE_CHILDREN)`` before/after) and
peak memory (the child's ``VmHWM`` polled from ``/proc`` every 10 ms: the
children's ``ru_maxrss`` would include this Python process, copied at fork).
:func:`run_command` measures any other command the same way (RELION's
programs, our own CLI); :func:`find_relion` finds RELION's programs under
``RELION_BIN`` (the ``bin`` directory of a RELION build), like
:func:`find_peer` for ``CISTEM_BIN``.

>>> find_peer("no-such-program") is None or True
True
"""

from __future__ import annotations


import os

import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PeerRun:
    """One peer run: its output, return code, CPU seconds, wall seconds, peak memory (MB).

    ``peak_mb`` is the resident high-water mark (``VmHWM``), which counts the
    pages of memory-mapped files too; ``peak_anon_mb`` the largest anonymous
    resident memory (``RssAnon``) seen by the 10 ms polling, i.e. without
    file-backed pages (0 when not measured).
    """

    program: str
    returncode: int
    output: str
    cpu_s: float
    wall_s: float
    peak_mb: float
    workdir: Path
    peak_anon_mb: float = 0.0


def peer_dir() -> Path | None:
    """The directory in ``CISTEM_BIN``, or ``None`` when unset or missing."""
    d = os.environ.get("CISTEM_BIN", "").strip()
    if not d:
        return None
    p = Path(d).expanduser()
    return p if p.is_dir() else None


def find_peer(program: str) -> Path | None:
    """Path of cisTEM's ``program`` under ``CISTEM_BIN``, or ``None``.

    Parameters
    ----------
    program : str
        Executable name, e.g. ``"ctffind"``.

    Returns
    -------
    Path or None

    >>> find_peer("definitely-not-a-cistem-program") is None
    True
    """
    d = peer_dir()
    if d is None:
        return None
    exe = d / program
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def peer_status(program: str) -> str:
    """One line saying where the peer is, or why there is none."""
    if peer_dir() is None:
        if os.environ.get("CISTEM_BIN", "").strip():
            return f"peer {program}: not available (CISTEM_BIN={os.environ['CISTEM_BIN']} is not a directory)"
        return f"peer {program}: not available (set CISTEM_BIN to a directory of cisTEM console programs)"
    exe = find_peer(program)
    if exe is None:
        return f"peer {program}: not available ({program} not found in CISTEM_BIN={os.environ['CISTEM_BIN']})"
    return f"peer {program}: {exe}"


def run_peer(program: str, answers: list, workdir: Path | None = None, timeout: float = 900.0) -> PeerRun:
    """Run cisTEM's ``program`` with ``answers`` on stdin (one per line).

    Parameters
    ----------
    program : str
        Executable name under ``CISTEM_BIN``.
    answers : list
        Answers to the program's questions, in order (converted with ``str``).
    workdir : Path, optional
        Working directory (cisTEM writes debug files into it); a new temporary
        directory when omitted.
    timeout : float
        Seconds before the run is killed.

    Returns
    -------
    PeerRun
        CPU seconds are the child's user + system time; ``peak_mb`` its
        resident high-water mark (``VmHWM``).

    Raises
    ------
    FileNotFoundError
        When the peer is not available (see :func:`peer_status`).

    >>> import pytest  # doctest: +SKIP
    >>> run_peer("ctffind", ["mic.mrc", "diag.mrc", 1.0, 300, 2.7, 0.07, 512])  # doctest: +SKIP
    """
    exe = find_peer(program)
    if exe is None:
        raise FileNotFoundError(peer_status(program))
    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"peer_{program}_"))
    stdin = "".join(f"{a}\n" for a in answers)
    return run_command([str(exe)], wd, stdin=stdin, timeout=timeout, label=program)


def run_command(argv: list, workdir: Path | None = None, stdin: str | None = None, timeout: float = 900.0,
                label: str | None = None) -> PeerRun:
    """Run any command and measure it as :func:`run_peer` does (CPU time and ``VmHWM``).

    Parameters
    ----------
    argv : list
        The command and its arguments (converted with ``str``).
    workdir : Path, optional
        Working directory; a new temporary directory when omitted.
    stdin : str, optional
        Text fed to the command's standard input (closed afterwards).
    timeout : float
        Seconds before the run is killed.
    label : str, optional
        Name of the run (and of its log ``<label>.log`` in ``workdir``);
        default the executable's name.

    Returns
    -------
    PeerRun
        As :func:`run_peer`; ``output`` is stdout and stderr together.

    >>> r = run_command(["true"])
    >>> r.returncode, r.cpu_s >= 0.0
    (0, True)
    """
    argv = [str(a) for a in argv]
    label = label or Path(argv[0]).name
    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"peer_{label}_"))
    wd.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    log = wd / f"{label}.log"
    peak_kb = anon_kb = 0
    with open(log, "w+b") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=wd)
        if stdin:
            proc.stdin.write(stdin.encode())
        proc.stdin.close()
        # ru_maxrss of children counts the memory of this (forked) Python process before exec, so the
        # peer's own high-water mark is read from /proc while it runs (Linux; else ru_maxrss); RssAnon
        # too, since VmHWM also counts the pages of a memory-mapped stack (reclaimable, not allocated)
        while proc.poll() is None:
            hwm, anon = _status_kb(proc.pid, ("VmHWM:", "RssAnon:"))
            peak_kb, anon_kb = max(peak_kb, hwm), max(anon_kb, anon)
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"{label} ran longer than {timeout:g} s")
            time.sleep(0.01)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    peak_mb = peak_kb / 1024.0 if peak_kb else after.ru_maxrss / 1024.0
    return PeerRun(label, proc.returncode, log.read_text(errors="replace"), cpu, wall, peak_mb, wd, anon_kb / 1024.0)


# ---------------------------------------------------------------- RELION


def find_relion(program: str) -> Path | None:
    """Path of RELION's ``program`` (e.g. ``"relion_reconstruct"``) under ``RELION_BIN``, or ``None``.

    RELION is not part of this repository either: point ``RELION_BIN`` at the
    ``bin`` directory of a RELION build.

    >>> find_relion("definitely-not-a-relion-program") is None
    True
    """
    d = os.environ.get("RELION_BIN", "").strip()
    if not d:
        return None
    exe = Path(d).expanduser() / program
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def relion_status(program: str) -> str:
    """One line saying where RELION's ``program`` is, or why there is none."""
    d = os.environ.get("RELION_BIN", "").strip()
    if not d:
        return f"RELION {program}: not available (set RELION_BIN to the bin directory of a RELION build)"
    exe = find_relion(program)
    if exe is None:
        return f"RELION {program}: not available ({program} not found in RELION_BIN={d})"
    return f"RELION {program}: {exe}"


def _vm_hwm_kb(pid: int) -> int:
    return _status_kb(pid, ("VmHWM:",))[0]


def _status_kb(pid: int, keys: tuple[str, ...]) -> tuple[int, ...]:
    """Values (kB) of ``keys`` in ``/proc/<pid>/status``; 0 for those missing."""
    found = dict.fromkeys(keys, 0)
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k = line.split(":", 1)[0] + ":"
                if k in found:
                    found[k] = int(line.split()[1])
    except OSError:
        pass
    return tuple(found[k] for k in keys)


# ---------------------------------------------------------------- ctffind


def ctffind_answers(micrograph: Path, diagnostic: Path, pixel_size: float, voltage: float = 300.0,
                    cs: float = 2.7, amplitude_contrast: float = 0.07, box: int = 512,
                    min_res: float = 30.0, max_res: float = 5.0, min_df: float = 5000.0,
                    max_df: float = 50000.0, step: float = 100.0) -> list:
    """Answers for ctffind (5.x): one image, no known astigmatism, no phase shift, no tilt,
    no thickness, no expert options (so: resampling to 1.4 Å when the pixel is smaller, one thread)."""
    return [micrograph, diagnostic, pixel_size, voltage, cs, amplitude_contrast, box, min_res, max_res,
            min_df, max_df, step, "no", "no", "no", "no", "no", "no", "no"]


def run_ctffind(micrograph: Path, pixel_size: float, workdir: Path | None = None, **kw) -> tuple[dict, PeerRun]:
    """Fit one micrograph with ctffind; returns ({df1, df2, angast, pshift, score, fit_resolution}, run).

    The fit is read from the ``.txt`` file ctffind writes beside its diagnostic image.
    """
    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="peer_ctffind_"))
    diag = wd / "diagnostic.mrc"
    run = run_peer("ctffind", ctffind_answers(Path(micrograph).resolve(), diag, pixel_size, **kw), wd)
    txt = diag.with_suffix(".txt")
    if run.returncode != 0 or not txt.is_file():
        raise RuntimeError(f"ctffind failed (rc {run.returncode}):\n{run.output[-2000:]}")
    rows = [ln.split() for ln in txt.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    v = [float(x) for x in rows[0]]
    fit = {"df1": v[1], "df2": v[2], "angast": v[3], "pshift": v[4], "score": v[5], "fit_resolution": v[6]}
    return fit, run


# ---------------------------------------------------------------- find_particles


def find_particles_answers(micrograph: Path, output_stack: Path, pixel_size: float, df1: float, df2: float,
                           angast: float, voltage: float = 300.0, cs: float = 2.7,
                           amplitude_contrast: float = 0.07, pshift: float = 0.0, typical_radius: float = 25.0,
                           maximum_radius: float = 32.0, highest_resolution: float = 15.0,
                           min_distance_from_edges: int = 129, threshold: float = 8.0,
                           avoid_low_variance: bool = True, avoid_high_variance: bool = True,
                           low_variance_fwhm: float = -1.0, high_variance_fwhm: float = 2.0,
                           avoid_abnormal_mean: bool = True, background_algorithm: int = 0,
                           background_boxes: int = 50, particles_white: bool = False) -> list:
    """Answers for find_particles, template-free (a disc of ``typical_radius``), no stack written."""
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    return [micrograph, pixel_size, voltage, cs, amplitude_contrast, pshift, df1, df2, angast, "no",
            typical_radius, maximum_radius, highest_resolution, output_stack, 0, min_distance_from_edges,
            threshold, yn(avoid_low_variance), yn(avoid_high_variance), low_variance_fwhm, high_variance_fwhm,
            yn(avoid_abnormal_mean), background_algorithm, background_boxes, yn(particles_white)]


def run_find_particles(micrograph: Path, pixel_size: float, df1: float, df2: float, angast: float,
                       workdir: Path | None = None, **kw):
    """Pick one micrograph with cisTEM's find_particles; returns (picks, run).

    ``picks`` is an (N, 3) array of x, y in pixels from the first pixel (0-based,
    our convention) and peak height, read from the ``.plt`` file find_particles
    writes when run locally.
    """
    import numpy as np

    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="peer_find_particles_"))
    stack = wd / "candidates.mrc"
    run = run_peer("find_particles", find_particles_answers(Path(micrograph).resolve(), stack, pixel_size,
                                                            df1, df2, angast, **kw), wd)
    if run.returncode != 0:
        raise RuntimeError(f"find_particles failed (rc {run.returncode}):\n{run.output[-2000:]}")
    plt = stack.with_suffix(".plt")
    if not plt.is_file():
        return np.zeros((0, 3)), run
    rows = [ln.split() for ln in plt.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    a = np.array([[float(x) for x in r] for r in rows]).reshape(-1, 6)
    # .plt (Imagic order): column 0 = ny - y, column 1 = x + 1 (micrograph pixels; checked against
    # simulated truth: y runs the other way); column 5 = peak height
    ny = int(np.frombuffer(Path(micrograph).read_bytes()[4:8], "<i4")[0])
    return np.column_stack([a[:, 1] - 1.0, ny - a[:, 0], a[:, 5]]), run


def cpu_line(label: str, run: PeerRun) -> str:
    """A short summary line of a peer run."""
    return f"{label}: {run.cpu_s:.2f} s CPU, {run.wall_s:.2f} s wall, peak {run.peak_mb:.0f} MB"



