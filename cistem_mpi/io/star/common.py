"""STAR text shared by the RELION and cisTEM readers and writers, and by the coordinate and CTF readers.

Reading a file into its blocks (``starfile``, with every structural problem
named by line), finding the particle and optics tables, one column as checked
numbers, the pixel-size override rule, and atomic writing.
"""

from __future__ import annotations

import os
import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cistem_mpi.errors import InputError

__all__ = ["PARTICLE_HINTS", "parse_image_name", "read_blocks", "star_text_problem", "table_blocks",
           "detect_star_flavour", "flavour", "optics_block", "particle_block", "column", "parse_value",
           "override_pixel_size", "atomic_write", "read_text_file", "looks_like_star",
           "float_column", "star_tables"]

#: Labels that mark a table as per-particle (not an optics table).
PARTICLE_HINTS = ("rlnAngleRot", "rlnAnglePsi", "rlnDefocusU", "rlnOriginX", "rlnOriginXAngst",
                   "rlnCoordinateX", "rlnImageName")

_ARRAY_RE = re.compile(r"^\[[^\]]*\]$")

def parse_image_name(name: str) -> tuple[int, str]:
    """Split RELION's ``"000012@path/stack.mrcs"`` into (12, "path/stack.mrcs").

    A name without ``@`` is image 1 of that file.
    """
    s = str(name)
    if "@" in s:
        n, f = s.split("@", 1)
        return int(n), f
    return 1, s


