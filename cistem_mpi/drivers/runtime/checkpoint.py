"""Per-iteration checkpoints of iterative jobs (refinement, classification, ab initio).

After each finished iteration rank 0 saves what the next iteration starts
from: the per-particle parameters, the references, and small state (the
random generator's state, the current resolution limit ...).  ``--resume``
loads the last complete checkpoint and continues; because the random state
is saved too, the result is the same as that of an uninterrupted run.

A checkpoint is a directory ``iter_NNNNNN`` written under a temporary name
and renamed into place only when complete (``rename`` is atomic on POSIX
file systems, Lustre and BeeGFS included), with a manifest of SHA-256 sums
checked on load.  A job killed while saving (SIGKILL, node failure) leaves a
``*.partial-*`` directory that is ignored and cleaned up later; the previous
checkpoint stays intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cistem_mpi.errors import InputError

_NAME = re.compile(r"^iter_(\d{6})$")
_MANIFEST = "manifest.json"
_STATE = "state.json"


@dataclass
class Checkpoint:
    """One loaded checkpoint."""

    iteration: int
    path: Path
    state: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    #: extra files saved with the checkpoint (name -> path inside the checkpoint)
    files: dict[str, Path] = field(default_factory=dict)


def rng_state(gen: np.random.Generator) -> dict[str, Any]:
    """The state of a numpy Generator as JSON-able data."""
    return {"bit_generator": type(gen.bit_generator).__name__, "state": gen.bit_generator.state}


def rng_from_state(saved: Mapping[str, Any]) -> np.random.Generator:
    """A numpy Generator continuing exactly where :func:`rng_state` left it."""
    bg_cls = getattr(np.random, saved["bit_generator"])
    bg = bg_cls()
    bg.state = saved["state"]
    return np.random.Generator(bg)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


class CheckpointStore:
    """Checkpoints of one job in ``directory`` (rank 0 writes, any rank may read).

    Parameters
    ----------
    directory : path
        Created if missing; survives the job (``JobContext.checkpoint_dir``).
    keep : int
        Number of newest complete checkpoints kept (older ones are removed).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = Path(directory)
        self.keep = max(1, int(keep))

    def _dir(self, iteration: int) -> Path:
        return self.directory / f"iter_{iteration:06d}"

    def iterations(self) -> list[int]:
        """Iterations with a complete checkpoint directory, ascending."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m and (p / _MANIFEST).is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def save(
        self,
        iteration: int,
        state: Mapping[str, Any] | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
        files: Mapping[str, str | os.PathLike] | None = None,
    ) -> Path:
        """Save iteration ``iteration`` atomically; returns its directory.

        Parameters
        ----------
        iteration : int
            The iteration just finished (>= 0).
        state : mapping
            JSON-able data (use :func:`rng_state` for random generators).
        arrays : mapping name -> ndarray
            Saved as ``.npy`` (exact, any dtype incl. structured PARAM_DTYPE).
        files : mapping name -> path
            Existing files (e.g. reference MRC volumes) copied in.
        """
        if iteration < 0:
            raise ValueError("iteration must be >= 0")
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self._dir(iteration)
        tmp = self.directory / f"{final.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        entries: dict[str, dict[str, Any]] = {}
        for name, arr in (arrays or {}).items():
            _check_name(name)
            fn = tmp / f"{name}.npy"
            np.save(fn, np.asarray(arr), allow_pickle=False)
            entries[fn.name] = {"kind": "array", "name": name}
        for name, src in (files or {}).items():
            _check_name(name)
            fn = tmp / name
            shutil.copyfile(src, fn)
            entries[fn.name] = {"kind": "file", "name": name}
        (tmp / _STATE).write_text(json.dumps(dict(state or {}), sort_keys=True))
        entries[_STATE] = {"kind": "state", "name": "state"}
        for fname, entry in entries.items():
            p = tmp / fname
            _fsync_file(p)
            entry["sha256"] = _sha256(p)
            entry["bytes"] = p.stat().st_size
        manifest = {"iteration": iteration, "entries": entries}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=1))
        _fsync_file(tmp / _MANIFEST)
        _fsync_dir(tmp)
        if final.exists():  # re-saving an iteration (a resumed job redoing it)
            old = self.directory / f"{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.directory)
        self._prune()
        return final

    def _prune(self) -> None:
        its = self.iterations()
        for it in its[: -self.keep]:
            shutil.rmtree(self._dir(it), ignore_errors=True)
        for p in self.directory.iterdir():
            if ".partial-" in p.name or ".old-" in p.name:
                pid = p.name.rsplit("-", 1)[-1]
                if not (pid.isdigit() and int(pid) == os.getpid()):
                    shutil.rmtree(p, ignore_errors=True)

    def load(self, iteration: int) -> Checkpoint:
        """Load and verify one checkpoint.

        Raises
        ------
        InputError
            If the checkpoint is missing or a file does not match its checksum.
        """
        path = self._dir(iteration)
        man_path = path / _MANIFEST
        if not man_path.is_file():
            raise InputError(path, "checkpoint is missing or incomplete (no manifest.json)")
        try:
            manifest = json.loads(man_path.read_text())
        except ValueError as exc:
            raise InputError(man_path, f"unreadable checkpoint manifest ({exc})") from None
        ck = Checkpoint(iteration=iteration, path=path)
        for fname, entry in manifest["entries"].items():
            p = path / fname
            if not p.is_file():
                raise InputError(p, "checkpoint file is missing")
            if p.stat().st_size != entry["bytes"] or _sha256(p) != entry["sha256"]:
                raise InputError(p, "checkpoint file does not match its checksum (damaged)")
            if entry["kind"] == "array":
                ck.arrays[entry["name"]] = np.load(p, allow_pickle=False)
            elif entry["kind"] == "file":
                ck.files[entry["name"]] = p
            else:
                ck.state = json.loads(p.read_text())
        return ck

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies (older ones are tried if it does not)."""
        for it in reversed(self.iterations()):
            try:
                return self.load(it)
            except InputError:
                continue
        return None


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or name in (_MANIFEST, _STATE):
        raise ValueError(f"bad checkpoint entry name {name!r}")
