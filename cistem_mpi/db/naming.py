"""The project's folder tree, asset file names and display names, numbered from the database (SPEC §2)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

ASSET_DIRS = {
    "class_averages": "Assets/ClassAverages",
    "volumes": "Assets/Volumes",
    "orth_views": "Assets/Volumes/OrthViews",
    "parameters": "Assets/Parameters",
    "particle_stacks": "Assets/ParticleStacks",
}


#: Every folder a new project has, in the seed's order.
PROJECT_TREE: tuple[str, ...] = (
    "Assets/ClassAverages",
    "Assets/CTF",
    "Assets/Images",
    "Assets/Images/Scaled",
    "Assets/Images/Spectra",
    "Assets/Movies",
    "Assets/Parameters",
    "Assets/ParticlePosition",
    "Assets/ParticleStacks",
    "Assets/Volumes",
    "Assets/Volumes/OrthViews",
    "Scratch/AutoRefine3D",
    "Scratch/ManualRefine3D",
    "Scratch/Refine2DScratch/Startup",
)


def create_tree(root: Path) -> None:
    """Create the project folders under ``root`` (which must not hold a project yet)."""
    for rel in PROJECT_TREE:
        (root / rel).mkdir(parents=True, exist_ok=True)


def missing_folders(root: Path) -> list[str]:
    """Folders of :data:`PROJECT_TREE` that are absent under ``root``."""
    return [rel for rel in PROJECT_TREE if not (root / rel).is_dir()]


def next_classification_number(conn: sqlite3.Connection) -> int:
    """The Classification # of the next 2D classification."""
    return int(conn.execute("SELECT coalesce(max(number), 0) + 1 FROM classifications_2d").fetchone()[0])


def class_averages_name(number: int) -> str:
    """``class_averages_0004.mrc`` for Classification #4."""
    return f"class_averages_{number:04d}.mrc"


def next_refinement_run(conn: sqlite3.Connection) -> int:
    """Run number of the next refinement (the first number in ``volume_<run>_<class>``)."""
    return int(conn.execute("SELECT coalesce(max(id), 0) + 1 FROM refinements").fetchone()[0])


def next_startup_run(conn: sqlite3.Connection) -> int:
    """Run number of the next ab-initio (startup) job."""
    row = conn.execute("SELECT coalesce(max(run_number), 0) + 1 FROM volumes WHERE kind = 'startup'").fetchone()
    return int(row[0])


def volume_file_name(kind: str, run: int, class_number: int) -> str:
    """``startup_volume_<run>_<class>.mrc`` or ``volume_<run>_<class>.mrc``."""
    prefix = "startup_volume" if kind == "startup" else "volume"
    return f"{prefix}_{run}_{class_number}.mrc"


def volume_display_name(kind: str, run: int, class_number: int, round_number: int = 0) -> str:
    """The name cisTEM shows in its 3D Volumes panel.

    Parameters
    ----------
    kind : {'startup', 'start', 'local', 'global'}
        Ab-initio, starting parameters, local or global refinement.
    run : int
        Run (refinement) number.
    class_number : int
        Class, from 1.
    round_number : int
        Round of an auto-refinement (local/global only).
    """
    if kind == "startup":
        return f"Volume From Startup #{run} - Class #{class_number}"
    if kind == "start":
        return f"Start Params #{run} - Class #{class_number}"
    if kind in ("local", "global"):
        return f"{kind.capitalize()} #{run} (Rnd. {round_number}) - Class #{class_number}"
    raise ValueError(f"unknown volume kind {kind!r}")


def orth_view_name(volume_file: str) -> str:
    """OrthViews file for a volume: same name, in ``Assets/Volumes/OrthViews``."""
    return f"{ASSET_DIRS['orth_views']}/{volume_file}"


