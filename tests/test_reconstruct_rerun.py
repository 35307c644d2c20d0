"""Re-running ``reconstruct`` is normal use (issue #16 item 4): a new volume under the next free name.

A refinement reconstructed again (other settings), or after ``manual-refine`` registered its own map, gets
a new volume (``volume_<run>_<class>_2.mrc``, display name ``... #2``); the old volume's files and row stay
as they were.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cistem_mpi.cli import main
from cistem_mpi.db import naming
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.simulate import simulate_particles

CLI = [sys.executable, "-m", "cistem_mpi"]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout)


def _reconstruct(proj: Path, *options: str) -> None:
    """``reconstruct`` in this process (no interpreter and JIT start-up per run)."""
    assert main(["reconstruct", "-p", str(proj), *options]) == 0


def _volumes(root: Path) -> list[sqlite3.Row]:
    with Project.open(root, readonly=True) as p:
        return list(p.conn.execute("SELECT * FROM volumes ORDER BY id"))


def _digest(root: Path, row: sqlite3.Row) -> dict[str, str]:
    """SHA-256 of every file of a registered volume (map, half maps, orth view, sharpened map, pictures)."""
    stem = Path(row["path"]).stem
    files = [root / row[c] for c in ("path", "half_map_1", "half_map_2", "orth_view")]
    files += [root / naming.ASSET_DIRS["volumes"] / f"{stem}_sharpened.mrc",
              root / naming.ASSET_DIRS["orth_views"] / f"{stem}.png",
              root / naming.ASSET_DIRS["orth_views"] / f"{stem}_fsc.png"]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A small simulated stack imported into a project (Start Params #1)."""
    base = tmp_path_factory.mktemp("rerun")
    sim = simulate_particles(base / "data", n_particles=200, box=32, pixel_size=4.0, snr=0.5, seed=8)
    root = base / "proj"
    Project.create(root).close()
    assert main(["import", "particles", "-p", str(root), str(sim.stack), "--params", str(sim.par),
                 "--pixel-size", "4.0"]) == 0
    return sim, root


def test_reconstruct_twice_gives_a_second_volume_and_keeps_the_first(imported, tmp_path):
    _, root = imported
    proj = tmp_path / "p"
    shutil.copytree(root, proj)
    _reconstruct(proj)
    (first,) = _volumes(proj)
    assert (first["path"], first["display_name"]) == ("Assets/Volumes/volume_1_1.mrc", "Start Params #1 - Class #1")
    before = _digest(proj, first)
    # again, with other settings: a new volume, not "a volume of this name already exists"
    _reconstruct(proj, "--mask-radius", "50", "--padding", "1")
    # and a third time: the next number after 2
    _reconstruct(proj, "--resolution-limit", "12")
    rows = _volumes(proj)
    assert len(rows) == 3
    assert dict(rows[0]) == dict(first)  # the old row is untouched
    assert _digest(proj, rows[0]) == before  # and so are its files, byte for byte
    assert [v["path"] for v in rows] == ["Assets/Volumes/volume_1_1.mrc", "Assets/Volumes/volume_1_1_2.mrc",
                                         "Assets/Volumes/volume_1_1_3.mrc"]
    assert [v["display_name"] for v in rows] == ["Start Params #1 - Class #1", "Start Params #1 - Class #1 #2",
                                                 "Start Params #1 - Class #1 #3"]
    assert len({v["half_map_1"] for v in rows} | {v["half_map_2"] for v in rows} | {v["orth_view"] for v in rows}) == 9
    for v in rows:
        assert v["refinement_id"] == 1 and v["class_number"] == 1
        for f in _digest(proj, v):
            assert Path(f).is_file()
    # different settings, different maps: the second is not a copy of the first
    assert _digest(proj, rows[1])[str(proj / rows[1]["path"])] != before[str(proj / first["path"])]
    # nothing left under a staged name
    assert not [p for p in (proj / "Assets/Volumes").rglob(".*") if p.is_file()]


@pytest.mark.slow  # a manual-refine round first: over 20 s
def test_reconstruct_after_manual_refine_keeps_its_volume(imported, tmp_path):
    sim, root = imported
    proj = tmp_path / "p"
    shutil.copytree(root, proj)
    r = _run(["manual-refine", "-p", str(proj), "--reference", str(sim.map), "--high-resolution", "12",
              "--angle-step", "10"])
    assert r.returncode == 0, r.stderr
    (refined,) = _volumes(proj)
    assert refined["path"] == "Assets/Volumes/volume_2_1.mrc"
    before = _digest(proj, refined)
    _reconstruct(proj)  # the newest refinement: #2, whose volume exists
    rows = _volumes(proj)
    assert len(rows) == 2 and dict(rows[0]) == dict(refined)
    assert _digest(proj, rows[0]) == before
    assert rows[1]["path"] == "Assets/Volumes/volume_2_1_2.mrc"
    assert rows[1]["display_name"] == refined["display_name"] + " #2"
    assert rows[1]["refinement_id"] == 2 and rows[1]["kind"] == "refinement"


def test_a_name_claimed_in_the_database_is_skipped_a_stray_file_is_not(imported, tmp_path):
    """Names are claimed by registered rows: ``_2`` registered by another job is skipped (-> ``_3``), while a
    file a killed job left under ``_4`` unregistered does not block that name (it is overwritten)."""
    _, root = imported
    proj = tmp_path / "p"
    shutil.copytree(root, proj)
    _reconstruct(proj)
    with Project.open(proj) as p:
        job = p.conn.execute("SELECT id FROM jobs ORDER BY id DESC").fetchone()["id"]
        # another job's volume holds the _2 file name, a third one the "#3" display name
        p.conn.execute("INSERT INTO volumes (path, display_name, kind, box, pixel_size, job_id) VALUES "
                       "('Assets/Volumes/volume_1_1_2.mrc', 'Imported map', 'imported', 32, 4.0, ?), "
                       "('Assets/Volumes/other.mrc', 'Start Params #1 - Class #1 #3', 'imported', 32, 4.0, ?)",
                       (job, job))
        p.conn.commit()
    stray = proj / "Assets/Volumes/volume_1_1_4.mrc"
    stray.write_bytes(b"left by a killed job")
    _reconstruct(proj)
    new = _volumes(proj)[-1]
    assert (new["path"], new["display_name"]) == ("Assets/Volumes/volume_1_1_4.mrc", "Start Params #1 - Class #1 #4")
    assert stray.read_bytes()[:4] != b"left"  # the registered map replaced the stray file
