"""Project tree, database placement, moving a project, missing assets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cistem_mpi.db.project import Project
from cistem_mpi.drivers.jobrun import run_job
from cistem_mpi.db.naming import PROJECT_TREE
from helpers_jobs import job_args

# The seed's list (cisTEM FAQ), written out here independently of PROJECT_TREE.
SEED_TREE = """Assets/ClassAverages Assets/CTF Assets/Images Assets/Images/Scaled Assets/Images/Spectra
Assets/Movies Assets/Parameters Assets/ParticlePosition Assets/ParticleStacks Assets/Volumes
Assets/Volumes/OrthViews Scratch/AutoRefine3D Scratch/ManualRefine3D Scratch/Refine2DScratch/Startup""".split()

CLI = [sys.executable, "-m", "cistem_mpi"]


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_tree_equals_seed_list(tmp_path):
    root = tmp_path / "proj"
    r = subprocess.run(CLI + ["project", "create", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert list(PROJECT_TREE) == SEED_TREE
    parents = {"Assets", "Scratch", "Scratch/Refine2DScratch"}
    assert _tree(root) == set(SEED_TREE) | parents | {"proj.db"}
    assert (root / "proj.db").is_file() and not (root / "proj.db").is_symlink()


def test_database_and_scratch_on_other_paths(tmp_path):
    nfs, ssd = tmp_path / "nfs", tmp_path / "ssd"
    nfs.mkdir()
    with Project.create(tmp_path / "lustre" / "proj", database=nfs, scratch=ssd / "scratch") as p:
        assert p.db_path == nfs / "proj.db"
    link = tmp_path / "lustre" / "proj" / "proj.db"
    assert link.is_symlink() and Path(os.readlink(link)) == nfs / "proj.db"
    with Project.open(tmp_path / "lustre" / "proj", readonly=True) as p:
        info = p.info()
        assert info["database"] == str(nfs / "proj.db")
        assert info["database_is_link"] is True
        assert p.scratch_root == ssd / "scratch"
        assert p.setting("database_path") == str(nfs / "proj.db")
    # a job's scratch goes to the other path
    def body(ctx):
        assert ctx.scratch.is_relative_to(ssd / "scratch")
        assert ctx.scratch.is_dir()
    assert run_job(job_args(tmp_path / "lustre" / "proj"), "import", body) == 0


def test_database_path_journal_and_settings(tmp_path):
    with Project.create(tmp_path / "p") as p:
        c = p.conn
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert c.execute("PRAGMA busy_timeout").fetchone()[0] >= 10000


def _register_two_assets(root: Path, outside: Path) -> None:
    inside = root / "Assets" / "Volumes" / "volume_1_1.mrc"
    inside.write_bytes(b"x")

    def body(ctx):
        ctx.register("volumes", path=inside, display_name="in", kind="reconstruction", box=8, pixel_size=1.0)
        ctx.register("volumes", path=outside, display_name="out", kind="imported", box=8, pixel_size=1.0)

    assert run_job(job_args(root), "reconstruct", body) == 0


def test_move_project_inside_assets_follow_imported_keep_paths(tmp_path):
    root = tmp_path / "a" / "proj"
    outside = tmp_path / "data" / "map.mrc"
    outside.parent.mkdir()
    outside.write_bytes(b"y")
    Project.create(root).close()
    _register_two_assets(root, outside)
    moved = tmp_path / "b" / "proj"
    moved.parent.mkdir()
    shutil.move(str(root), str(moved))
    with Project.open(moved) as p:
        rows = {r["display_name"]: r["path"] for r in p.conn.execute("SELECT * FROM volumes")}
        assert rows["in"] == "Assets/Volumes/volume_1_1.mrc"  # stored relative
        assert p.resolve(rows["in"]) == moved / "Assets/Volumes/volume_1_1.mrc"
        assert p.resolve(rows["in"]).read_bytes() == b"x"
        assert rows["out"] == str(outside)  # imported: absolute, unchanged
        assert p.setting("project_dir") == str(moved)
        assert p.missing_assets() == []
    r = subprocess.run(CLI + ["project", "check", str(moved)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # the imported file disappears: check names it
    outside.unlink()
    r = subprocess.run(CLI + ["project", "check", str(moved)], capture_output=True, text=True)
    assert r.returncode == 1
    assert str(outside) in r.stdout and "volumes" in r.stdout


def test_move_project_with_database_elsewhere(tmp_path):
    nfs = tmp_path / "nfs"
    nfs.mkdir()
    root = tmp_path / "a" / "proj"
    Project.create(root, database=nfs).close()
    outside = tmp_path / "data" / "map.mrc"  # one volume per path: the database refuses a second row for a file
    outside.parent.mkdir()
    outside.write_bytes(b"y")
    _register_two_assets(root, outside)
    moved = tmp_path / "proj2"
    shutil.move(str(root), str(moved))
    with Project.open(moved) as p:
        assert p.db_path == nfs / "proj.db"
        assert p.missing_assets() == []


def test_clean_removes_leftover_scratch(tmp_path):
    root = tmp_path / "p"
    Project.create(root).close()

    def fails(ctx):
        (ctx.scratch / "partial.mrc").write_bytes(b"z")
        raise RuntimeError("boom")

    from cistem_mpi.errors import JobFailed

    with pytest.raises(JobFailed):
        run_job(job_args(root), "manual_refine", fails)
    left = list((root / "Scratch" / "ManualRefine3D").iterdir())
    assert len(left) == 1 and (left[0] / "partial.mrc").exists()  # kept for post-mortem
    r = subprocess.run(CLI + ["project", "clean", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert list((root / "Scratch" / "ManualRefine3D").iterdir()) == []
