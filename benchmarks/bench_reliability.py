"""What the reliability checks of issue #13 cost: the per-chunk NaN check and the stack preallocation.

Prints throughput, peak memory (resource.getrusage) and the ratio against a plain-numpy version of the
same step measured in the same run.  Runs in well under a minute.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from cistem_mpi.io.mrc import MrcStackWriter, check_finite


def _best(fn, repeat: int = 5) -> float:
    t = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def main() -> None:
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((256, 128, 128), dtype=np.float32)  # one reconstruction chunk of box-128 images
    mb = chunk.nbytes / 1e6
    ours = _best(lambda: check_finite(chunk, "chunk", 1))
    plain = _best(lambda: bool(np.isnan(chunk).any() or np.isinf(chunk).any()))
    print(f"NaN check of a chunk ({chunk.shape[0]} images of 128^2): {mb / ours:8.0f} MB/s "
          f"(plain numpy isnan+isinf: {mb / plain:8.0f} MB/s, ratio {plain / ours:.2f})")
    # for scale: the FFT the reconstruction does to the same chunk anyway
    t_fft = _best(lambda: np.fft.rfft2(chunk), repeat=3)
    print(f"  the chunk's FFT (numpy) takes {t_fft * 1e3:.1f} ms; the check {ours * 1e3:.1f} ms "
          f"({100 * ours / t_fft:.1f} % of it)")

    n, box = 2000, 128
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        path = Path(d) / "stack.mrcs"
        gb = (1024 + n * box * box * 4) / 1e9

        def preallocated() -> None:
            MrcStackWriter(path, (box, box), n, 1.0).close()
            path.unlink()

        def sparse() -> None:  # what the writer did before: a sparse file of the full size
            with open(path, "wb") as f:
                f.truncate(1024 + n * box * box * 4)
            path.unlink()

        t_ours = _best(preallocated, repeat=3)
        t_plain = _best(sparse, repeat=3)
        print(f"stack writer open with posix_fallocate ({gb:.2f} GB): {gb / t_ours:8.1f} GB/s reserved "
              f"(sparse truncate: {t_plain * 1e3:.1f} ms, ours {t_ours * 1e3:.1f} ms)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory: {peak:.0f} MB")


if __name__ == "__main__":
    main()
