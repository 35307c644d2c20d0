"""One set of accumulators per node (MPI-3 shared memory) gives the per-rank map, to float32 rounding."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cistem_mpi.drivers.simulate import simulate_particles
from cistem_mpi.kernels.backprojection import balanced_bands
from runtime_helpers import REPO, need_mpiexec, run

PROG = REPO / "tests" / "reconstruct_prog.py"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_particles(tmp_path_factory.mktemp("shared"), n_particles=240, box=48, pixel_size=3.0,
                              snr=0.5, seed=12)


def _run(sim, tmp_path, ranks: int, mode: str, symmetry: str = "C1", padding: float = 2.0) -> dict:
    out = tmp_path / f"{mode}_{ranks}_{symmetry}_{padding}.npz"
    cmd = [sys.executable, str(PROG), str(sim.stack), str(sim.cistem_star), str(out), symmetry, str(padding)]
    if ranks > 1 or mode == "shared":
        cmd = [need_mpiexec(), "-n", str(ranks)] + cmd
    res = run(cmd, timeout=240, env={"CISTEM_MPI_NODE_MEMORY": mode})
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def _same(a: dict, b: dict) -> None:
    for key in ("half1", "half2", "volume"):
        scale = float(np.abs(a[key]).max())
        assert np.abs(a[key] - b[key]).max() <= 2e-5 * scale, key
    assert np.abs(a["fsc"] - b["fsc"]).max() <= 1e-4


@pytest.mark.parametrize("symmetry,padding", [("C1", 2.0), ("D2", 1.0)])
def test_shared_accumulation_equals_per_rank_on_1_2_3_ranks(sim, tmp_path, symmetry, padding):
    ref = _run(sim, tmp_path, 1, "per-rank", symmetry, padding)
    assert str(ref["mode"]) == "per-rank"
    for ranks in (1, 2, 3):
        shared = _run(sim, tmp_path, ranks, "shared", symmetry, padding)
        assert str(shared["mode"]) == "shared"
        _same(ref, shared)
    _same(ref, _run(sim, tmp_path, 3, "per-rank", symmetry, padding))


def test_auto_mode_shares_when_a_node_has_several_ranks(sim, tmp_path):
    assert str(_run(sim, tmp_path, 2, "auto")["mode"]) == "shared"
    assert str(_run(sim, tmp_path, 1, "auto")["mode"]) == "per-rank"


@pytest.mark.parametrize("p,parts,radius", [(96, 1, 48.0), (96, 3, 48.0), (97, 4, 30.0), (64, 44, 32.0),
                                            (16, 40, 8.0)])
def test_balanced_bands_cover_every_row_once_with_equal_work(p, parts, radius):
    bands = balanced_bands(p, parts, radius)
    assert len(bands) == parts
    rows = np.concatenate([np.arange(a, b) for runs in bands for a, b in runs] or [np.zeros(0, int)])
    assert np.array_equal(np.sort(rows), np.arange(p))
    freq = np.where(np.arange(p) < (p + 1) // 2, np.arange(p), np.arange(p) - p)
    for runs in bands:
        f = np.sort(np.concatenate([freq[a:b] for a, b in runs])) if runs else np.zeros(0)
        assert f.size == 0 or np.array_equal(f, np.arange(f[0], f[-1] + 1))  # one frequency interval
    if parts <= p // 4:
        # the work of a band: points of randomly oriented planes per kz-row fall off as radius - |kz|
        work = [sum(np.maximum(radius - np.abs(freq[a:b]), 0).sum() for a, b in runs) for runs in bands]
        assert max(work) <= 1.25 * np.mean(work) + radius, work