def read_blocks(path: Path) -> dict:
    """Every block of a STAR file (``starfile``: loops as DataFrames, key-value blocks as dicts).

    Raises
    ------
    InputError
        Missing file, not UTF-8, unparsable, no ``data_`` block, or a loop whose rows do not match its
        labels (:func:`star_text_problem` names the line).
    """
    if not path.exists():
        raise InputError(path, "file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(path, f"line {line}: byte 0x{raw[exc.start]:02x} is not UTF-8 text (STAR files are "
                               f"ASCII/UTF-8; re-save the file as UTF-8)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(str(path), always_dict=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
        problem = star_text_problem(text)
        raise InputError(path, problem or f"cannot parse as STAR: {exc}") from None
    if not blocks:
        raise InputError(path, star_text_problem(text) or "no data block found (no line starts with data_)")
    problem = star_text_problem(text) if _has_ragged_hint(blocks) else None
    if problem:
        raise InputError(path, problem)
    return blocks


def _has_ragged_hint(blocks: dict) -> bool:
    """A loop read with missing values (NaN in a column of strings/numbers) may be a short header."""
    for v in blocks.values():
        if isinstance(v, pd.DataFrame) and len(v) and v.isna().to_numpy().any():
            return True
    return False


def _tokens(line: str) -> int:
    """Number of values on a STAR data line (quoted values count once)."""
    if '"' not in line and "'" not in line:
        return len(line.split())
    try:
        return len(shlex.split(line, comments=False, posix=True))
    except ValueError:
        return len(line.split())


def star_text_problem(text: str) -> str | None:
    r"""The first structural problem of STAR text, naming its line (None: none found).

    Finds loops whose rows have another number of values than the loop has
    column labels (a header one column short, a truncated row), labels
    outside a loop or data block, and files without ``data_`` blocks.

    >>> star_text_problem("data_x\nloop_\n_a #1\n_b #2\n1 2 3\n")
    'line 5: 3 values but the loop of data_x (line 2) has 2 column labels (lines 3-4)'
    """
    block = None
    labels: list[int] = []
    in_loop = False
    reading_labels = False
    loop_line = 0
    seen_block = False
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            block, in_loop, reading_labels, labels = line, False, False, []
            seen_block = True
            continue
        if line.startswith("loop_"):
            if block is None:
                return f"line {n}: loop_ before any data_ block"
            in_loop, reading_labels, labels, loop_line = True, True, [], n
            continue
        if line.startswith("_"):
            if block is None:
                return f"line {n}: label {line.split()[0]} before any data_ block"
            if in_loop and reading_labels:
                labels.append(n)
            elif in_loop:
                in_loop = False  # a key-value pair after a loop ends the loop
            continue
        if in_loop:
            reading_labels = False
            k = _tokens(line)
            if k != len(labels):
                span = f"lines {labels[0]}-{labels[-1]}" if len(labels) > 1 else f"line {labels[0]}" if labels else "none"
                return (f"line {n}: {k} values but the loop of {block} (line {loop_line}) has {len(labels)} "
                        f"column label{'s' if len(labels) != 1 else ''} ({span})")
    if not seen_block:
        return "no data block found (no line starts with data_)"
    return None


def table_blocks(blocks: dict) -> dict[str, pd.DataFrame]:
    """The loop tables among ``blocks`` (from :func:`read_blocks`), by block name."""
    return {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}


def detect_star_flavour(path: str | os.PathLike) -> str:
    """Return "cistem", "relion3.1" (optics block present) or "relion3.0"."""
    blocks = read_blocks(Path(path))
    _, table = particle_block(Path(path), blocks)
    return flavour(blocks, table)


def flavour(blocks: dict, table: pd.DataFrame) -> str:
    """``"cistem"`` (``_cisTEM*`` columns only), ``"relion3.1"`` (an optics table) or ``"relion3.0"``."""
    cols = list(table.columns)
    if any(c.startswith("cisTEM") for c in cols) and not any(c.startswith("rln") for c in cols):
        return "cistem"
    return "relion3.1" if optics_block(blocks, table) is not None else "relion3.0"


def optics_block(blocks: dict, particles: pd.DataFrame) -> pd.DataFrame | None:
    """``data_optics``, or a differently named table that is clearly an optics table."""
    tab = blocks.get("optics")
    if isinstance(tab, pd.DataFrame) and len(tab):
        return tab
    for v in table_blocks(blocks).values():
        if v is particles or not len(v):
            continue
        cols = set(v.columns)
        if "rlnOpticsGroup" in cols and cols & {"rlnImagePixelSize", "rlnVoltage"} and not cols & set(PARTICLE_HINTS):
            return v
    return None


def particle_block(path: Path, blocks: dict) -> tuple[str, pd.DataFrame]:
    """The name and table of the particle block (``data_particles``, a table with image names, ...).

    Raises
    ------
    InputError
        No table looks like particles.
    """
    tables = {k: v for k, v in table_blocks(blocks).items() if k != "optics"}
    if "particles" in tables:
        return "particles", tables["particles"]
    with_names = [k for k, v in tables.items() if "rlnImageName" in v.columns]
    if with_names:
        return with_names[0], tables[with_names[0]]
    for k, v in tables.items():
        cols = set(v.columns)
        if any(c.startswith("cisTEM") for c in cols):
            return k, v
        if k in ("", "images") and cols.intersection(PARTICLE_HINTS):
            return k, v
    names = ", ".join(f"data_{k}" for k in blocks) or "none"
    raise InputError(path, f"no particle table found (blocks: {names})")


def column(table: pd.DataFrame, label: str, path: Path, numeric: bool = True) -> np.ndarray | None:
    """Column ``label`` (no leading ``_``) as finite float64 (or text), None when absent.

    Raises
    ------
    InputError
        A value is not a finite number (naming its row).
    """
    if label not in table.columns:
        return None
    col = table[label]
    if not numeric:
        return col.astype(str).to_numpy()
    vals = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(vals)
    if bad.any():
        r = int(np.argmax(bad))
        raise InputError(path, f"_{label} in row {r + 1} is '{col.iloc[r]}', not a finite number")
    return vals


def parse_value(v):
    """RELION 5 array fields ``[a,b,c]`` -> float array; other values unchanged."""
    if isinstance(v, str) and _ARRAY_RE.match(v.strip()):
        inner = v.strip()[1:-1].strip()
        if not inner:
            return np.zeros(0, dtype=np.float64)
        try:
            return np.array([float(t) for t in inner.split(",")], dtype=np.float64)
        except ValueError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def override_pixel_size(file_ps: float, user_ps: float | None, path: Path, what: str) -> float:
    """The pixel size to use: the user's when given (warning when it differs from the file's), else the file's.

    Raises
    ------
    InputError
        The user's value is not a positive number.
    """
    if user_ps is None:
        return file_ps
    user_ps = float(user_ps)
    if not (np.isfinite(user_ps) and user_ps > 0):
        raise InputError("--pixel-size", f"pixel size must be a positive number, got {user_ps}")
    if file_ps > 0 and abs(file_ps - user_ps) > 1e-4 * user_ps:
        warnings.warn(f"{path}: {what} pixel size {file_ps:g} Å replaced by the given {user_ps:g} Å", stacklevel=4)
    return user_ps


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a hidden temporary file beside ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_text_file(p: Path, what: str = "coordinate file", content: str = "coordinates") -> str:
    """The text of a small text file (coordinates, CTF estimates), every unreadable case one InputError.

    ``what`` names the kind of file and ``content`` what it holds, in the messages.
    """
    if not p.exists():
        raise InputError(p, "file not found")
    if p.is_dir():
        raise InputError(p, f"is a directory, not a {what}")
    raw = p.read_bytes()
    if b"\x00" in raw[:4096]:
        raise InputError(p, f"binary file, not a {what}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(p, f"not a text file (not UTF-8), not a {what}") from None
    if not text.strip():
        raise InputError(p, f"file is empty (no header, no {content})")
    return text


def looks_like_star(text: str) -> bool:
    """True when the first line that is not blank or a comment opens a STAR block."""
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            return s.startswith("data_")
    return False


def float_column(table: pd.DataFrame, label: str, path: Path) -> np.ndarray:
    """A numeric column whose values may be ``nan``/``inf``; text is an error."""
    col = table[label]
    vals = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    nan = np.isnan(vals)
    if nan.any():
        # a NaN that was not written as "nan" came from text
        written = col[nan].astype(str).str.strip().str.lower()
        bad = ~written.isin(["nan", "-nan", "+nan"])
        if bad.any():
            r = int(np.flatnonzero(nan)[int(np.argmax(bad.to_numpy()))])
            raise InputError(path, f"_{label} in row {r + 1} is '{col.iloc[r]}', not a number")
    return vals


def star_tables(p: Path) -> dict[str, pd.DataFrame]:
    """Every table of a STAR file by block name; a one-row block written without ``loop_`` becomes a one-row table."""
    blocks = read_blocks(p)
    tables = dict(table_blocks(blocks))
    for name, v in blocks.items():
        # a one-row table written without loop_ comes back as a dict
        if isinstance(v, dict) and v:
            tables[name] = pd.DataFrame({k: [val] for k, val in v.items()})
    return tables
