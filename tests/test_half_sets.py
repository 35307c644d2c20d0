"""Stored half-set splits: kept by packages, honoured by reconstruction and refinement.

Gold-standard FSC needs two half maps that never share a particle, and -
for particles cut from micrographs - never share a micrograph, so that
duplicate picks cannot correlate them (cisTEM's wizard splits such packages
by micrograph).  A split stored with a package's parameters (``half_set``
beside the Frealign columns in the HDF5 file) must therefore survive into
every later package and refinement round and decide the half maps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cistem_mpi.cli import main
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.reconstruct import ReconstructionSettings, reconstruct_particles
from cistem_mpi.drivers.volumejob import half_sets_of
from cistem_mpi.drivers.runtime import World
from cistem_mpi.drivers.simulate import simulate_particles
from cistem_mpi.errors import InputError
from cistem_mpi.io.par import write_par
from cistem_mpi.io.param_store import read_params_column, read_params_h5, write_params_h5
from cistem_mpi.io.params import Optics, ParticleSet, empty_params
from cistem_mpi.kernels.packages import split_by_micrograph
from cistem_mpi.kernels.reconstruction import half_lookup, half_sets

N, BOX, PIXEL = 300, 32, 4.0


def test_half_lookup_keeps_the_stored_split_and_hashes_the_rest():
    table = half_lookup(np.array([3, 7, 9]), np.array([2, 1, 1]))
    assert table[3] == 2 and table[7] == 1 and table[9] == 1
    others = np.array([0, 1, 2, 4, 5, 6, 8])
    assert np.array_equal(table[others], half_sets(others))
    assert half_lookup(np.array([1, 2]), None) is None


def test_split_by_micrograph_follows_cistems_rules():
    assert split_by_micrograph(np.repeat(np.arange(1, 30), 10)) is None  # < 500 particles: per particle
    many = np.repeat(np.arange(1, 41), 20)  # 800 particles on 40 micrographs: by image id parity
    h = split_by_micrograph(many)
    assert np.array_equal(h, np.where(many % 2 == 1, 1, 2))
    for img in np.unique(many):
        assert np.unique(h[many == img]).size == 1  # a micrograph is never split
    few = np.repeat(np.arange(1, 6), 200)  # 1000 particles on 5 micrographs: 10 alternating blocks
    h = split_by_micrograph(few)
    assert np.array_equal(h, np.where((np.arange(1000) // 100) % 2 == 1, 1, 2))


def test_reconstruction_uses_a_stored_split_in_stack_order():
    params = empty_params(4)
    params["position"] = [4, 2, 3, 1]
    params["film"] = [1, 1, -1, 1]  # the third is excluded
    params["occ"] = 100
    ps = ParticleSet(params=params, optics=[Optics(1.0, 300, 2.7, 0.07)], extra={"half_set": np.array([1, 2, 2, 1])})
    keep = params["film"] >= 0
    order = np.argsort(params["position"][keep], kind="stable")
    assert half_sets_of(ps, keep, order, "x").tolist() == [1, 2, 1]  # positions 1, 2, 4
    ps.extra["half_set"] = np.array([1, 1, 2, 1])  # only half 1 among the kept particles
    with pytest.raises(InputError, match="both halves"):
        half_sets_of(ps, keep, order, "x")
    assert np.array_equal(half_sets_of(ParticleSet(params=params, optics=ps.optics), keep, order, "x"),
                          half_sets(np.array([1, 2, 4])))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    base = tmp_path_factory.mktemp("halves")
    sim = simulate_particles(base / "sim", n_particles=N, box=BOX, pixel_size=PIXEL, snr=2.0, seed=4)
    write_par(base / "p.par", sim.particles.params)
    root = base / "proj"
    assert main(["project", "create", str(root)]) == 0
    assert main(["import", "particles", str(sim.stack), "--params", str(base / "p.par"), "--pixel-size",
                 str(PIXEL), "-p", str(root)]) == 0
    return {"root": root, "sim": sim}


def test_a_stored_split_survives_package_reconstruct_and_refine(imported, tmp_path):
    root = tmp_path / "proj"
    shutil.copytree(imported["root"], root)
    with Project.open(root) as p:
        path = p.resolve(p.conn.execute("SELECT params_path FROM refinement_classes").fetchone()[0])
        stack = p.resolve(p.conn.execute("SELECT path FROM particle_stacks").fetchone()[0])
    params = read_params_h5(path)
    # a split no hash would make: first 120 stack positions in half 1, the rest in half 2
    custom = np.where(params["position"] <= 120, 1, 2).astype(np.int8)
    write_params_h5(path, params, {"pixel_size": PIXEL}, {"half_set": custom})
    # a package made from that refinement carries each particle's half with it
    assert main(["package", "create", "-p", str(root), "--from-refinement", "1"]) == 0
    with Project.open(root, readonly=True) as p:
        new_file = p.resolve(p.conn.execute("SELECT params_path FROM refinement_classes ORDER BY refinement_id "
                                            "DESC LIMIT 1").fetchone()[0])
        members = np.array(p.conn.execute("SELECT position, parent_position FROM refinement_package_members "
                                          "WHERE package_id = 2 ORDER BY position").fetchall())
    got = read_params_column(new_file, "half_set")
    assert np.array_equal(got, np.where(members[:, 1] <= 120, 1, 2))
    # reconstruct of that package uses the carried split: same FSC as with the split given directly
    assert main(["reconstruct", "-p", str(root)]) == 0
    with Project.open(root, readonly=True) as p:
        fsc_job = json.loads(p.conn.execute("SELECT fsc FROM volumes ORDER BY id DESC LIMIT 1").fetchone()[0])["fsc"]
        new_stack = p.resolve(p.conn.execute("SELECT path FROM particle_stacks ORDER BY id DESC LIMIT 1").fetchone()[0])
    new_params = read_params_h5(new_file)
    optics = [Optics(PIXEL, 300.0, 2.7, 0.07)]
    direct = reconstruct_particles(World(None), str(new_stack),
                                   ParticleSet(params=new_params, optics=optics, extra={"half_set": got}),
                                   ReconstructionSettings())
    hashed = reconstruct_particles(World(None), str(new_stack), ParticleSet(params=new_params, optics=optics),
                                   ReconstructionSettings())
    assert np.allclose(fsc_job, direct.fsc, atol=1e-5)  # stored rounded to 5 decimals
    assert not np.allclose(direct.fsc, hashed.fsc, atol=1e-6)
    # a refinement round writes the same split again
    assert main(["manual-refine", "-p", str(root), "--high-resolution", "12"]) == 0
    with Project.open(root, readonly=True) as p:
        last = p.resolve(p.conn.execute("SELECT params_path FROM refinement_classes ORDER BY refinement_id DESC "
                                        "LIMIT 1").fetchone()[0])
    assert np.array_equal(read_params_column(last, "half_set"), got)
