"""The command line: one-line errors, exit codes, nothing changed on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cistem_mpi.db.project import Project
from helpers_jobs import db_dump

CLI = [sys.executable, "-m", "cistem_mpi"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True)


def _error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


def test_unknown_job_name_is_one_line_exit_2():
    r = _run("align-moovies", "-p", "x")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "align-moovies" in r.stderr
    assert "Traceback" not in r.stderr


def test_not_a_project():
    r = _run("status", "-p", "/nonexistent/place")
    assert r.returncode == 2 and _error_lines(r) == ["error: /nonexistent/place: project directory not found"]


def test_bad_imports_leave_the_project_as_it_was(project, tmp_path):
    truncated = tmp_path / "trunc.mrc"
    import mrcfile
    import numpy as np

    with mrcfile.new(truncated) as m:
        m.set_data(np.zeros((4, 32, 32), np.float32))
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    bad_par = tmp_path / "bad.par"
    bad_par.write_text("      1   10.00   20.00   30.00      0.00      0.00   10000     1  15000.0  15000.0    0.00\n")
    cases = [
        (["import", "volume", "-p", str(project), str(tmp_path / "missing.mrc")], "missing.mrc"),
        (["import", "volume", "-p", str(project), str(truncated), "--pixel-size", "1"], "trunc.mrc"),
        (["import", "particles", "-p", str(project), str(truncated), "--params", str(bad_par), "--pixel-size", "1"],
         "trunc.mrc"),
    ]
    before = db_dump(project)
    for args, name in cases:
        r = _run(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = _error_lines(r)
        assert len(lines) == 1 and name in lines[0], r.stderr
        assert "Traceback" not in r.stderr
        assert db_dump(project) == before
    assert not (project / "Logs").exists()


def test_debug_shows_the_traceback(project, tmp_path):
    r = _run("--debug", "import", "volume", "-p", str(project), str(tmp_path / "missing.mrc"))
    assert r.returncode == 2 and "Traceback" in r.stderr


@pytest.mark.interop
def test_import_volume_registers_an_imported_map(project, shared_data):
    src = shared_data / "relion_tests" / "ref_model.mrc"
    r = _run("import", "volume", "-p", str(project), str(src))
    assert r.returncode == 0, r.stderr
    with Project.open(project, readonly=True) as p:
        v = p.conn.execute("SELECT * FROM volumes").fetchone()
        assert v["path"] == str(src) and v["kind"] == "imported"  # imported: absolute path kept
        assert (v["box"], round(v["pixel_size"], 2)) == (100, 3.54)


def test_command_table_names_every_drivers_commands():
    """``COMMAND_MODULES`` (which lets a command import only its own driver) matches the drivers."""
    import importlib

    from cistem_mpi import cli

    full = cli.build_parser()
    commands = full._subparsers._group_actions[0].choices  # the sub-command table argparse built
    assert sorted(commands) == sorted(cli.COMMAND_MODULES)
    for command, module in cli.COMMAND_MODULES.items():
        sub = cli.OneLineParser(prog="t").add_subparsers()
        importlib.import_module(f"cistem_mpi.drivers.{module}").register(sub)
        assert command in sub.choices, (command, module)


def test_status_does_not_import_the_numerical_stack(project):
    """A light command loads neither numba nor scipy (startup on every rank, status from any shell)."""
    code = ("import sys; from cistem_mpi.cli import main; rc = main(['status', '-p', sys.argv[1]]); "
            "print(sorted(m for m in ('numba', 'scipy', 'pandas') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(project)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
