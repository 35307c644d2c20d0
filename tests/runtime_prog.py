"""A small SPMD program exercising the runtime outside any job (run under mpiexec by the tests).

    mpiexec -n N python tests/runtime_prog.py SCENARIO OUT.npz [options]

Rank 0 writes what it computed to OUT.npz; the tests compare it with the
serial answer computed in the test process.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from cistem_mpi.drivers.runtime import (
    gather_z,
    get_world,
    guarded,
    map_items,
    map_tasks,
    reduce_scatter_z,
)


def fft_task(i: int) -> np.ndarray:
    """A float32 result that depends only on the task index (FFT + nonlinear maths)."""
    rng = np.random.default_rng(i)
    img = rng.standard_normal((32, 32)).astype(np.float32)
    spec = np.fft.rfft2(img)
    return np.abs(spec).astype(np.float32)[:4, :4] * np.float32(np.sin(i))


def contribution(i: int, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 contribution of task i to a volume accumulator (complex numerator)."""
    rng = np.random.default_rng(1000 + i)
    re = rng.standard_normal(shape).astype(np.float32)
    im = rng.standard_normal(shape).astype(np.float32)
    return (re + 1j * im).astype(np.complex64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario")
    ap.add_argument("out")
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--shape", type=int, nargs=3, default=(7, 5, 4))
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--hang-rank", type=int, default=-1)
    a = ap.parse_args(argv)
    world = get_world()
    out: dict[str, np.ndarray] = {}
    try:
        with guarded(world, on_failure=lambda info: np.savez(a.out, failed=np.array(info.line()),
                                                              unresponsive=np.array(info.unresponsive))):
            if a.scenario == "queue":
                res = map_tasks(world, a.tasks, fft_task)
                items = map_items(world, [f"item{i}" for i in range(a.tasks)] if world.is_controller else None,
                                  lambda s: s.upper() + f"@{len(s)}")
                if world.is_controller:
                    out["results"] = np.stack(res)
                    out["items"] = np.array(items)
            elif a.scenario == "slab":
                shape = tuple(a.shape)
                acc = np.zeros(shape, np.complex64)
                wgt = np.zeros(shape, np.float32)

                def insert(i: int) -> int:
                    c = contribution(i, shape)
                    acc[...] += c
                    wgt[...] += np.abs(c) ** 2
                    return world.rank

                who = map_tasks(world, a.tasks, insert, chunk_size=1)
                s_num = reduce_scatter_z(world, acc)
                s_wgt = reduce_scatter_z(world, wgt)
                # each rank normalises only its own slab
                vol = gather_z(world, s_num.data / (s_wgt.data + np.float32(1.0)), shape)
                sizes = world.gather((s_num.z0, s_num.z1, s_num.data.nbytes))
                b = world.bcast({"shape": shape} if world.is_controller else None)
                total = world.allreduce_sum(np.array([1.0, world.rank], np.float64))
                if world.is_controller:
                    out["volume"] = vol
                    out["who"] = np.array(who)
                    out["slabs"] = np.array(sizes)
                    out["bcast_ok"] = np.array(b == {"shape": shape})
                    out["allreduce"] = total
            elif a.scenario == "slow":
                # rank 1 is 10x slower than the others: the dynamic queue gives it less work
                def work(i: int) -> int:
                    time.sleep(0.02 if world.rank == 1 else 0.002)
                    return world.rank

                who = map_tasks(world, a.tasks, work, chunk_size=1)
                if world.is_controller:
                    out["who"] = np.array(who)
            elif a.scenario == "collective_fail":
                # a rank fails outside any task queue, while the others wait in a collective
                if world.rank == a.fail_rank:
                    time.sleep(0.2)
                    raise ValueError(f"broken on purpose on rank {world.rank}")
                if world.rank == a.hang_rank:
                    time.sleep(3600)
                reduce_scatter_z(world, np.ones((4, 4, 4), np.float32))
                world.barrier()
            else:
                raise SystemExit(f"unknown scenario {a.scenario}")
    except Exception as exc:
        sys.stderr.write(f"error: {exc}\n")
        return getattr(exc, "exit_code", 1)
    if world.is_controller:
        out["size"] = np.array(world.size)
        np.savez(a.out, **out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
