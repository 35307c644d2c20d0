"""Kernels of ab initio 3D: cisTEM's schedule, orientations, selection, filters, symmetry axes, hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cistem_mpi.kernels import ab_initio as ai
from cistem_mpi.kernels import alignment as al
from cistem_mpi.kernels.euler import rotation_matrix
from cistem_mpi.kernels.projection import prepare_volume_ft
from cistem_mpi.kernels.symmetry import symmetry_matrices


# ------------------------------------------------------------------ the schedule, against cisTEM's code
def _cistem_schedule(n_rounds: int, start_res: float, end_res: float):
    """AbInitioManager::CycleRefinement transcribed as plain loops (the reference)."""
    def myroundint(a):
        return int(a + 0.5) if a > 0 else int(a - 0.5)

    current, nxt = [start_res], [start_res + (end_res - start_res) * (1 / (n_rounds - 1))]
    for run in range(1, n_rounds):
        cur = start_res + (end_res - start_res) * (float(run) / float(n_rounds - 1))
        if run % myroundint(n_rounds / 10.0) <= 1 and run <= n_rounds * 0.65:
            cur = start_res
        current.append(cur)
        nxt.append(max(start_res + (end_res - start_res) * (float(run + 1) / float(n_rounds - 1)), 0.0))
    return current, nxt


@pytest.mark.parametrize("n_rounds", [15, 20, 40, 53])
def test_resolution_ramp_and_resets_match_cistem(n_rounds):
    current, nxt = _cistem_schedule(n_rounds, 20.0, 8.0)
    ours = [ai.high_resolution_limit(r, n_rounds, 20.0, 8.0) for r in range(n_rounds)]
    rec = [ai.reconstruction_resolution_limit(r, n_rounds, 20.0, 8.0) for r in range(n_rounds)]
    assert np.allclose(ours, current)
    assert np.allclose(rec, nxt)


def test_default_schedule_numbers():
    """cisTEM defaults (40 rounds, 20 -> 8 Å): resets at rounds 4k and 4k+1 up to round 26."""
    res = [ai.high_resolution_limit(r, 40) for r in range(40)]
    resets = [r for r in range(1, 40) if res[r] == 20.0]
    assert resets == [1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25]
    assert res[-1] == 8.0 and abs(res[27] - (20 - 12 * 27 / 39)) < 1e-9
    # short runs: round(R/10) = 1, every round up to 65 % stays at the start resolution
    assert [ai.high_resolution_limit(r, 10) for r in range(7)] == [20.0] * 7
    assert ai.symmetry_round(40) == 30 and ai.symmetry_round(10) == 8


def test_angular_step_is_calculate_angular_step():
    for res in (20.0, 14.5, 8.0):
        assert ai.angular_step(res) == pytest.approx(2.0 * res / 75.0 * 180.0 / math.pi, rel=1e-12)
    assert ai.angular_step(8.0, 100.0) == pytest.approx(math.degrees(0.16))


def test_percentages_and_fractions_match_cistem():
    # 2500 K / N and 10000 K / N asymmetric units, clipped at 100 %
    assert ai.percent_used_range(50_000, 1) == (5.0, 20.0)
    assert ai.percent_used_range(50_000, 2) == (10.0, 40.0)
    assert ai.percent_used_range(50_000, 1, "C4") == (1.25, 5.0)
    assert ai.percent_used_range(50_000, 1, "O") == pytest.approx((2500 / 50000 / 24 * 100, 10000 / 50000 / 24 * 100))
    assert ai.percent_used_range(2_000, 1) == (100.0, 100.0)
    assert ai.percent_used(20, 41, 5.0, 20.0) == pytest.approx(12.5)
    # 5x the percentage is searched; the best 20 % of those reconstructed until 5x reaches 100 %
    assert ai.search_fraction(5.0) == 0.25 and ai.score_fraction(5.0) == 0.2
    assert ai.search_fraction(20.0) == 1.0 and ai.score_fraction(20.0) == 1.0
    assert ai.search_fraction(19.9) == pytest.approx(0.995) and ai.score_fraction(19.9) == 0.2


def test_wiener_nominator_falls_as_in_cistem():
    assert ai.wiener_nominator(0, 40, 0) == 500.0
    ref = [max(200 + (10 - 200) * (r / 40), 10.0) for r in range(1, 40)]
    assert [ai.wiener_nominator(r, 40, 0) for r in range(1, 40)] == pytest.approx(ref)
    assert all(ai.wiener_nominator(r, 40, 1) == 10.0 for r in range(40))


# ------------------------------------------------------------------ orientations and selection
def test_random_orientations_are_uniform_on_the_sphere():
    phi, theta, psi = ai.random_orientations(20_000, np.random.default_rng(3))
    z = np.cos(np.radians(theta))  # uniform on the sphere <=> cos(theta) uniform in [-1, 1]
    hist, _ = np.histogram(z, bins=10, range=(-1, 1))
    assert np.all(np.abs(hist / 2000.0 - 1.0) < 0.08)
    for a in (phi, psi):
        h, _ = np.histogram(a, bins=12, range=(0, 360))
        assert np.all(np.abs(h / (20_000 / 12) - 1.0) < 0.1)


def test_best_fraction_matches_sorting():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=200)
    groups = rng.integers(0, 3, 200)
    got = ai.best_fraction(scores, 0.2, groups)
    for g in range(3):
        idx = np.nonzero(groups == g)[0]
        k = max(1, int(round(0.2 * len(idx))))
        want = set(idx[np.argsort(-scores[idx])[:k]].tolist())
        assert set(np.nonzero(got & (groups == g))[0].tolist()) == want


def test_wiener_refilter_matches_a_shell_loop():
    rng = np.random.default_rng(2)
    n = 12
    v = rng.normal(size=(n, n, n)).astype(np.float32)
    fsc = np.linspace(0.99, 0.01, n // 2 + 1)
    got = ai.wiener_refilter(v, fsc, 50.0)
    f = np.fft.rfftn(v)
    ssnr = 2 * np.maximum(2 * fsc / (1 - fsc), 0)
    fac = (ssnr + 1) / (ssnr + 50.0)
    fac /= fac.max()
    for kz in range(n):
        for ky in range(n):
            for kx in range(n // 2 + 1):
                r = math.sqrt(min(kz, n - kz) ** 2 + min(ky, n - ky) ** 2 + kx ** 2)
                s = int(np.rint(r))
                f[kz, ky, kx] *= fac[min(s, n // 2)] if s <= n // 2 else fac[-1]
    assert np.allclose(got, np.fft.irfftn(f, s=v.shape, axes=(0, 1, 2)), atol=1e-5)


def test_auto_mask_keeps_the_blob_and_drops_specks():
    n = 24
    v = np.zeros((n, n, n), np.float32)
    v[9:15, 9:15, 8:16] = 1.0
    v[2, 2, 20] = 3.0  # isolated strong speck outside the molecule
    m = ai.auto_mask(v, 11.0)
    assert m[12, 12, 12] == pytest.approx(1.0)
    assert m[2, 2, 20] < 0.05  # outside the sphere / not the largest blob


# ------------------------------------------------------------------ maps: rotation, symmetry, hand
def _blobs(n: int, points: np.ndarray, width: float = 1.5) -> np.ndarray:
    g = np.arange(n) - n // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    v = np.zeros((n, n, n))
    for px, py, pz in points:
        v += np.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * width ** 2))
    return v.astype(np.float32)


def _chiral_points() -> np.ndarray:
    """A right-handed helix of blobs (chiral) plus an off-axis marker (no symmetry)."""
    t = np.linspace(0, 3 * np.pi, 9)
    helix = np.stack([6 * np.cos(t), 6 * np.sin(t), 1.2 * t - 5.5], axis=1)
    return np.vstack([helix, [[-4.0, 2.0, 7.0]]])


def test_rotate_volume_moves_points_as_the_rotation_says():
    pts = _chiral_points()
    r = rotation_matrix(30.0, 50.0, 70.0).reshape(3, 3)
    got = ai.rotate_volume(_blobs(32, pts), r, order=3)
    want = _blobs(32, (r @ pts.T).T)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("symbol", ["C4", pytest.param("D2", marks=pytest.mark.slow)])
def test_symmetry_axes_are_found_in_a_turned_map(symbol):
    """A map with the group's symmetry, turned away from the standard axes, is turned back."""
    ops = symmetry_matrices(symbol)
    motif = np.array([[6, 2, 3], [4, -1, 5], [7, 3, -1]], dtype=float)
    pts = np.concatenate([(s @ motif.T).T for s in ops])
    sym_map = _blobs(32, pts)
    turn = rotation_matrix(37.0, 52.0, 11.0).reshape(3, 3)
    turned = ai.rotate_volume(sym_map, turn, order=3)
    assert ai.symmetry_score(turned, symbol, np.eye(3)) < 0.6
    rot, score = ai.align_symmetry_axes(turned, symbol)
    assert score > 0.95
    back = ai.rotate_volume(turned, rot, order=3)
    # the group's axes line up: the map is (nearly) invariant under every operator
    assert ai.symmetry_score(back, symbol, np.eye(3)) > 0.95


