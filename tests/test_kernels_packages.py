"""Refinement package planning on arrays (cistem_mpi.kernels.packages), against slow references."""

from __future__ import annotations

import numpy as np
import pytest

from cistem_mpi.errors import InputError
from cistem_mpi.kernels.packages import best_class, plan_from_template, share_occupancies, split_by_micrograph


def _params(occ):
    p = np.zeros(len(occ), dtype=[("position", "i8"), ("occ", "f4"), ("psi", "f4")])
    p["position"] = np.arange(1, len(occ) + 1)
    p["occ"] = occ
    return p


def test_best_class_against_loop():
    # cisTEM's loop: keep the first class, move on only for a strictly higher occupancy
    rng = np.random.default_rng(0)
    occ = rng.integers(0, 4, (4, 300)).astype(np.float32) * 25
    ref = []
    for j in range(occ.shape[1]):
        b = 0
        for k in range(1, occ.shape[0]):
            if occ[k, j] > occ[b, j]:
                b = k
        ref.append(b)
    assert best_class(occ).tolist() == ref


def test_share_occupancies_against_loop():
    rng = np.random.default_rng(1)
    member = rng.random((3, 50)) < 0.5
    member[0, member.sum(0) == 0] = True
    got = share_occupancies(list(member), 3)
    for j in range(50):
        m = sum(member[k, j] for k in range(3))
        for k in range(3):
            assert got[k, j] == pytest.approx(100.0 / m if member[k, j] else 0.0)
    with pytest.raises(ValueError):
        share_occupancies([np.array([True, False])], 1)


def test_split_by_micrograph_against_rules():
    film = np.repeat(np.arange(1, 31), 20)  # 600 particles on 30 micrographs: parity of the id
    assert split_by_micrograph(film).tolist() == [1 if f % 2 else 2 for f in film]
    few = np.repeat(np.arange(1, 6), 120)  # 5 micrographs: 10 alternating blocks of 60
    assert split_by_micrograph(few).tolist() == [1 if (i // 60) % 2 else 2 for i in range(600)]
    assert split_by_micrograph(film, min_particles=1000) is None
    assert split_by_micrograph(few, min_micrographs=5).tolist() == [1 if f % 2 else 2 for f in few]


def test_plan_from_template_merge_and_split_against_loop():
    rng = np.random.default_rng(2)
    n = 40
    occ = rng.random((3, n)) * 100
    old = [_params(occ[k]) for k in range(3)]
    for k in range(3):
        old[k]["psi"] = 10 * (k + 1)  # which old class a row came from
    # old 1 and 2 merge into new 1; old 3 is split over new 1 and 2
    plan = plan_from_template([1, 2, 3], old, 2, None, {1: [1], 2: [1], 3: [1, 2]})
    best = [1 + int(np.argmax(occ[:, j])) for j in range(n)]
    assert plan.take.tolist() == list(range(n)) and plan.old_class.tolist() == best
    for j in range(n):
        b = best[j]
        if b == 3:  # shares 50/50, keeps its class-3 row in both
            assert [plan.params[k]["occ"][j] for k in (0, 1)] == [50.0, 50.0]
            assert plan.params[0]["psi"][j] == 30 and plan.params[1]["psi"][j] == 30
        else:  # 100 in new 1; in new 2 (only old 3 maps there) the class-3 row
            assert plan.params[0]["occ"][j] == 100.0 and plan.params[1]["occ"][j] == 0.0
            assert plan.params[0]["psi"][j] == 10 * b and plan.params[1]["psi"][j] == 30
    with pytest.raises(InputError, match="not a class"):
        plan_from_template([1, 2, 3], old, 2, [4], None)
    with pytest.raises(InputError, match="gets no old class"):
        plan_from_template([1, 2, 3], old, 3, None, {1: [1], 2: [1], 3: [2]})
