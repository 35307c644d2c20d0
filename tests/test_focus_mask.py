"""``manual-refine --focus-mask``: the focus sphere derived from a mask map, against ground truth.

Kernel (:func:`cistem_mpi.kernels.masks.enclosing_sphere`): a slow loop over every voxel gives the
same numbers; a soft sphere and an ellipsoid at known off-centre positions give their centre and
the radius that covers them.  Driver: the derived centre and radius are printed and recorded, drive
the focused refinement exactly as the same numbers given as --focus-centre/--focus-radius do, and a
mask on another grid (box, pixel size) or an empty mask is one error line naming the file.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cistem_mpi import cli
from cistem_mpi.db.project import Project
from cistem_mpi.io.mrc import write_mrc
from cistem_mpi.kernels.masks import enclosing_sphere, sphere_mask
from helpers_jobs import db_dump

CLI = [sys.executable, "-m", "cistem_mpi"]


def _slow(mask: np.ndarray, ps: float, level: float = 0.5) -> tuple[tuple[float, float, float], float]:
    """Every voxel, one at a time."""
    nz, ny, nx = mask.shape
    tot = sx = sy = sz = 0.0
    peak = -math.inf
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                v = float(mask[z, y, x])
                peak = max(peak, v)
                w = max(v, 0.0)
                tot += w
                sx += w * x
                sy += w * y
                sz += w * z
    cx, cy, cz = sx / tot, sy / tot, sz / tot
    far = 0.0
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                if max(float(mask[z, y, x]), 0.0) >= level * peak:
                    far = max(far, math.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2))
    return (cx * ps, cy * ps, cz * ps), far * ps


def _ellipsoid(shape, centre_zyx, semi_zyx, edge=3.0):
    """A soft ellipsoid: cosine edge on the scaled radius (value 0.5 on the nominal surface)."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    s = np.sqrt(((z - centre_zyx[0]) / semi_zyx[0]) ** 2 + ((y - centre_zyx[1]) / semi_zyx[1]) ** 2
                + ((x - centre_zyx[2]) / semi_zyx[2]) ** 2)
    # edge in pixels along the longest axis
    t = np.clip((s - 1.0) * max(semi_zyx) / edge + 0.5, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)


def test_equals_the_slow_reference():
    rng = np.random.default_rng(3)
    m = (sphere_mask(14, 4.0, 2.0, center=(5.2, 8.0, 6.7)) + 0.2 * rng.random((14, 14, 14))).astype(np.float32)
    m[0, 0, 0] = -0.4  # negative values weigh nothing
    for level in (0.5, 0.8):
        (cx, cy, cz), r = enclosing_sphere(m, 1.3, level)
        (ex, ey, ez), er = _slow(m, 1.3, level)
        assert np.allclose([cx, cy, cz, r], [ex, ey, ez, er], rtol=1e-9, atol=1e-9)


def test_soft_sphere_off_centre_gives_its_centre_and_radius():
    ps, n, radius = 1.7, 64, 11.0
    centre_zyx = (37.3, 24.6, 20.2)
    (cx, cy, cz), r = enclosing_sphere(sphere_mask(n, radius, 6.0, center=centre_zyx), ps)
    assert np.allclose([cx, cy, cz], np.array(centre_zyx[::-1]) * ps, atol=0.01 * ps)
    # the farthest voxel centre at or above half height: within one voxel inside the true surface
    assert radius * ps - ps <= r <= radius * ps + 1e-6, r / ps


def test_ellipsoid_gives_the_sphere_that_covers_it():
    ps = 2.0
    centre_zyx, semi_zyx = (30.0, 21.5, 40.25), (6.0, 9.0, 14.0)
    m = _ellipsoid((64, 48, 64), centre_zyx, semi_zyx)  # also a non-cubic grid
    (cx, cy, cz), r = enclosing_sphere(m, ps)
    assert np.allclose([cx, cy, cz], np.array(centre_zyx[::-1]) * ps, atol=0.02 * ps)
    assert 13.0 * ps <= r <= 14.0 * ps + 1e-6  # the longest semi-axis
    # every voxel of the mask above half height is inside the sphere
    z, y, x = np.nonzero(m >= 0.5)
    d = np.sqrt((x * ps - cx) ** 2 + (y * ps - cy) ** 2 + (z * ps - cz) ** 2)
    assert d.max() <= r + 1e-9


@pytest.mark.parametrize("bad, why", [(np.zeros((8, 8, 8)), "empty"), (np.zeros((8, 8)), "3D"),
                                      (np.full((4, 4, 4), np.nan), "NaN")])
