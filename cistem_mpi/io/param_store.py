"""The project's own per-particle parameter files (HDF5).

One file per (refinement, class): dataset ``params`` holds the Frealign X
columns (:data:`~cistem_mpi.io.params.PARAM_DTYPE`), chunked and compressed
so ten million particles stay a few hundred MB and a rank can read just its
slice.  ``.par``/``.star`` exports are written beside it for users.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from cistem_mpi.errors import InputError
from cistem_mpi.io.params import PARAM_DTYPE

_CHUNK = 65536


def write_params_h5(path: str | Path, params: np.ndarray, attrs: dict | None = None,
                    columns: dict[str, np.ndarray] | None = None) -> None:
    """Write a parameter table atomically (temporary file, then rename).

    Parameters
    ----------
    path : path
        Destination ``.h5`` file.
    params : numpy.ndarray
        Array of :data:`PARAM_DTYPE`.
    attrs : dict, optional
        Scalars stored as attributes (pixel size, symmetry, ...).
    columns : dict, optional
        Other per-particle arrays stored beside ``params`` (e.g. ``half_set``).
    """
    path = Path(path)
    if params.dtype != PARAM_DTYPE:
        raise TypeError(f"parameters must have PARAM_DTYPE, got {params.dtype}")
    tmp = path.with_name(path.name + ".part")
    with h5py.File(tmp, "w") as f:
        f.create_dataset(
            "params", data=params, chunks=(min(_CHUNK, max(1, len(params))),) if len(params) else None,
            compression="gzip" if len(params) else None, compression_opts=1 if len(params) else None,
        )
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
        for k, v in (columns or {}).items():
            if len(v) != len(params):
                raise ValueError(f"column {k} has {len(v)} rows, parameters have {len(params)}")
            f.create_dataset(k, data=np.asarray(v))
    os.replace(tmp, path)


def read_params_h5(path: str | Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Read rows ``start:stop`` of a parameter file (all by default)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            ds = f["params"]
            if ds.dtype != PARAM_DTYPE:
                raise InputError(path, f"parameter table has columns {ds.dtype.names}, expected Frealign X columns")
            return ds[start:stop]
    except (OSError, KeyError) as exc:
        raise InputError(path, f"cannot read parameter file ({exc})") from exc


def read_params_column(path: str | Path, name: str) -> np.ndarray | None:
    """A per-particle array stored beside the parameters (None if absent)."""
    with h5py.File(path, "r") as f:
        return f[name][()] if name in f else None


def read_params_attrs(path: str | Path) -> dict:
    """The attributes stored with a parameter file."""
    with h5py.File(path, "r") as f:
        return dict(f.attrs)
