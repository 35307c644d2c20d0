"""Volumes over ranks: z-slab reduce-scatter + per-slab normalisation + gather == serial sum.

The accumulators hold float32 sums of random contributions; MPI adds the
ranks' partial sums in an order that depends on the rank count, so the
comparison with the serial sum is to float32 tolerance (rtol 1e-5), not
bitwise.  (mpi-check's integer-valued accumulators test the bitwise case.)
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cistem_mpi.drivers.runtime.slab import accumulator_bytes, gather_z, reduce_scatter_z, slab_bounds
from cistem_mpi.drivers.runtime.world import World
from runtime_helpers import PROG, need_mpiexec, run
from runtime_prog import contribution


@pytest.mark.parametrize("n_z,size", [(7, 1), (7, 3), (7, 8), (512, 352), (1024, 7), (0, 2)])
def test_slab_bounds_partition(n_z, size):
    b = slab_bounds(n_z, size)
    assert len(b) == size and b[0][0] == 0 and b[-1][1] == n_z
    assert all(b[i][1] == b[i + 1][0] for i in range(size - 1))  # contiguous, no overlap
    lens = [z1 - z0 for z0, z1 in b]
    assert max(lens) - min(lens) <= 1


def test_one_rank_is_identity():
    w = World(None)
    acc = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    s = reduce_scatter_z(w, acc)
    assert (s.z0, s.z1) == (0, 4) and s.data is acc
    assert np.array_equal(gather_z(w, s.data, acc.shape), acc)
    with pytest.raises(ValueError, match="slab shape"):
        gather_z(w, acc[:2], acc.shape)


def test_accumulator_bytes_formula():
    # P = 512: numerator complex64 + weights float32 on 512 x 512 x 257
    b = accumulator_bytes(256, 2, 1)
    assert b["accumulator"] == 512 * 512 * 257 * 12 == 808_452_096
    assert b["per_rank"] == b["accumulator"]  # one rank: the accumulator is the sum
    b8 = accumulator_bytes(512, 2, 8)
    assert b8["accumulator"] == 1024 * 1024 * 513 * 12
    assert b8["slab"] == 128 * 1024 * 513 * 12


def _serial(tasks, shape):
    num = np.zeros(shape, np.complex64)
    wgt = np.zeros(shape, np.float32)
    for i in range(tasks):
        c = contribution(i, shape)
        num += c
        wgt += np.abs(c) ** 2
    return num / (wgt + np.float32(1.0))


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3, 8])
def test_reduce_scatter_matches_serial(tmp_path, ranks):
    out = tmp_path / "s.npz"
    shape = (7, 5, 4)
    res = run([need_mpiexec(), "-n", str(ranks), sys.executable, str(PROG), "slab", str(out), "--tasks", "23",
               "--shape", *map(str, shape)], timeout=60)
    assert res.returncode == 0, res.stderr
    d = np.load(out)
    ref = _serial(23, shape)
    assert d["volume"].dtype == np.complex64 and d["volume"].shape == shape
    np.testing.assert_allclose(d["volume"], ref, rtol=1e-5, atol=1e-6)
    # each rank held exactly its slab of the sum (complex64 planes of 5x4)
    slabs = d["slabs"]
    assert [tuple(s[:2]) for s in slabs] == slab_bounds(7, ranks)
    assert all(s[2] == (s[1] - s[0]) * 5 * 4 * 8 for s in slabs)
    assert bool(d["bcast_ok"])
    assert list(d["allreduce"]) == [ranks, sum(range(ranks))]
    who = d["who"]
    assert set(who) <= set(range(1, ranks)) and len(who) == 23  # work done by workers only
