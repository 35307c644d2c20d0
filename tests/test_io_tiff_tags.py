"""LZW TIFF movies carry an explicit SampleFormat, so cisTEM reads them (issue #18)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cistem_mpi.io.movies import open_movie, write_tiff_movie
from cistem_mpi.io.tiff_tags import add_sample_format


def _formats(path: Path) -> list[int]:
    with tifffile.TiffFile(str(path)) as tf:
        return [int(p.tags["SampleFormat"].value) if "SampleFormat" in p.tags else 0 for p in tf.pages]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("bigtiff", [False, True])
def test_unsigned_movies_get_sample_format_and_keep_their_frames(tmp_path, dtype, bigtiff):
    frames = np.random.default_rng(1).poisson(2.0, (4, 96, 80)).astype(dtype)
    p = tmp_path / "m.tif"
    write_tiff_movie(p, frames, compression="lzw", bigtiff=bigtiff)
    assert _formats(p) == [1, 1, 1, 1]
    assert np.array_equal(np.stack(list(open_movie(p))), frames)


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_add_sample_format_relinks_every_directory(tmp_path, byteorder):
    p = tmp_path / "plain.tif"
    data = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30)
    with tifffile.TiffWriter(str(p), byteorder=byteorder) as tw:
        for f in data:
            tw.write(f, compression="lzw", photometric="minisblack", metadata=None)
    assert _formats(p) == [0, 0, 0]           # what tifffile writes for unsigned integers
    before = p.stat().st_size
    assert add_sample_format(p) == 3
    assert _formats(p) == [1, 1, 1]
    assert p.stat().st_size - before < 3 * 400  # directories only: the strips are not copied
    assert add_sample_format(p) == 0           # already there: nothing to do
    with tifffile.TiffFile(str(p)) as tf:
        assert np.array_equal(tf.asarray(), data)


def test_not_a_tiff_is_refused(tmp_path):
    p = tmp_path / "x.tif"
    p.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not a TIFF"):
        add_sample_format(p)


def _unblur() -> Path | None:
    d = os.environ.get("CISTEM_BIN")
    exe = Path(d) / "unblur" if d else None
    return exe if exe is not None and exe.is_file() else None


@pytest.mark.interop  # a peer program reading our file: make test-interop, with CISTEM_BIN set
@pytest.mark.skipif(_unblur() is None, reason="cisTEM's unblur not available (set CISTEM_BIN)")
def test_cistem_unblur_reads_our_lzw_tiff(tmp_path):
    frames = np.random.default_rng(2).poisson(1.0, (6, 256, 256)).astype(np.uint8)
    movie = tmp_path / "m.tif"
    write_tiff_movie(movie, frames, compression="lzw")
    shifts = tmp_path / "shifts.txt"
    answers = [movie, tmp_path / "sum.mrc", shifts, 1.0, 1, "no", "no", "no"]  # no dose filter, expert options or distortion
    run = subprocess.run([str(_unblur())], input="\n".join(map(str, answers)) + "\n", text=True,
                         capture_output=True, cwd=tmp_path, timeout=300)
    assert "Unsupported sample format" not in run.stdout + run.stderr
    assert run.returncode == 0 and (tmp_path / "sum.mrc").is_file(), run.stdout[-2000:]
