"""Every query function of db/packages.py, db/assets.py and the new db/jobs.py ones runs against the schema.

A misspelt table or column fails here, in a second, not after a job's compute.
"""

from __future__ import annotations

import sqlite3

import pytest

from cistem_mpi.db import assets, jobs, packages, schema


@pytest.fixture
def conn():
    c = sqlite3.connect(":memory:")
    c.row_factory = sqlite3.Row
    schema.migrate(c)
    c.execute("INSERT INTO jobs(id, type, status, queued_at, scratch_path, error) "
              "VALUES (1, 'import_images', 'finished', 0, 'Scratch/job_1', NULL)")
    c.execute("INSERT INTO jobs(id, type, status, queued_at, error) VALUES (2, 'refine', 'failed', 0, "
              "'process died without finishing (killed?)')")
    c.execute("INSERT INTO images(id, path, name, nx, ny, pixel_size, voltage, cs, amplitude_contrast, job_id) "
              "VALUES (1, 'a.mrc', 'mic_a', 64, 64, 1.0, 300, 2.7, 0.07, 1), "
              "(2, 'b.mrc', 'mic_b', 64, 64, 1.0, 300, 2.7, 0.07, 1)")
    c.execute("INSERT INTO ctf_estimates(id, image_id, df1, df2, angast, pshift, job_id) VALUES "
              "(1, 1, 10000, 9000, 10, 0, 1), (2, 1, 15000, 14000, 20, 0.5, 1)")
    c.execute("INSERT INTO particle_positions(id, image_id, x, y, job_id) VALUES "
              "(1, 2, 10, 20, 1), (2, 1, 30, 40, 1), (3, 1, 50, 60, 2)")
    c.execute("INSERT INTO particle_stacks(id, path, name, n_particles, box, pixel_size, voltage, cs, "
              "amplitude_contrast, job_id) VALUES (1, 's.mrcs', 's', 3, 32, 1.0, 300, 2.7, 0.07, 1)")
    c.execute("INSERT INTO refinement_packages(id, name, stack_id, n_classes, symmetry, n_particles, job_id) "
              "VALUES (1, 'p', 1, 2, 'C1', 3, 1)")
    c.execute("INSERT INTO refinements(id, package_id, kind, round, n_classes, job_id) VALUES (1, 1, 'start', 0, 2, 1)")
    c.execute("INSERT INTO refinement_classes(refinement_id, class_number, params_path) VALUES "
              "(1, 2, 'b.h5'), (1, 1, 'a.h5')")
    return c


def test_package_queries(conn):
    assert packages.stack_by_id(conn, 1)["path"] == "s.mrcs" and packages.stack_by_id(conn, 9) is None
    assert packages.package_by_id(conn, 1)["stack_id"] == 1
    assert packages.refinement_by_id(conn, 1)["kind"] == "start"
    assert packages.newest_refinement_id(conn) == 1
    assert [r["class_number"] for r in packages.refinement_class_rows(conn, 1)] == [1, 2]
    assert packages.next_package_number(conn) == 2


def test_asset_queries(conn):
    assert assets.registered_paths(conn, "images") == [(1, "a.mrc"), (2, "b.mrc")]
    with pytest.raises(ValueError):
        assets.registered_paths(conn, "jobs; DROP TABLE jobs")
    assert sorted(assets.image_rows(conn)) == [1, 2]
    assert assets.newest_ctf_estimate(conn, 1) == (15000.0, 14000.0, 20.0, 0.5)
    assert assets.newest_ctf_estimate(conn, 2) is None
    # ordered by image, then position id; filtered by job and by image id or name
    assert assets.positions_to_extract(conn) == [(2, 1, 30.0, 40.0), (3, 1, 50.0, 60.0), (1, 2, 10.0, 20.0)]
    assert [r[0] for r in assets.positions_to_extract(conn, jobs=[1])] == [2, 1]
    assert [r[0] for r in assets.positions_to_extract(conn, images=["mic_b"])] == [1]
    assert [r[0] for r in assets.positions_to_extract(conn, jobs=[2], images=["1", "mic_b"])] == [3]


def test_job_queries_of_clean(conn):
    assert jobs.died_job_ids(conn) == {2}
    assert jobs.ended_job_scratch(conn) == [(1, "Scratch/job_1"), (2, None)]
