"""The public Python API (issue #10 item 4): its examples run, it loads no database or MPI, it checks inputs."""

from __future__ import annotations

import doctest
import subprocess
import sys

import numpy as np
import pytest

import cistem_mpi
from cistem_mpi.errors import InputError


def test_every_public_function_has_a_runnable_example_and_numpy_sections():
    import cistem_mpi.api as api

    for name in api.__all__:
        doc = getattr(api, name).__doc__ or ""
        assert ">>>" in doc and "Returns" in doc and "Parameters" in doc, name
    result = doctest.testmod(api, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 2 * len(api.__all__)


def test_importing_the_api_loads_neither_sqlite3_nor_mpi4py():
    code = ("import cistem_mpi.api, sys; assert 'sqlite3' not in sys.modules and 'mpi4py' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('sqlite3', 'mpi4py')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", "import cistem_mpi, sys; cistem_mpi.api.ctf(8, 1.0, 1e4); "
                        "assert 'cistem_mpi.api' in sys.modules"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # exported from the package, imported on first use


def test_reconstruct_with_ctf_recovers_the_map_and_its_halves_differ():
    api = cistem_mpi.api
    vol = api.phantom(24, seed=3)
    ang = api.random_angles(600, seed=4)
    rng = np.random.default_rng(5)
    defocus = np.stack([rng.uniform(8000, 20000, 600)] * 2 + [np.zeros(600)], axis=1)
    images = api.project(vol, ang)
    c = np.stack([api.ctf(24, 3.0, d[0], d[1], d[2]) for d in defocus])  # full, origin-first grids
    images = np.real(np.fft.ifft2(np.fft.fft2(images) * c)).astype(np.float32)
    images += 0.2 * images.std() * rng.normal(size=images.shape).astype(np.float32)
    maps = api.reconstruct(images, ang, 3.0, defocus=defocus, bfactor=0.0)
    assert np.corrcoef(maps.volume.ravel(), vol.ravel())[0, 1] > 0.9
    assert not np.array_equal(maps.half1, maps.half2)
    assert maps.resolution < 10.0 and maps.fsc[1] > 0.9


@pytest.mark.parametrize("call, where", [
    (lambda a: a.reconstruct(np.zeros((3, 8, 6)), np.zeros((3, 3)), 1.0), "images"),
    (lambda a: a.reconstruct(np.zeros((3, 8, 8)), np.zeros((2, 3)), 1.0), "angles"),
    (lambda a: a.reconstruct(np.zeros((3, 8, 8)), np.zeros((3, 3)), 1.0, symmetry="X7"), "symmetry"),
    (lambda a: a.reconstruct(np.zeros((3, 8, 8)), np.zeros((3, 3)), -1.0), "optics group given"),
    (lambda a: a.ctf(16, 1.0, 1e4, amplitude_contrast=1.5), "CTF parameters"),
    (lambda a: a.project(np.zeros((4, 4, 5)), np.zeros((1, 3))), "volume"),
    (lambda a: a.classify_2d(np.zeros((3, 8, 8)), 1.0, 5, 3.0), "n_classes"),
    (lambda a: a.align_movie(np.zeros((1, 8, 8)), 1.0), "frames"),
])
def test_bad_arguments_are_input_errors(call, where):
    with pytest.raises(InputError) as e:
        call(cistem_mpi.api)
    assert e.value.path == where


@pytest.mark.parametrize("module", [
    "cistem_mpi.io.params", "cistem_mpi.io.validate", "cistem_mpi.io.parameter_files", "cistem_mpi.io.star.common",
    "cistem_mpi.io.star.relion", "cistem_mpi.kernels.reconstruct3d", "cistem_mpi.kernels.interpolation",
    "cistem_mpi.kernels.ctf", "cistem_mpi.db.packages", "cistem_mpi.db.assets", "cistem_mpi.drivers.options",
    "cistem_mpi.drivers.runtime.world",
])
def test_examples_of_the_layer_modules_run(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