def asset_path_taken(conn: sqlite3.Connection, table: str, stored_path: str) -> bool:
    """True when a registered row of ``table`` has ``path = stored_path``.

    Names are claimed by the database, not by the file system: a file left
    under an asset's name by a killed job (never registered) does not block
    the name; the job that registers it overwrites the file.

    >>> import sqlite3
    >>> c = sqlite3.connect(":memory:"); _ = c.execute("CREATE TABLE volumes(path TEXT)")
    >>> asset_path_taken(c, "volumes", "Assets/Volumes/volume_1_1.mrc")
    False
    """
    if table not in ("volumes", "particle_stacks", "class_averages", "classifications_2d"):
        raise ValueError(f"no asset paths in table {table!r}")
    row = conn.execute(f"SELECT 1 FROM {table} WHERE path = ? LIMIT 1", (stored_path,)).fetchone()
    return row is not None


def next_free_volume_name(conn: sqlite3.Connection, file_name: str, display_name: str) -> tuple[str, str]:
    """The first volume name (file and display name) of this base that the project has not registered.

    A volume made again from the same parameters (``reconstruct`` run twice
    on a refinement, or after ``manual-refine`` registered its map) gets a
    new name, as cisTEM's Generate 3D makes a new volume every time, and the
    old one stays: ``volume_9_1.mrc`` / ``Local #9 (Rnd. 1) - Class #1``,
    then ``volume_9_1_2.mrc`` / ``... - Class #1 #2``, ``volume_9_1_3.mrc``
    / ``... #3``.  A number is free when no registered volume has that file
    (in ``Assets/Volumes``) or that display name.  As for
    :func:`asset_path_taken`, the database claims names: a file left under
    a name by a killed job, never registered, does not block it.

    Parameters
    ----------
    conn : sqlite3.Connection
    file_name : str
        The base file name, e.g. ``volume_9_1.mrc`` (no folder).
    display_name : str
        Its display name.

    Returns
    -------
    (file name, display name)
        The base names when free, else the first free numbered pair (from 2).

    >>> import sqlite3
    >>> c = sqlite3.connect(":memory:"); _ = c.execute("CREATE TABLE volumes(path TEXT, display_name TEXT)")
    >>> next_free_volume_name(c, "volume_9_1.mrc", "Local #9 (Rnd. 1) - Class #1")
    ('volume_9_1.mrc', 'Local #9 (Rnd. 1) - Class #1')
    >>> _ = c.execute("INSERT INTO volumes VALUES ('Assets/Volumes/volume_9_1.mrc', 'Local #9 (Rnd. 1) - Class #1')")
    >>> next_free_volume_name(c, "volume_9_1.mrc", "Local #9 (Rnd. 1) - Class #1")
    ('volume_9_1_2.mrc', 'Local #9 (Rnd. 1) - Class #1 #2')
    """
    base = Path(file_name)
    stem, suffix = base.stem, base.suffix or ".mrc"
    folder = ASSET_DIRS["volumes"]
    # the volumes table holds one row per map (hundreds at most): read its names once, find the gap here
    rows = conn.execute("SELECT path, display_name FROM volumes").fetchall()
    files = set()
    for r in rows:
        parent, _, name = str(r[0]).replace("\\", "/").rpartition("/")
        if parent.endswith(folder):  # project-relative or absolute, but in this project's volume folder
            files.add(name)
    names = {str(r[1]) for r in rows}
    k = 1
    while True:
        f = f"{stem}{suffix}" if k == 1 else f"{stem}_{k}{suffix}"
        d = display_name if k == 1 else f"{display_name} #{k}"
        if f not in files and d not in names:
            return f, d
        k += 1


def stack_path_taken(conn: sqlite3.Connection, path, directory) -> bool:
    """True when a registered particle stack has this file (stored relative or absolute)."""
    from pathlib import Path

    p = Path(path)
    rel = f"{ASSET_DIRS['particle_stacks']}/{p.name}"
    row = conn.execute("SELECT 1 FROM particle_stacks WHERE path IN (?, ?) LIMIT 1", (rel, str(p))).fetchone()
    return row is not None
