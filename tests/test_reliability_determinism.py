"""Issue #13 item 4: multi-rank reconstructions are bit-identical run to run on the same number of ranks."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import mrcfile
import numpy as np
import pytest

from helpers_reliability import imported_project
from runtime_helpers import need_mpiexec, run

_PROG = textwrap.dedent("""
    import json, random, sys, time
    from cistem_mpi.drivers.runtime import get_world, map_chunks

    world = get_world()
    random.seed(world.rank * 7919 + int(sys.argv[1]))

    def chunk(start, stop, _data):
        time.sleep(random.uniform(0.0, 0.01))  # workers race for chunks differently every run
        return [world.rank] * (stop - start)

    out = map_chunks(world, 120, chunk, min_chunk=3, max_chunk=9, static=True)
    if world.is_controller:
        print(json.dumps(out))
""")


def test_static_queue_assigns_chunks_by_index_not_by_request(tmp_path):
    from cistem_mpi.drivers.runtime.taskqueue import static_chunks

    mpiexec = need_mpiexec()
    prog = tmp_path / "prog.py"
    prog.write_text(_PROG)
    owners = []
    for seed in (1, 2):
        r = run([mpiexec, "-n", "3", sys.executable, str(prog), str(seed)], timeout=240)
        assert r.returncode == 0, r.stderr
        owners.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert owners[0] == owners[1]
    expect = [0] * 120
    for w, chunks in enumerate(static_chunks(120, 2, None, 3, 9)):
        for a, b in chunks:
            expect[a:b] = [w + 1] * (b - a)
    assert owners[0] == expect


@pytest.mark.slow
def test_three_rank_reconstructions_are_bit_identical(tmp_path):
    mpiexec = need_mpiexec()
    sim, root = imported_project(tmp_path, n=120, box=32)
    maps = []
    for k in range(2):
        proj = tmp_path / f"run{k}"
        shutil.copytree(root, proj, symlinks=True)
        r = run([mpiexec, "-n", "3", sys.executable, "-m", "cistem_mpi", "reconstruct", "-p", str(proj)], timeout=400)
        assert r.returncode == 0, r.stderr
        maps.append({name: mrcfile.read(proj / "Assets/Volumes" / name)
                     for name in ("volume_1_1.mrc", "volume_1_1_half1.mrc", "volume_1_1_half2.mrc")})
    for name in maps[0]:
        assert np.array_equal(maps[0][name], maps[1][name]), name
