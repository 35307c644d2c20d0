"""The pipeline as dependent Slurm jobs (jobscripts/slurm_pipeline.sh) and its job-array mode.

* Without Slurm: ``pipeline --array-prepare/--array-run/--array-merge`` run by hand (the array tasks
  get ``SLURM_ARRAY_TASK_ID`` as Slurm would give it): the merged job is the step's one job, and the
  chain afterwards skips it as it skips a job run in one piece.
* Under the real local Slurm (tests/slurm_setup.py): the chain align-movies -> find-ctf ->
  find-particles -> package-positions on two tiny movies, movies and CTF as 2-task arrays,
  find-particles one 2-rank job; the steps run in order, each found its inputs in the database.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cistem_mpi import cli
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.simulate import simulate_movies
from helpers_pipeline import FAST
from helpers_slurm import cistem_exe
from runtime_helpers import REPO, run

PS = 1.5
EPF = 4.0
PICK = """
[find-particles]
ranks = 2
threshold = 3.0
maximum-radius = 60.0
characteristic-radius = 40.0
edge = 40

[package-positions]
box = 96
"""


def _jobs(root: Path) -> list[dict]:
    with Project.open(root, readonly=True) as p:
        rows = [dict(r) for r in p.conn.execute(
            "SELECT id, type, status, ranks, arguments, result, started_at, ended_at FROM jobs ORDER BY id")]
    for r in rows:
        r["arguments"] = json.loads(r["arguments"] or "{}")
        r["result"] = json.loads(r["result"] or "null")
    return rows


def _movies_project(d: Path, size: int = 512, frames: int = 8) -> Path:
    sim = simulate_movies(d / "sim", 2, (size, size), frames, EPF, PS, seed=11, formats=("tiff",), ice_sigma=0.05,
                          n_per_micrograph=12 * (size // 256) ** 2 // 4)
    root = d / "proj"
    Project.create(root).close()
    assert cli.main(["import", "movies", "-p", str(root), *map(str, sim.movies["tiff"]), "--pixel-size", str(PS),
                     "--dose-per-frame", str(EPF), "--gain", str(sim.gain)]) == 0
    return root


def _pl(capfd, monkeypatch, root: Path, cfg: Path, *extra: str, task: tuple[int, int] | None = None):
    """The pipeline in this process (its steps are child processes, as always); fds 1 and 2 captured."""
    import subprocess

    if task is None:
        monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    else:  # what Slurm gives task k of --array=0-(M-1)
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task[0]))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(task[1]))
    argv = ["pipeline", "-p", str(root), "--config", str(cfg), *extra]
    capfd.readouterr()
    rc = cli.main(argv)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, rc, out, err)


# ------------------------------------------------------------------ array mode by hand (no Slurm)
def test_array_mode_of_one_step_by_hand(tmp_path, capfd, monkeypatch):
    root = _movies_project(tmp_path, 256, 6)  # only align-movies runs: the smallest movies do
    cfg = tmp_path / "fast.toml"
    cfg.write_text(FAST)
    one = ["--from", "align-movies", "--until", "align-movies"]
    adir = tmp_path / "arr"
    r = _pl(capfd, monkeypatch, root, cfg, *one, "--array-prepare", str(adir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "align-movies: prepared" in r.stdout
    assert [j["type"] for j in _jobs(root)] == ["import_movies"]  # planning records nothing
    for task in (0, 1):
        r = _pl(capfd, monkeypatch, root, cfg, "--array-run", str(adir), task=(task, 2))
        assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in adir.glob("part_*.pkl")) == ["part_00000.pkl", "part_00001.pkl"]
    assert [j["type"] for j in _jobs(root)] == ["import_movies"]  # the tasks never write the database
    r = _pl(capfd, monkeypatch, root, cfg, *one, "--array-merge", str(adir))
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = _jobs(root)
    assert [(j["type"], j["status"]) for j in jobs][1:] == [("align_movies", "finished")]
    merged = jobs[1]
    assert merged["result"]["mode"] == "array" and merged["result"]["succeeded"] == 2
    assert merged["arguments"]["movies"] == [1, 2] and merged["arguments"]["max_iterations"] == 5
    # the merged job is the step's job: the ordinary chain skips it and hands its images on
    r = _pl(capfd, monkeypatch, root, cfg, "--until", "align-movies")
    assert r.returncode == 0 and "align-movies: skipped" in r.stdout, r.stdout + r.stderr
    # planned again: the plan says "finished already", the tasks and the merge do nothing
    again = tmp_path / "arr2"
    r = _pl(capfd, monkeypatch, root, cfg, *one, "--array-prepare", str(again))
    assert r.returncode == 0 and "align-movies: skipped" in r.stdout, r.stdout + r.stderr
    r = _pl(capfd, monkeypatch, root, cfg, "--array-run", str(again), task=(0, 1))
    assert r.returncode == 0 and "skipped" in r.stdout and not list(again.glob("part_*"))
    r = _pl(capfd, monkeypatch, root, cfg, *one, "--array-merge", str(again))
    assert r.returncode == 0 and "align-movies: skipped" in r.stdout
    assert _jobs(root) == jobs
    # a merge of a plan made for another step is refused (one line, nothing recorded)
    r = _pl(capfd, monkeypatch, root, cfg, "--from", "find-ctf", "--until", "find-ctf", "--array-merge", str(adir))
    assert r.returncode == 2 and "planned for step align-movies, not find-ctf" in r.stderr
    assert _jobs(root) == jobs


def test_array_options_need_one_per_item_step(tmp_path, capsys):
    Project.create(tmp_path / "p").close()
    rc = cli.main(["pipeline", "-p", str(tmp_path / "p"), "--until", "find-ctf", "--array-prepare", str(tmp_path)])
    assert rc == 2
    assert "--array-prepare: select exactly one of the steps align-movies, find-ctf, find-particles" \
        in capsys.readouterr().err


def test_print_steps_gives_each_steps_ranks(tmp_path, capsys):
    Project.create(tmp_path / "p").close()
    cfg = tmp_path / "c.toml"
    cfg.write_text(FAST + PICK + "\n[auto-refine]\nranks = 16\n")
    assert cli.main(["pipeline", "-p", str(tmp_path / "p"), "-c", str(cfg), "--ranks", "3", "--print-steps"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[:-1] == ["align-movies 3", "find-ctf 3", "find-particles 2", "package-positions 3",
                          "classify-2d 3", "select-classes 0", "package-classes 3", "ab-initio 3",
                          "auto-refine 16"]


# ------------------------------------------------------------------ real Slurm
@pytest.mark.slurm
@pytest.mark.slow
def test_chain_as_dependent_slurm_jobs(slurm, tmp_path):
    exe = cistem_exe()
    env = {**slurm.env, "CISTEM_MPI": exe, "PATH": f"{os.path.dirname(exe)}:{os.environ.get('PATH', '')}"}
    root = _movies_project(tmp_path)
    cfg = tmp_path / "chain.toml"
    cfg.write_text(FAST + PICK)
    logs = tmp_path / "logs"
    r = run([str(REPO / "jobscripts" / "slurm_pipeline.sh"), "-p", str(root), "-c", str(cfg),
             "--until", "package-positions", "--array", "align-movies=2", "--array", "find-ctf=2",
             "--dir", str(logs), "--wait"], env=env, timeout=400)
    out = r.stdout + r.stderr
    listing = (logs / "jobs.txt").read_text() if (logs / "jobs.txt").exists() else ""
    tails = "".join(f"\n== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*.out")))
    assert r.returncode == 0, out + tails
    # 3 + 3 + 1 + 1 Slurm jobs, each after the one before (afterok), all completed
    parts = [line.split()[:2] for line in listing.splitlines()]
    assert parts == [["align-movies", "prepare"], ["align-movies", "array"], ["align-movies", "merge"],
                     ["find-ctf", "prepare"], ["find-ctf", "array"], ["find-ctf", "merge"],
                     ["find-particles", "job"], ["package-positions", "job"]], listing
    assert out.count(": COMPLETED") == 8, out
    ids = [int(line.split()[2]) for line in listing.splitlines()]
    assert ids == sorted(ids)
    # the project: one finished job per step, in chain order, none overlapping the next
    jobs = _jobs(root)
    assert [(j["type"], j["status"]) for j in jobs] == [
        ("import_movies", "finished"), ("align_movies", "finished"), ("find_ctf", "finished"),
        ("find_particles", "finished"), ("create_package", "finished")], jobs
    for a, b in zip(jobs[1:], jobs[2:]):
        assert a["ended_at"] <= b["started_at"]
    am, ctf, pick, pkg = jobs[1:]
    assert am["result"]["mode"] == "array" and ctf["result"]["mode"] == "array"
    assert am["result"]["succeeded"] == 2 and ctf["result"]["succeeded"] == 2
    assert am["ranks"] == ctf["ranks"] == 1 and pick["ranks"] == 2 and pkg["ranks"] == 1
    # hand-over through the database between separately launched jobs
    with Project.open(root, readonly=True) as p:
        made = sorted(str(i) for (i,) in p.conn.execute("SELECT id FROM images WHERE job_id = ?", (am["id"],)))
        fitted = sorted(str(i) for (i,) in p.conn.execute(
            "SELECT DISTINCT image_id FROM ctf_estimates WHERE job_id = ?", (ctf["id"],)))
        n_particles = p.conn.execute("SELECT n_particles FROM refinement_packages WHERE job_id = ?",
                                     (pkg["id"],)).fetchone()[0]
    assert len(made) == 2 and sorted(ctf["arguments"]["images"]) == made
    assert fitted == made and sorted(pick["arguments"]["images"]) == fitted
    assert pkg["arguments"]["positions_job"] == [pick["id"]] and n_particles > 0
    # the array tasks ran as Slurm array tasks (one part per task) and the step job launched 2 ranks with srun
    assert len(list((logs / "align-movies").glob("part_*.pkl"))) == 2
    pick_log = next(logs.glob("find-particles-*.out")).read_text()
    assert "find-particles: running on 2 rank(s)" in pick_log
    # submitted again: every step is skipped (and nothing new is registered)
    r = run([str(REPO / "jobscripts" / "slurm_pipeline.sh"), "-p", str(root), "-c", str(cfg),
             "--until", "package-positions", "--array", "find-ctf=2", "--dir", str(tmp_path / "again"),
             "--wait"], env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _jobs(root) == jobs
    skipped = "".join(p.read_text() for p in (tmp_path / "again").glob("*.out"))
    for step in ("align-movies", "find-ctf", "find-particles", "package-positions"):
        assert f"{step}: skipped" in skipped, skipped
