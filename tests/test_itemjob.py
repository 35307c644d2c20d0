"""Per-item jobs (drivers/itemjob.py): bad items skipped, staged files, any rank count, Slurm array mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cistem_mpi.db.project import Project
from cistem_mpi.drivers.itemjob import ItemPlan, compute_items
from cistem_mpi.drivers.jobrun import staged_path
from helpers_jobs import db_dump
from runtime_helpers import need_mpiexec, run

PROG = Path(__file__).with_name("itemjob_prog.py")


def _toy(project: Path, *values: str, ranks: int = 1, extra: tuple[str, ...] = ()):
    cmd = [sys.executable, str(PROG), "--project", str(project), *extra, "--", *values]
    if ranks > 1:
        cmd = [need_mpiexec(), "-n", str(ranks), *cmd]
    return run(cmd, timeout=120)


def _state(project: Path):
    with Project.open(project, readonly=True) as p:
        job = p.conn.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
        rows = dict(p.conn.execute("SELECT key, value FROM settings WHERE key LIKE 'item_%'").fetchall())
    return job, rows


def _leftovers(project: Path) -> list[str]:
    return sorted(p.name for p in (project / "Assets").glob(".*.part"))


@pytest.mark.parametrize("ranks", [1, 3])
def test_bad_items_are_skipped_and_listed(project, ranks):
    res = _toy(project, "1", "-2", "3", "nan", "4", ranks=ranks)
    assert res.returncode == 0, res.stderr
    job, rows = _state(project)
    assert job["status"] == "finished" and job["type"] == "toy_items"
    result = json.loads(job["result"])
    assert result["succeeded"] == 3 and result["failed"] == 2 and result["ranks"] == ranks
    assert [f["name"] for f in result["failures"]] == ["item_1", "item_3"]
    assert "negative value -2.0" in result["failures"][0]["error"]
    assert rows == {"item_0": "1.0", "item_2": "9.0", "item_4": "16.0"}
    # good items' files have their final names; failed items left nothing, staged or final
    assert sorted(p.name for p in (project / "Assets").glob("item_*.txt")) == ["item_0.txt", "item_2.txt", "item_4.txt"]
    assert (project / "Assets" / "item_2.txt").read_text() == "9.0\n"
    assert _leftovers(project) == [] and "staged_outputs" in result
    assert "skipped item_1" in Path(job["log_path"]).read_text()


@pytest.mark.parametrize("ranks", [1, 3])
def test_every_item_failing_is_bad_input_and_changes_nothing(project, ranks):
    before = db_dump(project)
    res = _toy(project, "-1", "-2", ranks=ranks)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == "error: item_0: ValueError: negative value -1.0 (and 1 more item(s) failed)"
    assert db_dump(project) == before and _leftovers(project) == []


def test_same_results_for_1_and_3_ranks(tmp_path):
    outs = []
    for ranks in (1, 3):
        root = tmp_path / f"p{ranks}"
        Project.create(root).close()
        assert _toy(root, *[str(v) for v in range(7)], ranks=ranks).returncode == 0
        outs.append(_state(root)[1])
    assert outs[0] == outs[1] and len(outs[0]) == 7


def test_array_mode_prepare_tasks_merge(project, tmp_path):
    d = tmp_path / "arr"
    assert _toy(project, "1", "2", "-3", "4", extra=("--array-prepare", str(d))).returncode == 0
    before = db_dump(project)
    for task in (0, 1):
        res = _toy(project, "1", "2", "-3", "4", extra=("--array-run", str(d), "--array-task", str(task),
                                                        "--array-count", "2"))
        assert res.returncode == 0, res.stderr
    assert db_dump(project) == before  # array tasks never touch the database
    assert len(_leftovers(project)) == 3  # staged until the merge registers them
    res = _toy(project, "1", "2", "-3", "4", extra=("--array-merge", str(d)))
    assert res.returncode == 0, res.stderr
    job, rows = _state(project)
    assert rows == {"item_0": "1.0", "item_1": "4.0", "item_3": "16.0"}
    assert json.loads(job["result"])["mode"] == "array" and _leftovers(project) == []


def test_merge_with_a_missing_task_refuses(project, tmp_path):
    d = tmp_path / "arr"
    assert _toy(project, "1", "2", extra=("--array-prepare", str(d))).returncode == 0
    assert _toy(project, "1", "2", extra=("--array-run", str(d), "--array-task", "0", "--array-count", "2")).returncode == 0
    before = db_dump(project)
    res = _toy(project, "1", "2", extra=("--array-merge", str(d)))
    assert res.returncode == 2 and "array tasks 1 of 0..1 left no results" in res.stderr
    assert db_dump(project) == before


def test_compute_items_in_process(tmp_path):
    plan = ItemPlan(items=[str(tmp_path / "a"), None], names=["a", "b"])

    def compute(path, options, ictx):
        Path(ictx.stage(path)).write_text("x")
        return len(path)

    out = compute_items(plan, compute, "tok")
    assert out[0].ok and out[0].staged == [(str(staged_path(tmp_path / "a", "tok")), str(tmp_path / "a"))]
    assert not out[1].ok and "TypeError" in out[1].error
