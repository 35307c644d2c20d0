"""``cistem-mpi demo``: its pipeline settings, and the comparison with the truth it reports.

The demo itself (movies -> pipeline -> refined map, and with ``--compare`` the
chain from the true parameters beside it) is run by CI as ``make demo``; the
slow test here runs ``demo --compare`` against issue 14's acceptance (the
pipeline's map with an FSC against the true map within 0.05 per shell of the
true-parameter chain's), which is not met yet: see the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cistem_mpi.drivers import demo
from cistem_mpi.drivers import pipeline as pl
from cistem_mpi.kernels.euler import angular_distance, random_rotations, rotation_matrix


def _args(**kw):
    import argparse

    base = dict(dose_per_frame=4.0, classify_rounds=6, ab_initio_rounds=15, rounds=3)
    base.update(kw)
    return argparse.Namespace(**base)


def test_the_demo_config_is_a_valid_pipeline_config(tmp_path):
    path = demo.pipeline_config(tmp_path / "pipeline.toml", _args(rounds=2))
    cfg = pl.load_config(path, list(pl.STEPS))  # every key exists, has the right type, nothing required is missing
    assert cfg.get("align-movies")["output-binning"] == 2.0
    assert cfg.get("package-positions")["box"] == demo.BOX
    assert cfg.get("auto-refine")["max-rounds"] == 2
    assert cfg.get("auto-refine")["global-rounds"] == 2  # ab-initio leaves particles that local rounds keep lost
    assert cfg.get("select-classes")["classes"] == [1, 2, 3, 4, 5]  # simulated: no junk class to drop
    text = path.read_text()
    for step in pl.STEP_NAMES:  # every step has its table, and every setting a reason above it
        assert f"[{step}]" in text
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("#") or "=" in lines[i - 1], line


def test_particles_are_matched_by_image_and_nearest_position():
    truth = {1: {"xy": np.array([[100.0, 100.0], [300.0, 100.0]])}, 2: {"xy": np.array([[100.0, 100.0]])}}
    origins = {1: (1, 104.0, 97.0), 2: (1, 290.0, 110.0), 3: (2, 180.0, 100.0), 4: (1, 101.0, 100.0),
               5: (7, 100.0, 100.0)}
    # 3 is too far, 4 is a second box on particle 0 (taken by 1), image 7 has no truth
    assert demo.match_particles(origins, truth, tolerance=20.0) == {1: (1, 0), 2: (1, 1)}


@pytest.mark.parametrize("side, mirrored", [("right", False), ("left", False), ("right", True)])
def test_angular_error_after_the_global_rotation_and_hand(side, mirrored):
    rng = np.random.default_rng(3)
    true = random_rotations(200, rng).astype(np.float64)
    g = rotation_matrix(40.0, 70.0, -20.0).reshape(3, 3)
    mz = np.diag([1.0, 1.0, -1.0])
    t = mz @ true @ mz if mirrored else true
    refined = t @ g if side == "right" else g @ t
    # 2° of noise on 180 particles, 20 wrong ones
    noise = np.stack([rotation_matrix(*rng.normal(0, 2.0 / np.sqrt(3), 3)).reshape(3, 3) for _ in range(200)])
    refined = refined @ noise
    refined[:20] = random_rotations(20, rng)
    err, fit = demo.angular_errors(refined, true)
    assert fit["side"] == side and fit["mirrored"] == mirrored
    assert float(np.median(err[20:])) < 3.0
    assert float(np.median(err[:20])) > 30.0
    # the direct comparison (no global rotation) would be meaningless
    assert float(np.median(angular_distance(refined, true))) > 30.0


def test_fsc_comparison_is_one_sided():
    a = {"map": {"fsc": [1.0, 0.95, 0.80, 0.40, 0.05]}}
    b = {"map": {"fsc": [1.0, 0.97, 0.70, 0.45, 0.02]}}
    c = demo.compare_fsc(a, b)
    assert c["max_deficit"] == pytest.approx(0.05)  # 0.40 vs 0.45
    assert c["max_abs_difference"] == pytest.approx(0.10)  # better is not a failure


def test_true_positions_follow_the_alignment(tmp_path):
    """A particle at p in frame 0 sits at p + drift[f] + shifts[f] in the aligned sum (the mean over frames)."""
    drift = np.array([[0.0, 0.0], [1.0, 0.5], [2.0, 1.0], [3.0, 1.5]])
    shifts = -(drift - drift[2]) + 0.1  # the sum's frame: frame 2, estimated to 0.1 px
    path = tmp_path / "m_shifts.txt"
    path.write_text("# frame x_A y_A x_px y_px\n" + "".join(f"{i} 0 0 {x} {y}\n" for i, (x, y) in enumerate(shifts)))
    truth = demo.Truth({"m": {"positions_px": np.array([[10.0, 20.0]]), "rotations": np.eye(3)[None],
                              "df1": 1.0, "df2": 1.0, "angast": 0.0, "drift_px": drift}}, Path("x"), Path("g"), [])
    images = {4: {"movie": "/data/m.tif", "shifts_path": str(path)}, 5: {"movie": None, "shifts_path": None}}
    out = demo.true_positions(truth, images, tmp_path)
    assert list(out) == [4]
    assert np.allclose(out[4]["xy"], (np.array([[10.0, 20.0]]) + drift[2] + 0.1) * demo.MOVIE_PIXEL)


@pytest.mark.slow
def test_pipeline_map_against_the_true_parameter_chain(tmp_path):
    """``demo --compare``: the pipeline from simulated movies against the chain from the true positions, CTF and
    orientations (the same aligned images), both against the true map (about 3 min on 2 cores).

    Issue 14's acceptance asks for the pipeline's FSC against the truth within 0.05 of the other chain's in
    every shell.  NOT MET YET: measured (seed 2026, 2 global + 6 local auto-refine rounds, both maps aligned
    to the truth to a fraction of a voxel) the pipeline's curve lies up to 0.22 below (FSC 0.5 at 7.9 Å against
    6.9 Å; median angular error 3.7°, 12° after ab-initio); without the global rounds and the sub-voxel
    alignment it was 0.39 below (9.0 Å, 4.3°).  This test holds what is reached, so that a regression shows,
    and prints both curves.
    """
    root = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "cistem_mpi", "demo", "--directory", str(root), "--ranks", "3",
                        "--compare"], capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    summary = json.loads((root / "demo_summary.json").read_text())
    pipe, true = summary["results"]["pipeline"], summary["results"]["true parameters"]
    print(r.stdout[r.stdout.index("== result"):])
    assert true["map"]["resolution_0.5"] < 7.5  # the true-parameter chain: 6.9 Å (Nyquist 6 Å)
    assert pipe["median_angular_error"] < 4.2  # 4.3° without the global rounds
    assert pipe["matched"] >= 0.8 * pipe["particles"]  # the picks are the particles
    assert pipe["map"]["resolution_0.5"] <= true["map"]["resolution_0.5"] * 1.35
    assert summary["comparison"]["max_deficit"] <= 0.28, summary["comparison"]  # issue 14 asks for 0.05
