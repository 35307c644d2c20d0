"""``cistem-mpi pipeline``: config errors, skipping finished steps, --from/--until, a failing step.

The default-suite part runs the short chain align-movies -> find-ctf on two
tiny simulated movies (512² x 8 frames); the whole chain from movies to
auto-refine is in ``test_pipeline_full.py`` (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from cistem_mpi import cli
from cistem_mpi.db.project import Project
from cistem_mpi.drivers import pipeline as pl
from cistem_mpi.drivers.simulate import simulate_movies
from helpers_pipeline import FAST

PS = 1.5
EPF = 4.0


def _jobs(root: Path) -> list[dict]:
    with Project.open(root, readonly=True) as p:
        return [dict(r) for r in p.conn.execute("SELECT id, type, status, arguments FROM jobs ORDER BY id")]


def _pipeline(capfd, root: Path, *extra: str, config: Path | None = None) -> subprocess.CompletedProcess:
    """Run the pipeline in this process (its steps are child processes, as always); capture fds 1 and 2."""
    argv = ["pipeline", "-p", str(root), *extra]
    if config is not None:
        argv += ["--config", str(config)]
    capfd.readouterr()
    rc = cli.main(argv)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, rc, out, err)


@pytest.fixture(scope="module")
def movies_project(tmp_path_factory) -> tuple[Path, Path]:
    """A project with two imported simulated movies, and the fast config."""
    d = tmp_path_factory.mktemp("pipeline")
    sim = simulate_movies(d / "sim", 2, (512, 512), 8, EPF, PS, seed=11, formats=("tiff",), ice_sigma=0.05,
                          n_per_micrograph=12)
    root = d / "proj"
    Project.create(root).close()
    assert cli.main(["import", "movies", "-p", str(root), *map(str, sim.movies["tiff"]), "--pixel-size", str(PS),
                     "--dose-per-frame", str(EPF), "--gain", str(sim.gain)]) == 0
    cfg = d / "fast.toml"
    cfg.write_text(FAST)
    return root, cfg


# ------------------------------------------------------------------ config errors: one line naming the key
def _config_error(tmp_path: Path, capsys, text: str, *extra: str) -> str:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    root = tmp_path / "proj"
    if not root.exists():
        Project.create(root).close()
    before = _jobs(root)
    rc = cli.main(["pipeline", "-p", str(root), "--config", str(cfg), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {cfg}: "), err
    assert _jobs(root) == before  # nothing ran
    return err


def test_unknown_key_is_one_line(tmp_path, capsys):
    err = _config_error(tmp_path, capsys, "[find-ctf]\nbox = 256\nboxx = 3\n")
    assert "[find-ctf] unknown key 'boxx'" in err
    assert "min-resolution" in err  # the keys it takes are listed


def test_unknown_step_and_pipeline_set_key(tmp_path, capsys):
    assert "unknown step [find-ctff]" in _config_error(tmp_path, capsys, "[find-ctff]\nbox = 256\n")
    err = _config_error(tmp_path, capsys, "[find-ctf]\nimages = [1]\n")
    assert "unknown key 'images' (set by the pipeline)" in err


@pytest.mark.parametrize("text, expected", [
    ('[find-ctf]\nbox = "256"\n', '[find-ctf] box: expected an integer, got "256"'),
    ("[find-ctf]\nmax-resolution = true\n", "[find-ctf] max-resolution: expected a number, got true"),
    ("[align-movies]\ncross-half-width = [1]\n", "[align-movies] cross-half-width: expected a list of 2 integers"),
    ('[align-movies]\nsmoothing = "spline"\n', '[align-movies] smoothing: "spline" is not one of'),
    ("[find-ctf]\nranks = 0\n", "[find-ctf] ranks: expected an integer >= 1, got 0"),
    ("[select-classes]\nclasses = [0]\n", "[select-classes] classes: expected \"auto\" or a list"),
])
def test_type_errors_are_one_line(tmp_path, capsys, text, expected):
    assert expected in _config_error(tmp_path, capsys, text)


def test_missing_values_name_the_key(tmp_path, capsys):
    err = _config_error(tmp_path, capsys, "[find-ctf]\n\nbox =\n")
    assert err.endswith("line 3: box: missing value"), err
    # a key the chain needs and no job default gives: only when that step is selected
    err = _config_error(tmp_path, capsys, "[find-ctf]\nbox = 256\n", "--until", "package-positions")
    assert "[package-positions] box: missing value" in err
    cfg = tmp_path / "bad.toml"
    assert pl.load_config(cfg, pl._selection(pl_args(until="find-particles"))).get("find-ctf") == {"box": 256}


def pl_args(**kw):
    import argparse

    return argparse.Namespace(from_step=kw.get("from_"), until_step=kw.get("until"))


def test_print_config_documents_every_key():
    text = pl.default_config_text()
    data = tomllib.loads(text)
    assert list(data) == list(pl.STEP_NAMES)
    for step in pl.STEPS:
        if step.job_type is None:
            continue
        for key, opt in pl.step_options(step).items():
            assert f"{key} =" in text  # every key (commented when it has no default)
            if opt.default is not None and key in data[step.name]:
                assert data[step.name][key] == opt.default
    assert pl.load_config(None).steps == {}
    assert "# box = " in text and "REQUIRED" in text  # package-positions' box is the one key to add


def test_printed_config_loads(tmp_path):
    cfg = tmp_path / "all.toml"
    cfg.write_text(pl.default_config_text().replace("# box = \n", "box = 96\n", 1))
    loaded = pl.load_config(cfg, list(pl.STEPS))
    assert loaded.get("package-positions")["box"] == 96
    assert loaded.get("find-ctf")["box"] == 512


def test_from_after_until_is_refused(tmp_path, capsys):
    Project.create(tmp_path / "p").close()
    rc = cli.main(["pipeline", "-p", str(tmp_path / "p"), "--from", "find-ctf", "--until", "align-movies"])
    assert rc == 2
    assert "comes after --until" in capsys.readouterr().err


# ------------------------------------------------------------------ the short chain on tiny movies
def test_finished_steps_are_skipped(movies_project, capfd):
    root, cfg = movies_project
    first = _pipeline(capfd, root, "--until", "find-ctf", config=cfg)
    assert first.returncode == 0, first.stderr + first.stdout
    jobs = _jobs(root)
    types = [j["type"] for j in jobs if j["status"] == "finished"]
    assert types[0].startswith("import") and types[1:] == ["align_movies", "find_ctf"]
    assert "align-movies: ran in" in first.stdout and "find-ctf: ran in" in first.stdout
    args = json.loads(jobs[2]["arguments"])
    assert args["images"] == ["1", "2"] and args["box"] == 256  # inputs and settings are recorded
    # the same chain again runs nothing
    second = _pipeline(capfd, root, "--until", "find-ctf", config=cfg)
    assert second.returncode == 0, second.stderr
    assert _jobs(root) == jobs
    assert "align-movies: skipped" in second.stdout and "find-ctf: skipped" in second.stdout
    assert "running" not in second.stdout


def test_from_until_and_changed_settings(movies_project, capfd, tmp_path):
    root, cfg = movies_project
    if not any(j["type"] == "find_ctf" for j in _jobs(root)):
        assert _pipeline(capfd, root, "--until", "find-ctf", config=cfg).returncode == 0
    before = _jobs(root)
    # --from/--until select one step: find-ctf is skipped, align-movies is not even looked at
    r = _pipeline(capfd, root, "--from", "find-ctf", "--until", "find-ctf", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "align-movies" not in r.stdout and "find-ctf: skipped" in r.stdout
    assert _jobs(root) == before
    # a changed setting of a later step: only that step runs (--until stops before package-positions,
    # whose box is missing in this config and is not asked for)
    changed = tmp_path / "changed.toml"
    changed.write_text(FAST + "\n[find-particles]\nthreshold = 3.0\nmaximum-radius = 60.0\n"
                              "characteristic-radius = 40.0\nedge = 40\n")
    r = _pipeline(capfd, root, "--until", "find-particles", config=changed)
    assert r.returncode == 0, r.stderr + r.stdout
    after = _jobs(root)
    new = [j["type"] for j in after[len(before):]]
    assert new == ["find_particles"], new
    assert "align-movies: skipped" in r.stdout and "find-ctf: skipped" in r.stdout
    assert "package-positions" not in r.stdout
    # the picking ran on the images find-ctf estimated
    ctf_images = json.loads(before[-1]["arguments"])["images"]
    with Project.open(root, readonly=True) as p:
        fitted = sorted(str(r[0]) for r in p.conn.execute(
            "SELECT DISTINCT image_id FROM ctf_estimates WHERE job_id = ?", (before[-1]["id"],)))
    assert sorted(json.loads(after[-1]["arguments"])["images"]) == fitted
    assert set(fitted) <= set(ctf_images)


def test_failing_step_stops_the_chain_named(movies_project, capfd, tmp_path):
    root, cfg = movies_project
    if not any(j["type"] == "find_ctf" for j in _jobs(root)):
        assert _pipeline(capfd, root, "--until", "find-ctf", config=cfg).returncode == 0
    bad = tmp_path / "bad_pick.toml"
    # a particle 3000 Å across fits on no image: find-particles fails (after the earlier steps were skipped)
    bad.write_text(FAST + "\n[find-particles]\nmaximum-radius = 1500.0\ncharacteristic-radius = 40.0\n"
                          "[package-positions]\nbox = 96\n")
    before = _jobs(root)
    r = _pipeline(capfd, root, config=bad)
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step find-particles failed"), last
    assert "the steps before it are registered" in last
    assert "package-positions: running" not in r.stdout  # the chain stopped there
    after = _jobs(root)
    assert after == before  # align-movies and find-ctf stay registered; the refused job left nothing
    assert [j["status"] for j in after if j["type"] in ("align_movies", "find_ctf")] == ["finished"] * 2


# ------------------------------------------------------------------ a killed iterative step continues (--resume)
def _fake_upstream(root: Path) -> int:
    """A finished 'package create --from-classification' job with a package and its refinement; its job id."""
    from cistem_mpi.db import jobs as jobs_db

    with Project.open(root) as p:
        job = jobs_db.create_job(p.conn, "create_package", {"from_classification": 1, "select": "1"}, 1)
        stack = jobs_db.PendingRow("particle_stacks", dict(path="s.mrcs", name="s", n_particles=10, box=32,
                                                           pixel_size=2.0, voltage=300.0, cs=2.7,
                                                           amplitude_contrast=0.07))
        pkg = jobs_db.PendingRow("refinement_packages", dict(name="p", stack_id=stack, n_particles=10))
        ref = jobs_db.PendingRow("refinements", dict(package_id=pkg, kind="start"))
        jobs_db.finish_job(p.conn, job, [stack, pkg, ref])
        return job


def test_killed_iterative_step_is_resumed(tmp_path, monkeypatch, capfd):
    import subprocess as sp

    from cistem_mpi.db import jobs as jobs_db

    root = tmp_path / "proj"
    Project.create(root).close()
    up = _fake_upstream(root)
    step = pl._BY_NAME["ab-initio"]
    argv = pl._argv(step, {"rounds": 3}, ["--refinement", "1"])
    want = pl.would_record(step, argv, str(root))
    cfg = tmp_path / "c.toml"
    cfg.write_text("[ab-initio]\nrounds = 3\n")
    # the killed job: recorded as running by a process that is gone, with a checkpoint in its scratch
    scratch = tmp_path / "scratch_ai"
    (scratch / "checkpoints").mkdir(parents=True)
    (scratch / "checkpoints" / "round_0002.npz").write_bytes(b"x")
    dead = sp.Popen(["true"])
    dead.wait()
    with Project.open(root) as p:
        killed = jobs_db.create_job(p.conn, "ab_initio", {**want, "project": str(root), "resume": None}, 1,
                                    scratch_path=str(scratch))
        p.conn.execute("UPDATE jobs SET pid = ? WHERE id = ?", (dead.pid, killed))
        p.conn.commit()
    calls = []

    def fake_child(cmd):  # stands for the real job: records itself as finished
        calls.append(cmd)
        with Project.open(root) as p:
            j = jobs_db.create_job(p.conn, "ab_initio", {**want, "resume": killed}, 1)
            jobs_db.finish_job(p.conn, j, [jobs_db.PendingRow("refinements", dict(package_id=1, kind="startup"))])
        return 0

    monkeypatch.setattr(pl, "_run_child", fake_child)
    r = _pipeline(capfd, root, "--from", "ab-initio", "--until", "ab-initio", config=cfg)
    assert r.returncode == 0, r.stderr
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[cmd.index("--resume") + 1] == str(killed)
    assert cmd[cmd.index("--refinement") + 1] == "1" and cmd[cmd.index("--rounds") + 1] == "3"
    assert "ab-initio: resumed" in r.stdout
    # the chain again: the step finished with these settings after its input: skipped
    r = _pipeline(capfd, root, "--from", "ab-initio", "--until", "ab-initio", config=cfg)
    assert r.returncode == 0 and len(calls) == 1 and "ab-initio: skipped" in r.stdout
    # other settings: a new job (no --resume: the killed job had different settings)
    cfg.write_text("[ab-initio]\nrounds = 4\n")
    r = _pipeline(capfd, root, "--from", "ab-initio", "--until", "ab-initio", config=cfg)
    assert len(calls) == 2 and "--resume" not in calls[1]
    # a newer input (the package step ran again): the finished ab-initio is out of date
    new_up = _fake_upstream(root)
    assert new_up > up
    with Project.open(root, readonly=True) as p:
        new_ref = p.conn.execute("SELECT id FROM refinements WHERE job_id = ?", (new_up,)).fetchone()[0]
    cfg.write_text("[ab-initio]\nrounds = 3\n")
    r = _pipeline(capfd, root, "--from", "ab-initio", "--until", "ab-initio", config=cfg)
    assert len(calls) == 3 and "--resume" not in calls[2]
    assert calls[2][calls[2].index("--refinement") + 1] == str(new_ref)


# ------------------------------------------------------------------ the whole chain, killed during classify-2d
FULL = FAST + """
[find-particles]
ranks = 2
maximum-radius = 60.0
characteristic-radius = 45.0
edge = 48
threshold = 3.0