def test_bad_masks_raise(bad, why):
    with pytest.raises(ValueError, match=why):
        enclosing_sphere(bad, 1.0)


# ------------------------------------------------------------------ the driver
BOX, PS = 48, 3.0


@pytest.fixture(scope="module")
def refine_project(tmp_path_factory):
    from cistem_mpi.drivers.simulate import simulate_particles
    from cistem_mpi.io.par import write_par

    base = tmp_path_factory.mktemp("focusmask")
    sim = simulate_particles(base / "data", n_particles=24, box=BOX, pixel_size=PS, snr=1.0, seed=5)
    write_par(base / "start.par", sim.particles.params)
    root = base / "proj"
    Project.create(root).close()
    r = subprocess.run(CLI + ["import", "particles", "-p", str(root), str(sim.stack), "--pixel-size", str(PS),
                              "--params", str(base / "start.par")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    Project.open(root).close()
    return sim, root


def _refine(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["manual-refine", "-p", str(root), "--high-resolution", "12", "--no-shifts",
                                 "--angle-step", "4", *extra], capture_output=True, text=True, timeout=600)


def _newest(root: Path) -> tuple[dict, list]:
    from cistem_mpi.io.param_store import read_params_h5

    with Project.open(root, readonly=True) as p:
        job = p.conn.execute("SELECT result FROM jobs ORDER BY id DESC").fetchone()
        path = p.conn.execute("SELECT params_path FROM refinement_classes ORDER BY refinement_id DESC").fetchone()[0]
        params = read_params_h5(p.resolve(path))
    return json.loads(job[0]), params


@pytest.mark.slow
def test_focus_mask_drives_the_focused_refinement(refine_project, tmp_path):
    import shutil

    sim, root = refine_project
    centre_zyx, radius = (28.0, 20.0, 26.5), 8.0  # voxels
    mask = tmp_path / "focus.mrc"
    write_mrc(mask, sphere_mask(BOX, radius, 4.0, center=centre_zyx), PS)
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(root, a)
    shutil.copytree(root, b)
    r = _refine(a, "--focus-mask", str(mask))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("focus sphere from"))
    res, params_a = _newest(a)
    got = res["focus_from_mask"]
    assert np.allclose(got["centre_A"], np.array(centre_zyx[::-1]) * PS, atol=0.02)
    assert radius * PS - PS <= got["radius_A"] <= radius * PS
    reuse = line.split("(reuse as ")[1].rstrip(")").split()
    assert reuse[0] == "--focus-centre" and reuse[4] == "--focus-radius"
    # the printed numbers, given by hand, give the very same refinement
    r = _refine(b, *reuse)
    assert r.returncode == 0, r.stderr
    _, params_b = _newest(b)
    assert np.array_equal(params_a, params_b)
    # and the focus made a difference (the sphere covers a part of the particle only)
    c = tmp_path / "c"
    shutil.copytree(root, c)
    assert _refine(c).returncode == 0
    assert not np.array_equal(params_a, _newest(c)[1])


@pytest.mark.parametrize("case", ["box", "pixel_size", "empty", "with_centre"])
def test_bad_focus_mask_is_one_line_naming_the_file(refine_project, tmp_path, capsys, case):
    import shutil

    _, root = refine_project
    proj = tmp_path / "p"
    shutil.copytree(root, proj)
    Project.open(proj).close()
    mask = tmp_path / "m.mrc"
    extra: list[str] = []
    if case == "box":
        write_mrc(mask, sphere_mask(BOX - 16, 6.0), PS)
        expect = f"{mask}: mask box 32x32x32 does not match the reference's 48x48x48"
    elif case == "pixel_size":
        write_mrc(mask, sphere_mask(BOX, 6.0), 2.2)
        expect = f"{mask}: mask header pixel size 2.2000 Å does not match the reference's 3.0000 Å"
    elif case == "empty":
        write_mrc(mask, np.zeros((BOX,) * 3, np.float32), PS)
        expect = f"{mask}: the mask is empty"
    else:
        write_mrc(mask, sphere_mask(BOX, 6.0), PS)
        extra = ["--focus-centre", "1", "2", "3"]
        expect = "--focus-mask: give --focus-mask or --focus-centre, not both"
    before = db_dump(proj)
    capsys.readouterr()
    rc = cli.main(["manual-refine", "-p", str(proj), "--focus-mask", str(mask), *extra])  # in this process
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {expect}"), err
    assert db_dump(proj) == before
