"""Dynamic task queue: chunking, order, progress; identical results for 1, 2, 3, 8 ranks.

Per-task results are compared *bitwise* with the serial computation: every
task's result depends only on its index, and rank 0 stores it by index, so
no summation order is involved.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cistem_mpi.drivers.runtime.taskqueue import map_chunks, map_items, map_tasks, next_chunk_size
from cistem_mpi.drivers.runtime.world import World
from runtime_helpers import PROG, need_mpiexec, run
from runtime_prog import fft_task




@pytest.mark.parametrize("n,workers", [(1, 1), (10, 3), (1000, 7), (100000, 351)])
def test_guided_chunks_cover_everything_and_shrink(n, workers):
    sizes = []
    remaining = n
    while remaining:
        s = next_chunk_size(remaining, workers, n)
        assert 1 <= s <= remaining
        sizes.append(s)
        remaining -= s
    assert sum(sizes) == n
    assert sizes == sorted(sizes, reverse=True)  # never grows: big first, small at the end
    assert sizes[-1] == 1 or n < 4 * workers or sizes[-1] <= sizes[0]
    assert max(sizes) <= max(1, -(-n // 100))  # progress moves at least every 1 %


def test_fixed_and_bounded_chunks():
    assert next_chunk_size(100, 4, 100, chunk_size=7) == 7
    assert next_chunk_size(3, 4, 100, chunk_size=7) == 3
    assert next_chunk_size(1000, 1, 1000, min_chunk=50) == 50  # cap 10 raised to min 50
    assert next_chunk_size(1000, 1, 1000, max_chunk=5) == 5
    assert next_chunk_size(0, 4, 10) == 0


def test_one_rank_runs_everything_in_order_with_progress():
    world = World(None)
    calls, seen = [], []
    res = map_tasks(world, 250, lambda i: i * i, progress=lambda d, t: calls.append((d, t)),
                    on_result=lambda start, r: seen.append((start, len(r))))
    assert res == [i * i for i in range(250)]
    assert calls[0] == (0, 250) and calls[-1] == (250, 250)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert sum(n for _, n in seen) == 250
    assert map_tasks(world, 5, lambda i: i, keep=False) is None
    assert map_items(world, ["a", "bb"], len) == [1, 2]


def test_wrong_chunk_length_is_an_error():
    with pytest.raises(ValueError, match="returned 1 results, expected"):
        map_chunks(World(None), 10, lambda a, b, d: [0], chunk_size=3)


def _serial(n):
    return np.stack([fft_task(i) for i in range(n)])


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3, 8])
def test_results_bitwise_identical_for_any_rank_count(tmp_path, ranks):
    out = tmp_path / "q.npz"
    res = run([need_mpiexec(), "-n", str(ranks), sys.executable, str(PROG), "queue", str(out), "--tasks", "37"],
              timeout=60)
    assert res.returncode == 0, res.stderr
    d = np.load(out)
    assert int(d["size"]) == ranks
    serial = _serial(37)
    assert d["results"].dtype == np.float32
    assert d["results"].tobytes() == serial.tobytes()  # bitwise
    assert list(d["items"]) == [f"ITEM{i}@{len(f'item{i}')}" for i in range(37)]


def test_one_rank_same_bits_as_serial():
    res = map_tasks(World(None), 37, fft_task)
    assert np.stack(res).tobytes() == _serial(37).tobytes()


@pytest.mark.mpi
def test_slow_rank_gets_less_work(tmp_path):
    out = tmp_path / "slow.npz"
    res = run([need_mpiexec(), "-n", "3", sys.executable, str(PROG), "slow", str(out), "--tasks", "120"], timeout=60)
    assert res.returncode == 0, res.stderr
    who = np.load(out)["who"]
    n1, n2 = int(np.sum(who == 1)), int(np.sum(who == 2))
    assert n1 + n2 == 120 and not np.any(who == 0)  # rank 0 only controls
    assert n1 * 3 < n2, (n1, n2)  # 10x slower rank did far fewer tasks