[package-positions]
box = 96
largest-dimension = 120.0

[classify-2d]
classes = 2
rounds = 3
all-particles-rounds = 1

[select-classes]
classes = [1, 2]

[ab-initio]
starts = 1
rounds = 2
end-resolution = 12.0
min-particles-per-class = 10

[auto-refine]
max-rounds = 1
high-resolution = 12.0
"""


@pytest.mark.slow
def test_full_chain_killed_during_classify_2d_continues(tmp_path):
    """Movies -> auto-refine; the chain is killed during classify-2d, the rerun resumes it and ends with
    the same outputs (every step's, the final map bit for bit) as an uninterrupted chain.

    Mechanics only (104 particles, 4 tiny movies, 1-round refinement): the map's quality against the
    truth is the demo's business (``cistem-mpi demo --compare``, tests/test_demo.py).
    """
    import os
    import signal
    import time

    sim = simulate_movies(tmp_path / "sim", 4, (1024, 1024), 8, EPF, PS, seed=5, formats=("tiff",), ice_sigma=0.01,
                          n_per_micrograph=40, particle_contrast=0.3, box=96)
    root = tmp_path / "proj"
    Project.create(root).close()
    assert cli.main(["import", "movies", "-p", str(root), *map(str, sim.movies["tiff"]), "--pixel-size", str(PS),
                     "--dose-per-frame", str(EPF), "--gain", str(sim.gain)]) == 0
    cfg = tmp_path / "full.toml"
    cfg.write_text(FULL)
    cmd = [sys.executable, "-m", "cistem_mpi", "pipeline", "-p", str(root), "--config", str(cfg)]
    log = open(tmp_path / "first.txt", "w")
    first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # kill the pipeline (SIGKILL: no chance to clean up) once classify-2d has checkpointed a round
    deadline = time.monotonic() + 400
    killed_job = None
    while time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.5)
        running = [j for j in _jobs(root) if j["type"] == "classify_2d" and j["status"] == "running"]
        if running:
            with Project.open(root, readonly=True) as p:
                scratch = p.conn.execute("SELECT scratch_path FROM jobs WHERE id = ?",
                                         (running[0]["id"],)).fetchone()[0]
            ck = Path(scratch) / "checkpoints"
            if ck.is_dir() and any(ck.iterdir()):
                os.kill(first.pid, signal.SIGKILL)
                killed_job = running[0]["id"]
                break
    first.wait(60)
    log.close()
    assert killed_job is not None, (tmp_path / "first.txt").read_text()[-3000:]
    for _ in range(120):  # the job dies with the pipeline (SIGTERM from the kernel) and records itself
        if [j for j in _jobs(root) if j["id"] == killed_job][0]["status"] != "running":
            break
        time.sleep(0.5)
    states = {j["id"]: j["status"] for j in _jobs(root)}
    assert states[killed_job] in ("cancelled", "failed", "running")
    before = [j for j in _jobs(root) if j["status"] == "finished"]
    assert [j["type"] for j in before][1:] == ["align_movies", "find_ctf", "find_particles", "create_package"]

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout
    for step in ("align-movies", "find-ctf", "find-particles", "package-positions"):
        assert f"{step}: skipped" in out, out
    assert f"classify-2d: resuming job {killed_job}" in out and "classify-2d: resumed" in out
    for step in ("package-classes", "ab-initio", "auto-refine"):
        assert f"{step}: ran in" in out
    assert "final resolution:" in out
    jobs = _jobs(root)
    resumed = [j for j in jobs if j["type"] == "classify_2d" and j["status"] == "finished"]
    assert len(resumed) == 1
    with Project.open(root, readonly=True) as p:
        assert p.conn.execute("SELECT resumed_from FROM jobs WHERE id = ?", (resumed[0]["id"],)).fetchone()[0] \
            == killed_job
    # and once more: nothing left to do
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and _jobs(root) == jobs
    assert third.stdout.count(": skipped") == 8  # every job step (select-classes is no job)

    # the same chain uninterrupted, on the same movies: every step's output, and so the final map, is the same
    other = tmp_path / "uninterrupted"
    Project.create(other).close()
    assert cli.main(["import", "movies", "-p", str(other), *map(str, sim.movies["tiff"]), "--pixel-size", str(PS),
                     "--dose-per-frame", str(EPF), "--gain", str(sim.gain)]) == 0
    plain = subprocess.run([*cmd[:5], str(other), *cmd[6:]], capture_output=True, text=True, timeout=900)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    resumed_out, plain_out = _step_outputs(root), _step_outputs(other)
    assert list(resumed_out) == list(plain_out)
    for step, arrays in plain_out.items():
        for name, value in arrays.items():
            got = resumed_out[step][name]
            assert got.shape == value.shape, (step, name)
            # bit-identical: every step is deterministic for fixed seeds, also across a resume
            assert np.array_equal(got, value), f"{step}: {name} differs (max {np.abs(got - value).max()})"


def _step_outputs(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """What each step of a finished chain produced (numbers only: paths and ids differ between projects)."""
    import mrcfile

    from cistem_mpi.io.param_store import read_params_h5

    def mrc(rel: str) -> np.ndarray:
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        return np.asarray(mrcfile.read(path), dtype=np.float32)

    def params(rel: str) -> np.ndarray:
        t = read_params_h5(Path(rel) if Path(rel).is_absolute() else root / rel)
        return np.stack([t[c].astype(np.float64) for c in ("psi", "theta", "phi", "shx", "shy", "df1", "df2",
                                                           "occ", "score")], axis=1)

    out: dict[str, dict[str, np.ndarray]] = {}
    with Project.open(root, readonly=True) as p:
        q = p.conn.execute
        out["align-movies"] = {r[0]: mrc(r[1]) for r in q("SELECT name, path FROM images ORDER BY id")}
        out["find-ctf"] = {"ctf": np.array(q("SELECT df1, df2, angast FROM ctf_estimates ORDER BY id").fetchall())}
        out["find-particles"] = {"positions": np.array(q("SELECT image_id, x, y FROM particle_positions "
                                                         "ORDER BY id").fetchall())}
        packages = q("SELECT p.id, s.path FROM refinement_packages p JOIN particle_stacks s ON s.id = p.stack_id "
                     "ORDER BY p.id").fetchall()
        out["package-positions"] = {"stack": mrc(packages[0][1])}
        c2d = q("SELECT path, params_path FROM classifications_2d ORDER BY number DESC LIMIT 1").fetchone()
        out["classify-2d"] = {"averages": mrc(c2d[0]), "params": params(c2d[1])}
        out["package-classes"] = {"stack": mrc(packages[-1][1])}
        startup = q("SELECT path FROM volumes WHERE kind = 'startup' ORDER BY id DESC LIMIT 1").fetchone()
        out["ab-initio"] = {"map": mrc(startup[0])}
        final = q("SELECT v.path, rc.params_path FROM volumes v JOIN refinement_classes rc "
                  "ON rc.refinement_id = v.refinement_id AND rc.class_number = 1 "
                  "WHERE v.kind = 'refinement' ORDER BY v.id DESC LIMIT 1").fetchone()
        out["auto-refine"] = {"map": mrc(final[0]), "params": params(final[1])}
    return out


def test_failed_job_stops_the_chain_with_its_error(tmp_path, monkeypatch, capfd):
    """A step whose job records itself failed: the chain stops there, naming the step, the job and its error."""
    from cistem_mpi.db import jobs as jobs_db

    root = tmp_path / "proj"
    Project.create(root).close()
    _fake_upstream(root)
    calls = []

    def failing_child(cmd):
        calls.append(cmd)
        with Project.open(root) as p:
            j = jobs_db.create_job(p.conn, "ab_initio", {"refinement": 1}, 1)
            jobs_db.end_job(p.conn, j, "failed", "rank 1 on node7: MemoryError: out of memory")
        return 3

    monkeypatch.setattr(pl, "_run_child", failing_child)
    r = _pipeline(capfd, root, "--from", "ab-initio")
    assert r.returncode == 3 and len(calls) == 1  # auto-refine never started
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: step ab-initio failed after ")
    assert "job 2 failed: rank 1 on node7: MemoryError: out of memory (exit status 3)" in line
    assert "auto-refine: running" not in r.stdout
    jobs = _jobs(root)
    assert [(j["type"], j["status"]) for j in jobs] == [("create_package", "finished"), ("ab_initio", "failed")]