def test_mirror_is_the_other_hand():
    v = _blobs(32, _chiral_points())
    m = ai.mirror(v)
    assert np.allclose(ai.mirror(m), v)
    assert ai.centre_of_mass(m) == pytest.approx(-ai.centre_of_mass(v), abs=1e-6)


def test_alignment_to_a_reference_tries_both_hands():
    v = _blobs(32, _chiral_points(), width=1.5)
    r = rotation_matrix(100.0, 60.0, 200.0).reshape(3, 3)
    turned = ai.shift_volume(ai.rotate_volume(v, r, order=3), np.array([2.0, -1.0, 1.0]))
    same = ai.align_to_reference(turned, v)
    assert not same["mirrored"] and same["cc"] > 0.97
    # the returned map is the volume moved onto the reference (shift included), not only its score
    assert np.corrcoef(same["aligned"].ravel(), v.ravel())[0, 1] > 0.97
    assert set(same["cc_by_hand"]) == {False, True}
    assert same["cc_by_hand"][True] < same["cc"] - 0.15
    flipped = ai.align_to_reference(ai.mirror(turned), v)
    assert flipped["mirrored"] and flipped["cc"] > 0.97
    # a chiral map: no rotation of the wrong hand fits
    assert flipped["cc_by_hand"][False] < flipped["cc"] - 0.15


