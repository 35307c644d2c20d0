"""Issue #13: bad input and bad project states give one clear line and change nothing
(items 1, 5, 7, 8, 9, 10, 11, 13, 16, 18)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cistem_mpi.cli import main
from cistem_mpi.errors import InputError
from helpers_jobs import db_dump
from helpers_reliability import CLI, db_rows, imported_project, run_cli, simulated


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rel_inputs")
    return imported_project(tmp, n=40, box=32)


def _copy(base, tmp_path) -> tuple:
    import shutil

    sim, root = base
    dst = tmp_path / "p"
    shutil.copytree(root, dst, symlinks=True)
    from cistem_mpi.db.project import Project

    Project.open(dst).close()  # records the new location once (a moved project), before any "before" dump
    return sim, dst


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


# ----------------------------------------------------------------- item 1: NaN
def test_nan_pixel_in_stack_is_refused_and_nothing_registered(base, tmp_path, capsys):
    sim, root = _copy(base, tmp_path)
    stack = tmp_path / "nan.mrcs"
    data = mrcfile.read(sim.stack).copy()
    data[7, 5, 5] = np.nan
    with mrcfile.new(stack) as m:
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = 4.0
    before = db_dump(root)
    rc = main(["reconstruct", "-p", str(root), "--stack", str(stack), "--params", str(sim.par), "--pixel-size", "4"])
    assert rc == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "image 8" in lines[0] and "NaN" in lines[0], lines
    assert db_dump(root) == before
    assert db_rows(root, "SELECT count(*) FROM volumes") == [(0,)]


def test_nan_reference_map_and_simulate_map_refused(base, tmp_path, capsys):
    from cistem_mpi.drivers.simulate import load_structure

    sim, root = _copy(base, tmp_path)
    ref = tmp_path / "ref.mrc"
    vol = mrcfile.read(sim.map).copy()
    vol[3, 4, 5] = np.inf
    with mrcfile.new(ref) as m:
        m.set_data(vol)
        m.voxel_size = 4.0
    before = db_dump(root)
    assert main(["manual-refine", "-p", str(root), "--reference", str(ref)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "NaN" in lines[0] and str(ref) in lines[0], lines
    assert db_dump(root) == before
    with pytest.raises(InputError, match="NaN"):
        load_structure(str(ref), None, 32, 4.0)


def test_nan_gain_and_micrograph_refused(tmp_path):
    from cistem_mpi.drivers.extraction import cut_micrograph
    from cistem_mpi.io.gain import read_gain

    g = np.ones((16, 16), np.float32)
    g[2, 2] = np.nan
    with mrcfile.new(tmp_path / "gain.mrc") as m:
        m.set_data(g)
    with pytest.raises(InputError, match="NaN"):
        read_gain(tmp_path / "gain.mrc")
    img = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    img[10, 10] = np.nan
    with mrcfile.new(tmp_path / "mic.mrc") as m:
        m.set_data(img)
        m.voxel_size = 1.0
    with pytest.raises(InputError, match="NaN"):
        cut_micrograph(str(tmp_path / "mic.mrc"), np.array([0]), np.array([0]), 16, False, 1.0)


# ------------------------------------------------------ items 8 and 13: options
@pytest.mark.parametrize("argv, option", [
    (["reconstruct", "--symmetry", "X9"], "--symmetry"),
    (["reconstruct", "--mask-radius", "-5"], "--mask-radius"),
    (["manual-refine", "--classes", "0"], "--classes"),
    (["manual-refine", "--mask-radius", "-5"], "--mask-radius"),
    (["auto-refine", "--symmetry", "C0"], "--symmetry"),
    (["package", "create", "--from-stack", "1", "--classes", "0"], "--classes"),
])
def test_bad_option_refused_before_the_job_exists(base, tmp_path, capsys, argv, option):
    sim, root = _copy(base, tmp_path)
    before = db_dump(root)
    scratch_before = sorted(p.name for p in (root / "Scratch").rglob("*"))
    assert main(argv + ["-p", str(root)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and option in lines[0], lines
    assert db_dump(root) == before  # no job row, not even a deleted one
    assert sorted(p.name for p in (root / "Scratch").rglob("*")) == scratch_before


def test_relion_image_size_must_match_the_stack(base, tmp_path, capsys):
    from cistem_mpi.io.star import write_relion_star

    sim, root = _copy(base, tmp_path)
    star = tmp_path / "p.star"
    write_relion_star(star, sim.particles, stack=str(sim.stack), image_size=48)
    assert main(["import", "particles", "-p", str(root), str(sim.stack), "--params", str(star)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "rlnImageSize is 48" in lines[0], lines


def test_same_micrograph_twice_refused(tmp_path, capsys):
    root = tmp_path / "p"
    assert main(["project", "create", str(root)]) == 0
    mic = tmp_path / "mic_0001.mrc"
    with mrcfile.new(mic) as m:
        m.set_data(np.zeros((64, 64), np.float32))
        m.voxel_size = 1.5
    assert main(["import", "images", "-p", str(root), str(mic), str(mic)]) == 2
    assert "given twice" in _error_lines(capsys)[0]
    assert main(["import", "images", "-p", str(root), str(mic)]) == 0
    before = db_dump(root)
    assert main(["import", "images", "-p", str(root), str(mic)]) == 2
    assert "already imported" in _error_lines(capsys)[0]
    assert db_dump(root) == before


# ------------------------------------------------------------ item 7: simulate
@pytest.mark.parametrize("extra, option", [(["-n", "0"], "-n"), (["-n", "-5"], "-n"), ([], "--out")])
def test_simulate_bad_arguments(tmp_path, capsys, extra, option):
    out = tmp_path / "file.txt"
    if option == "--out":
        out.write_text("not a directory")
    else:
        out = tmp_path / "s"
    assert main(["simulate", "particles", "--out", str(out), "--box", "16"] + extra) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "internal error" not in lines[0], lines
    assert (option in lines[0]) or (str(out) in lines[0])


# --------------------------------------------------------------- item 9: STAR
def test_star_messages_name_the_line(tmp_path):
    from cistem_mpi.io.star import read_star

    good = ("data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnDefocusV #3\n"
            "000001@s.mrcs 10000 9000\n000002@s.mrcs 11000 9500\n")
    latin = tmp_path / "latin.star"
    latin.write_bytes(b"# caf\xe9\n" + good.encode())
    with pytest.raises(InputError, match=r"line 1: byte 0xe9 is not UTF-8"):
        read_star(latin, pixel_size=1.0)
    short = tmp_path / "short.star"
    short.write_text(good.replace("_rlnDefocusV #3\n", ""))
    with pytest.raises(InputError, match=r"line 6: 3 values but the loop of data_particles \(line 3\) has 2 column "
                                         r"labels \(lines 4-5\)"):
        read_star(short, pixel_size=1.0)
    # the valid file still reads
    ok = tmp_path / "ok.star"
    ok.write_text(good)
    assert len(read_star(ok, pixel_size=1.0)) == 2


# ----------------------------------------------- item 10: corrupt database page
def test_corrupt_database_page_one_line(base, tmp_path, capsys):
    sim, root = _copy(base, tmp_path)
    db = next(root.glob("*.db"))
    raw = bytearray(db.read_bytes())
    page = int.from_bytes(raw[16:18], "big") or 65536
    rng = np.random.default_rng(1)
    raw[page:] = rng.integers(0, 256, len(raw) - page, dtype=np.uint8).tobytes()  # every page but the first
    db.write_bytes(bytes(raw))
    rc = main(["status", "-p", str(root)])
    lines = _error_lines(capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert str(db.resolve()) in lines[0] and ".recover" in lines[0] and "backup" in lines[0]
    assert "internal error" not in lines[0]


# -------------------------------------------------------- item 11: pixel sizes
def test_pixel_size_policy_one_plain_warning(base, tmp_path):
    from cistem_mpi.io.params import Optics, ParticleSet
    from cistem_mpi.io.star import write_cistem_star

    sim, root = _copy(base, tmp_path)
    star = tmp_path / "p3.star"  # metadata says 3 Å, the stack header 4 Å
    write_cistem_star(star, ParticleSet(params=sim.particles.params, optics=[Optics(3.0, 300.0, 2.7, 0.07)]))
    r = run_cli("import", "particles", "-p", root, sim.stack, "--params", star)
    assert r.returncode == 2 and "4.0000 Å does not match 3.0000 Å" in r.stderr, r.stderr
    # an explicit --pixel-size settles it, with plain one-line warnings only
    r = run_cli("import", "particles", "-p", root, sim.stack, "--params", star, "--pixel-size", "3.0")
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "warning" in ln.lower()]
    assert warn and all(ln.startswith("warning: ") for ln in warn), r.stderr
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr and ".py:" not in r.stderr
    assert db_rows(root, "SELECT pixel_size FROM particle_stacks ORDER BY id DESC LIMIT 1") == [(3.0,)]


# --------------------------------------------------------- item 16: broken pipe
def test_status_into_a_closed_pipe(base, tmp_path):
    sim, root = _copy(base, tmp_path)
    for cmd in (["status", "-p", str(root)], ["project", "info", str(root)]):
        p = subprocess.Popen(CLI + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()  # `| head` that has read enough
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert b"BrokenPipe" not in err and b"internal error" not in err, err


# --------------------------------------------------------- item 18: cosmetics
def test_project_info_check_take_p_and_empty_ctf_message(base, tmp_path, capsys):
    sim, root = _copy(base, tmp_path)
    for action in ("info", "check", "clean"):
        assert main(["project", action, "-p", str(root)]) == 0
        assert main(["project", action, str(root)]) == 0
    empty = tmp_path / "mic_ctf.txt"
    empty.write_text("")
    assert main(["import", "ctf", "-p", str(root), str(empty)]) == 2
    line = _error_lines(capsys)[-1]
    assert "CTF estimates" in line and "coordinates" not in line, line


# ------------------------------------------------------- item 5: read-only project
def test_read_only_project_says_which_path(tmp_path, capsys):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs that can be made read-only")
    try:
        sim = simulated(tmp_path / "sim", n=8, box=16, pixel_size=4.0)
        root = mnt / "p"
        assert main(["project", "create", str(root)]) == 0
        assert main(["import", "particles", "-p", str(root), str(sim.stack), "--params", str(sim.par),
                     "--pixel-size", "4"]) == 0
        capsys.readouterr()
        assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True).returncode == 0
        assert main(["reconstruct", "-p", str(root)]) == 2
        lines = _error_lines(capsys)
        assert len(lines) == 1 and "read-only" in lines[0] and str(root) in lines[0], lines
        assert "internal error" not in lines[0]
        assert main(["status", "-p", str(root)]) == 0  # readers still work
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
