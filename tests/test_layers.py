"""The layer rules of the README's architecture section, checked on the source.

* ``kernels/`` pure numerics: imports only other kernels, ``cistem_mpi.errors``
  and numerical libraries (no files, no database, no MPI);
* ``io/`` file formats: may use kernels, never db or drivers or MPI;
* ``db/`` every SQL statement: imports only other db modules and ``errors``;
* ``drivers/`` compose them; only drivers import mpi4py (``drivers/runtime``
  is the MPI layer every job uses), and a driver imports no other driver
  except the shared job machinery;
* no SQL statement text outside ``db/``;
* no private name (``_x``) imported from another module of the package.

``KNOWN`` lists the exceptions that existed when these rules were written
(issue #10 removes them).  The list may only shrink: a new exception fails,
and so does an entry that is no longer needed (so the list stays true).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cistem_mpi"

#: Third-party modules each layer may import (besides the standard library).
NUMERIC = {"numpy", "scipy", "numba", "pyfftw",
           "llvmlite"}  # numba's code generator: the insertion kernel's prefetch intrinsic
ALLOWED_EXTERNAL = {
    "kernels": NUMERIC,
    "io": NUMERIC | {"mrcfile", "tifffile", "imagecodecs", "h5py", "starfile", "pandas", "gemmi", "ncempy",
                     "matplotlib"},
    "db": set(),
}
#: Standard-library modules a layer must not use (files are io's, the database db's).
FORBIDDEN_STDLIB = {"kernels": {"sqlite3", "os.path", "shutil"}, "io": {"sqlite3"}, "db": set()}
#: Package layers each layer may import.
ALLOWED_INTERNAL = {
    "kernels": {"kernels", "errors"},
    "io": {"io", "kernels", "errors"},
    "db": {"db", "errors"},
}
#: Driver modules every driver may import: the job machinery.
SHARED_DRIVER_MODULES = {
    "cistem_mpi.drivers.jobrun", "cistem_mpi.drivers.itemjob", "cistem_mpi.drivers.runtime",
    # shared job steps, no command of their own: reconstruct a parameter set into half maps + FSC and
    # register the volume (reconstruct, refine, ab-initio); cut a stack from particle positions
    # (package create --from-positions); option groups several commands share; node-shared accumulators
    # (reconstruction) and references (refinement's alignment); rounds of refinement and classification
    # (manual-refine, auto-refine, ab-initio's K classes)
    "cistem_mpi.drivers.volumejob", "cistem_mpi.drivers.extraction", "cistem_mpi.drivers.options",
    "cistem_mpi.drivers.node_reconstruction", "cistem_mpi.drivers.node_references",
    "cistem_mpi.drivers.refine_rounds",
}
#: SQL statement text: keywords in capitals (as every statement of the package is written), or in any case
#: with the statement's shape (``select ... from``), so prose such as "select one of the steps" is not SQL.
SQL = re.compile(r"^\s*(SELECT\s|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX)|"
                 r"ALTER\s+TABLE|PRAGMA\s)")
SQL_ANY_CASE = re.compile(r"^\s*(select\s.*\sfrom\s+\w|insert\s+(or\s+\w+\s+)?into\s+\w+\s*\(|update\s+\w+\s+set\s|"
                          r"delete\s+from\s+\w|create\s+(table|index)\s|alter\s+table\s|pragma\s+\w+)", re.I | re.S)

#: Exceptions present when the rules were written ("module -> what"), to be removed by issue #10.
KNOWN: set[str] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(mod: str, path: Path) -> tuple[set[str], set[str], bool]:
    """(modules imported, private names imported from the package, has SQL text)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    names: set[str] = set()
    private: set[str] = set()
    sql = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = mod.split(".") if is_pkg else mod.split(".")[:-1]
                up = here[: len(here) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            names.add(base)
            for a in node.names:
                full = f"{base}.{a.name}"
                if a.name.startswith("_") and not a.name.startswith("__") and base.startswith("cistem_mpi"):
                    private.add(full)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                SQL.match(node.value) or SQL_ANY_CASE.match(node.value)):
            sql = True
    return names, private, sql


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations() -> set[str]:
    out: set[str] = set()
    mods = _modules()
    for mod, path in mods.items():
        layer = _layer(mod)
        names, private, sql = _imports(mod, path)
        if sql and layer != "db":
            out.add(f"SQL in {mod}")
        for p in private:
            owner = p.rsplit(".", 1)[0]
            if owner != mod and owner in mods and not owner.startswith(mod.rsplit(".", 1)[0] + "._"):
                out.add(f"{mod} -> private {p}")
        for name in names:
            top = name.split(".")[0]
            if top == "mpi4py" and layer != "drivers":
                out.add(f"{mod} -> mpi4py")
            if layer in ALLOWED_INTERNAL:
                if top == "cistem_mpi":
                    target = _layer(name)
                    if target and target not in ALLOWED_INTERNAL[layer]:
                        out.add(f"{mod} -> {name}")
                elif name in FORBIDDEN_STDLIB[layer] or top in FORBIDDEN_STDLIB[layer]:
                    out.add(f"{mod} -> {name}")
                elif top not in _stdlib() and top not in ALLOWED_EXTERNAL[layer] and top != "__future__":
                    out.add(f"{mod} -> {name}")
            if layer == "drivers" and name.startswith("cistem_mpi.drivers.") and not mod.startswith(
                    "cistem_mpi.drivers.runtime"):
                target = ".".join(name.split(".")[:3])
                if target != mod and target not in SHARED_DRIVER_MODULES and target in mods:
                    out.add(f"{mod} -> {target}")
    return out


def _stdlib() -> set[str]:
    import sys

    return set(sys.stdlib_module_names)


def test_no_new_layer_violation():
    new = sorted(_violations() - KNOWN)
    assert not new, "imports or SQL against the layer rules (README, Architecture):\n" + "\n".join(new)


def test_known_exceptions_are_still_needed():
    gone = sorted(KNOWN - _violations())
    assert not gone, "remove these fixed exceptions from KNOWN:\n" + "\n".join(gone)


def test_the_checker_sees_violations(tmp_path, monkeypatch):
    """A kernel that opens the database and a driver with SQL are caught (the test can fail)."""
    fake = tmp_path / "cistem_mpi"
    (fake / "kernels").mkdir(parents=True)
    (fake / "drivers").mkdir()
    (fake / "kernels" / "bad.py").write_text("import sqlite3\nfrom cistem_mpi.db import jobs\n")
    (fake / "drivers" / "worse.py").write_text("Q = 'SELECT id FROM jobs'\nfrom cistem_mpi.drivers.refine import x\n")
    (fake / "drivers" / "lower.py").write_text("Q = 'select id from jobs where status = ?'\n")
    (fake / "drivers" / "prose.py").write_text("H = 'select exactly one of the steps'\n")
    (fake / "drivers" / "refine.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    found = _violations()
    assert {"cistem_mpi.kernels.bad -> sqlite3", "cistem_mpi.kernels.bad -> cistem_mpi.db",
            "SQL in cistem_mpi.drivers.worse", "cistem_mpi.drivers.worse -> cistem_mpi.drivers.refine",
            "SQL in cistem_mpi.drivers.lower"} <= found
    assert "SQL in cistem_mpi.drivers.prose" not in found