def test_alignment_to_a_reference_undoes_a_pure_shift():
    v = _blobs(32, _chiral_points(), width=1.5)
    moved = ai.shift_volume(v, np.array([3.0, -2.0, 1.0]))
    fit = ai.align_to_reference(moved, v, hands=(False,))
    np.testing.assert_allclose(fit["shift"], [-3.0, 2.0, -1.0], atol=0.6)
    assert np.corrcoef(fit["aligned"].ravel(), v.ravel())[0, 1] > 0.98


# ------------------------------------------------------------------ the search
def test_coarse_to_fine_search_finds_the_full_search_orientation():
    """Noise-free projections: the two-pass search lands on the exhaustive search's orientation."""
    n, ps = 32, 3.0
    vol = _blobs(n, _chiral_points() * 1.5, width=2.0)
    vft = prepare_volume_ft(vol)
    band = al.make_band(n, ps, 8.0)
    step = ai.angular_step(8.0)
    grid = al.orientation_grid(step)
    proj = ai.grid_projections(vft, grid, band)
    coarse = ai.coarse_grid(vft, grid, step, band, ps, 8.0, min_orientations=0)
    ctf = np.ones((band.m, band.m // 2 + 1), np.float32)
    rng = np.random.default_rng(5)
    for j in rng.choice(len(grid), 5, replace=False):
        x = proj[j]
        full = ai.search_grid(x, ctf, proj, band, 3.0)
        fast = ai.search_grid(x, ctf, proj, band, 3.0, coarse=coarse)
        assert full[0] == j and fast[0] == j
        assert abs(fast[1]) < 0.05 and abs(fast[2]) < 0.05 and fast[3] > 0.999


def test_random_pick_takes_an_orientation_within_the_top_of_the_score_range():
    """cisTEM's ab initio pick: a random orientation among those within 15 % of the score range of the best,
    against scoring every orientation one at a time (plain loop)."""
    n, ps = 32, 3.0
    vol = _blobs(n, _chiral_points() * 1.5, width=2.0)
    band = al.make_band(n, ps, 12.0)
    grid = al.orientation_grid(25.0)
    proj = ai.grid_projections(prepare_volume_ft(vol), grid, band)
    ctf = np.ones((band.m, band.m // 2 + 1), np.float32)
    rng = np.random.default_rng(3)
    x = proj[7] + (rng.normal(size=proj[7].shape) + 1j * rng.normal(size=proj[7].shape)).astype(np.complex64) * 0.3 \
        * np.abs(proj[7]).mean()
    scores = np.array([al.shift_search(x, proj[i:i + 1] * ctf, band, 3.0)[0][0] for i in range(len(grid))])
    allowed = set(np.nonzero(scores >= scores.max() - 0.15 * (scores.max() - scores.min()))[0].tolist())
    assert 1 < len(allowed) < len(grid) // 2
    picked = [ai.search_grid(x, ctf, proj, band, 3.0, pick=u)[0] for u in np.linspace(0.0, 0.999, 40)]
    assert set(picked) == allowed  # every allowed orientation can be taken, no other
    assert ai.search_grid(x, ctf, proj, band, 3.0, pick=0.0)[0] == int(np.argmax(scores))
    assert ai.search_grid(x, ctf, proj, band, 3.0, pick=0.0)[:3] == ai.search_grid(x, ctf, proj, band, 3.0)[:3]
    # a narrower range keeps fewer
    few = {ai.search_grid(x, ctf, proj, band, 3.0, pick=u, pick_range=0.02)[0] for u in np.linspace(0, 0.999, 40)}
    assert few < allowed or len(few) == 1


def test_wiener_nominator_damps_the_noisy_shells_of_the_full_map_only(tmp_path):
    """``ReconstructionSettings.wiener_nominator`` (cisTEM's CTF^2 + nominator/SSNR, per voxel): 1 is the plain
    filter; a large nominator leaves the half maps and the well-measured shells and damps the noisy ones."""
    from cistem_mpi.drivers.reconstruct import ReconstructionSettings, reconstruct_particles
    from cistem_mpi.drivers.runtime import get_world
    from cistem_mpi.drivers.simulate import simulate_particles
    from cistem_mpi.kernels.radial import shell_index

    sim = simulate_particles(tmp_path, n_particles=120, box=24, pixel_size=5.0, snr=0.2, seed=2)
    world = get_world()
    rec = {w: reconstruct_particles(world, str(sim.stack), sim.particles,
                                    ReconstructionSettings(bfactor=0.0, wiener_nominator=w)) for w in (1.0, 50.0)}
    plain = reconstruct_particles(world, str(sim.stack), sim.particles, ReconstructionSettings(bfactor=0.0))
    assert np.array_equal(rec[1.0].volume, plain.volume)
    assert np.array_equal(rec[50.0].half1, plain.half1) and np.array_equal(rec[50.0].fsc, plain.fsc)
    shells = shell_index((24, 24, 24))

    def power(v):
        f = np.abs(np.fft.rfftn(v)) ** 2
        inside = shells >= 0
        return np.bincount(shells[inside], f[inside], minlength=13)[:12]

    ratio = np.sqrt(power(rec[50.0].volume) / power(rec[1.0].volume))
    f = np.clip(plain.fsc_unmasked[:12], 1e-3, 0.999)
    # per voxel D / (W + nominator <W> (1 - FSC) / (2 FSC)): the full map is damped, the more the lower the
    # shell's FSC (where the FSC is meaningful: above 0.5; beyond, the real-space mask mixes shells)
    used = np.nonzero(f > 0.5)[0][1:]
    assert len(used) >= 4
    assert (ratio[used] < 0.5).all()
    order = used[np.argsort(-f[used])]
    assert (np.diff(ratio[order]) < 0).all(), np.c_[f[order], ratio[order]]


def test_random_pick_by_direction_counts_each_direction_once_with_its_best_in_plane_angle():
    """As cisTEM's list of best parameters: per projection direction the best in-plane angle, then the pick."""
    n, ps = 32, 3.0
    vol = _blobs(n, _chiral_points() * 1.5, width=2.0)
    band = al.make_band(n, ps, 12.0)
    grid = al.orientation_grid(25.0)
    dirs = ai.grid_directions(grid)
    assert dirs.max() + 1 == len({(round(a, 6), round(b, 6)) for a, b in grid[:, :2]})
    proj = ai.grid_projections(prepare_volume_ft(vol), grid, band)
    ctf = np.ones((band.m, band.m // 2 + 1), np.float32)
    rng = np.random.default_rng(4)
    x = proj[30] + (rng.normal(size=proj[30].shape) + 1j * rng.normal(size=proj[30].shape)).astype(np.complex64) \
        * 0.3 * np.abs(proj[30]).mean()
    scores = np.array([al.shift_search(x, proj[i:i + 1] * ctf, band, 3.0)[0][0] for i in range(len(grid))])
    best_of = {}
    for i, d in enumerate(dirs):  # plain loop: the best orientation of each direction
        if d not in best_of or scores[i] > scores[best_of[d]]:
            best_of[d] = i
    tops = np.array([scores[i] for i in best_of.values()])
    cut = tops.max() - 0.15 * (tops.max() - tops.min())
    allowed = {i for i in best_of.values() if scores[i] >= cut}
    picked = {ai.search_grid(x, ctf, proj, band, 3.0, pick=u, directions=dirs)[0] for u in np.linspace(0, 0.999, 60)}
    assert picked == allowed and len(allowed) >= 1


def test_polish_alignment_undoes_a_small_rotation_and_a_subvoxel_shift():
    """A map turned by 2° and moved by a fraction of a voxel (``rotate_volume`` and ``ndimage.shift``, the
    obvious way): the polish finds the same angle and brings the map back onto the original."""
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    from cistem_mpi.kernels.masks import sphere_mask

    z, y, x = np.mgrid[:32, :32, :32] - 16.0
    ref = sum(np.exp(-((x - a) ** 2 + (y - b) ** 2 + (z - c) ** 2) / w)
              for a, b, c, w in ((5, 0, 0, 10), (0, -6, 3, 6), (-3, 4, -5, 4), (2, 2, 6, 3))).astype(np.float32)
    turn = Rotation.from_rotvec(np.radians([1.2, -1.5, 0.6]))
    moved = ndimage.shift(ai.rotate_volume(ref, turn.as_matrix(), order=3), (0.35, -0.25, 0.4), order=3)
    before = ai._ncc(moved, ref)
    out, params = ai.polish_alignment(moved, ref, sphere_mask(32, 13, edge=3.0))
    assert 1 - ai._ncc(out, ref) < 1e-4 < 1 - before
    assert abs(np.linalg.norm(params[:3]) - np.degrees(turn.magnitude())) < 0.1  # the same angle back
