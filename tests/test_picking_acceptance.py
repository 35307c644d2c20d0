"""Picking acceptance on realistic simulated micrographs of a >= 300 kDa complex (truth known).

The specimen: the simulator's default complex (8 copies of PDB 8ZPM on a ring,
~356 kDa, radius ~98 Å) in 250 Å of vitreous ice at 1.5-2 µm underfocus,
50 e/Å^2 on a counting detector, 2 Å/pixel, with a carbon edge and a
contamination ball.  A pick is right when within 0.2 particle diameters of a
true centre.

Measured side by side with cisTEM's ``find_particles`` (built from its public
source, same micrographs, true CTF, typical radius 72.5 Å, maximum radius
100 Å, highest resolution 10 Å, edge 64 px, same matching rule): template-free
at 3 sigma ours P 0.98 / R 0.91, cisTEM P 0.97 / R 0.80; at 4 sigma ours
P 0.99 / R 0.88, cisTEM P 1.00 / R 0.75.
"""

from __future__ import annotations

import numpy as np
import pytest

from cistem_mpi.drivers.find_particles import view_directions
from cistem_mpi.drivers.simulate import assembly_map, simulate_micrographs
from cistem_mpi.io.mrc import read_mrc
from cistem_mpi.kernels.picking import PickingParams, find_particles
from cistem_mpi.kernels.projection import project

PS, N, EDGE = 2.0, 1024, 64


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_micrographs(tmp_path_factory.mktemp("acc"), n_micrographs=2, shape=(N, N),
                                n_per_micrograph=60, pixel_size=PS, exposure=50.0, seed=11, physics="realistic",
                                defocus_mean=17500, defocus_spread=2500, astigmatism=200, contamination=1,
                                carbon_fraction=0.1, ice_thickness=250)


def _pick(sim, i, references=None, threshold=5.0):
    img, _ = read_mrc(sim.micrographs[i])
    df1, df2, ang, _ = sim.ctf[i]
    # characteristic radius as cisTEM's: the disc's cosine edge (5 px) is centred on it
    p = PickingParams(highest_resolution=10.0, characteristic_radius=72.5, maximum_radius=100.0, edge=EDGE,
                      threshold=threshold)
    return find_particles(img, PS, 300.0, 2.7, 0.07, df1, df2, ang, params=p, references=references,
                          reference_pixel_size=2 * PS)


def _metrics(sim, results, threshold: float = 0.0) -> tuple[float, float]:
    tp = n_picks = found = n_true = 0
    for i, r in enumerate(results):
        rad = sim.truths[i]["radius_angstrom"][0]
        pos = sim.positions[i] * PS
        keep = r.score >= threshold
        picks = np.stack([r.x[keep], r.y[keep]], 1)
        # particles whose centre lies where the picker may pick (inside the edge)
        inside = np.all((pos > EDGE * PS + rad) & (pos < N * PS - EDGE * PS - rad), axis=1)
        d = np.sqrt(((picks[:, None] - pos[None]) ** 2).sum(-1)) if len(picks) else np.full((1, len(pos)), 1e9)
        tp += int((d.min(1) < 0.4 * rad).sum()) if len(picks) else 0
        n_picks += len(picks)
        found += int(((d.min(0) < 0.4 * rad) & inside).sum())
        n_true += int(inside.sum())
    return tp / max(n_picks, 1), found / n_true


@pytest.fixture(scope="module")
def results(sim):
    refs = project(assembly_map(8, 2 * PS), view_directions(10), method="cubic")
    free = [_pick(sim, i, None, 3.0) for i in range(2)]
    ref = [_pick(sim, i, refs, 3.0) for i in range(2)]
    return free, ref


@pytest.mark.slow
def test_reference_based_recall_and_precision_at_least_90_percent(sim, results):
    # measured at 5 sigma: P 0.94 R 0.94
    precision, recall = _metrics(sim, results[1], 5.0)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)


@pytest.mark.slow
def test_template_free_reaches_90_percent_at_3_sigma_and_is_precise_at_4(sim, results):
    # measured: 3 sigma P 0.98 R 0.91; 4 sigma P 0.99 R 0.88 (cisTEM's find_particles: 0.97/0.80, 1.00/0.75)
    p3, r3 = _metrics(sim, results[0], 3.0)
    assert p3 >= 0.9 and r3 >= 0.9, (p3, r3)
    p4, r4 = _metrics(sim, results[0], 4.0)
    assert p4 >= 0.95 and r4 >= 0.85, (p4, r4)


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / max(precision + recall, 1e-12)


def _median_centre_error(sim, results) -> float:
    """Median distance (Å) of the right picks (within 0.2 diameters) from their true centres."""
    out = []
    for i, r in enumerate(results):
        pos = sim.positions[i] * PS
        d = np.sqrt(((np.stack([r.x, r.y], 1)[:, None] - pos[None]) ** 2).sum(-1)).min(1)
        out.append(d[d < 0.4 * sim.truths[i]["radius_angstrom"][0]])
    return float(np.median(np.concatenate(out)))


@pytest.mark.slow
def test_reference_based_does_at_least_as_well_as_template_free(sim, results):
    # each picker at its best threshold (3-8 sigma): F1 = harmonic mean of precision and recall.
    # measured: template-free best at 3 sigma F1 0.942 (P 0.98 R 0.91); reference-based (true
    # projections, 10 views x 36 rotations) best at 6 sigma F1 0.948 (P 0.96 R 0.94).
    thresholds = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
    free = max(_f1(*_metrics(sim, results[0], t)) for t in thresholds)
    ref = max(_f1(*_metrics(sim, results[1], t)) for t in thresholds)
    assert ref >= free, (ref, free)
    # and its picks are better centred (measured: median 2.6 Å against 10.7 Å from the true centres)
    assert _median_centre_error(sim, results[1]) <= _median_centre_error(sim, results[0])


@pytest.mark.slow
def test_no_picks_in_contamination_carbon_or_within_the_edge(sim, results):
    for group in results:
        for i, r in enumerate(group):
            tr = sim.truths[i]
            bad = tr["contamination_mask"] | tr["carbon_mask"]
            assert bad.any()
            for x, y in zip(r.x / PS, r.y / PS):
                assert not bad[int(round(y)), int(round(x))]
                assert EDGE <= x <= N - 1 - EDGE and EDGE <= y <= N - 1 - EDGE
            # the rejected area covers the contamination ball
            from scipy.ndimage import zoom

            rej = zoom(r.rejected.astype(float), N / r.rejected.shape[0], order=0) > 0.5
            assert rej[tr["contamination_mask"]].mean() > 0.9
