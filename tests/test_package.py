"""``cistem-mpi package create``: templates (keep / drop / merge / split classes), stacks, 2D selections.

Ground truth: a simulated two-conformation stack imported with two .par files
whose occupancies put a known subset (true conformation 0) at its maximum in
class 1; every expectation below is recomputed here particle by particle from
those files and the source stack, independently of the driver's vectorised
bookkeeping.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cistem_mpi.cli import main
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.jobrun import run_job
from cistem_mpi.drivers.package import parse_mapping
from cistem_mpi.drivers.simulate import simulate_conformations
from cistem_mpi.errors import InputError
from cistem_mpi.io.par import read_par, write_par
from cistem_mpi.io.param_store import read_params_h5, write_params_h5
from cistem_mpi.kernels.packages import best_class, default_mapping
from helpers_jobs import job_args

N = 240
BOX = 40
PIXEL = 3.5


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> dict:
    """A project with one imported 2-class package; the truth about it."""
    base = tmp_path_factory.mktemp("pkg")
    sim = simulate_conformations(base / "sim", n_particles=N, box=BOX, pixel_size=PIXEL, snr=1.0, seed=11,
                                 fraction_first=0.55)
    truth = sim.classes  # 0 = full structure, 1 = changed one
    assert 0 < truth.sum() < N
    rng = np.random.default_rng(5)
    p1 = read_par(sim.par)
    p2 = p1.copy()
    # occupancies: conformation 0 highest in class 1, conformation 1 highest in class 2
    hi = rng.uniform(55, 95, N).astype(np.float32)
    p1["occ"] = np.where(truth == 0, hi, 100 - hi)
    p2["occ"] = 100 - p1["occ"]
    # the two classes differ in alignment too, so we can tell whose row a particle got
    p2["psi"] = p1["psi"] + 7.0
    p2["shx"] = p1["shx"] - 1.5
    p2["logp"] = p1["logp"] - 1000
    p1["score"], p2["score"] = 10.0, 20.0
    # shuffle the row order of class 2's file: classes are matched by stack position, not row
    order = rng.permutation(N)
    write_par(base / "class1.par", p1)
    write_par(base / "class2.par", p2[order])
    root = base / "proj"
    assert main(["project", "create", str(root)]) == 0
    assert main(["import", "particles", str(sim.stack), "--params", str(base / "class1.par"),
                 "--params", str(base / "class2.par"), "--pixel-size", str(PIXEL), "-p", str(root)]) == 0
    p1, p2 = read_par(base / "class1.par"), read_par(base / "class2.par")
    p2 = p2[np.argsort(p2["position"])]
    with Project.open(root, readonly=True) as p:
        run = p.conn.execute("SELECT max(id) FROM refinements").fetchone()[0]
        pkg = p.conn.execute("SELECT * FROM refinement_packages").fetchone()
    return {"root": root, "stack": sim.stack, "truth": truth, "old": [p1, p2], "run": int(run),
            "package": int(pkg["id"]), "stack_id": int(pkg["stack_id"]), "base": base}


@pytest.fixture
def project(template, tmp_path) -> Path:
    """A private copy of the template project (tests create packages in it)."""
    dst = tmp_path / "proj"
    shutil.copytree(template["root"], dst)
    return dst


def _create(project: Path, *args) -> int:
    return main(["package", "create", "-p", str(project), *map(str, args)])


def _newest(project: Path) -> dict:
    """The newest package, its stack, start refinement, class parameters and members."""
    with Project.open(project, readonly=True) as p:
        c = p.conn
        pkg = dict(c.execute("SELECT * FROM refinement_packages ORDER BY id DESC LIMIT 1").fetchone())
        stack = dict(c.execute("SELECT * FROM particle_stacks WHERE id = ?", (pkg["stack_id"],)).fetchone())
        ref = dict(c.execute("SELECT * FROM refinements WHERE package_id = ?", (pkg["id"],)).fetchone())
        classes = [dict(r) for r in c.execute(
            "SELECT * FROM refinement_classes WHERE refinement_id = ? ORDER BY class_number", (ref["id"],))]
        members = c.execute("SELECT position, parent_position, class_number FROM refinement_package_members "
                            "WHERE package_id = ? ORDER BY position", (pkg["id"],)).fetchall()
        params = [read_params_h5(p.resolve(k["params_path"])) for k in classes]
        stack["file"] = p.resolve(stack["path"])
        files = [p.resolve(k["params_path"]) for k in classes]
    return {"package": pkg, "stack": stack, "refinement": ref, "classes": classes, "params": params,
            "members": np.array([tuple(m) for m in members], dtype=np.int64).reshape(-1, 3), "files": files}


def _expected_best(template) -> np.ndarray:
    """Old class (1 or 2) of each particle, by an explicit loop over the .par values."""
    p1, p2 = template["old"]
    out = np.empty(N, dtype=np.int64)
    for i in range(N):
        out[i] = 1 if p1["occ"][i] >= p2["occ"][i] else 2
    return out


def _same_alignment(row, ref) -> bool:
    return all(np.isclose(row[c], ref[c], atol=1e-3) for c in ("psi", "theta", "phi", "shx", "shy", "df1", "df2",
                                                                  "angast", "score"))


def _images_equal_bytewise(new_stack: Path, src_stack: Path, parent_positions: np.ndarray) -> None:
    with mrcfile.mmap(new_stack, "r") as new, mrcfile.mmap(src_stack, "r") as src:
        assert new.data.shape == (len(parent_positions), BOX, BOX)
        assert new.data.dtype == src.data.dtype
        assert abs(float(new.voxel_size.x) - PIXEL) < 1e-4
        for i, pp in enumerate(parent_positions):
            assert new.data[i].tobytes() == src.data[pp - 1].tobytes(), f"image {i + 1} != source {pp}"


# -------------------------------------------------------------- pure parts
def test_best_class_ties_go_to_lowest_class():
    occ = np.array([[50.0, 10.0, 30.0], [50.0, 90.0, 30.0], [0.0, 0.0, 40.0]])
    assert best_class(occ).tolist() == [0, 1, 2]


def test_mapping_parsing_and_defaults():
    assert parse_mapping(["1:1", "2:1,3:2", "3:3"]) == {1: [1], 2: [1], 3: [2, 3]}
    with pytest.raises(InputError, match="--map"):
        parse_mapping(["1-2"])
    assert default_mapping([1, 2], 2) == {1: [1], 2: [2]}
    assert default_mapping([2, 3], 2) == {2: [1], 3: [2]}
    assert default_mapping([1, 2, 3], 1) == {1: [1], 2: [1], 3: [1]}
    assert default_mapping([1], 3) == {1: [1, 2, 3]}
    assert default_mapping([1, 2], 3) is None


# ------------------------------------------------------------- (a) merge all
def test_keep_both_classes_merge_into_one(template, project):
    assert _create(project, "--from-refinement", template["run"], "--map", "1:1", "--map", "2:1",
                   "--name", "merged", "--symmetry", "c2") == 0
    got = _newest(project)
    best = _expected_best(template)
    pkg = got["package"]
    assert (pkg["name"], pkg["n_classes"], pkg["n_particles"], pkg["symmetry"]) == ("merged", 1, N, "C2")
    assert pkg["parent_id"] == template["package"]
    # every particle carried over: the template's stack is reused, no copy
    assert pkg["stack_id"] == template["stack_id"]
    assert not list((project / "Assets" / "ParticleStacks").glob("*.mrcs"))
    assert got["refinement"]["kind"] == "start" and got["refinement"]["n_classes"] == 1
    assert got["refinement"]["parent_id"] == template["run"]
    assert got["files"][0].name == f"params_{got['refinement']['id']}_1.h5"
    for suffix in (".par", ".star"):
        assert got["files"][0].with_suffix(suffix).is_file()
    (params,) = got["params"]
    assert params["position"].tolist() == list(range(1, N + 1))
    assert np.all(params["occ"] == 100.0)
    for i in range(N):  # each particle's alignment comes from the class where its occupancy was highest
        assert _same_alignment(params[i], template["old"][best[i] - 1][i]), i
    m = got["members"]
    assert m[:, 0].tolist() == list(range(1, N + 1)) and m[:, 1].tolist() == list(range(1, N + 1))
    assert np.all(m[:, 2] == 1)
    # the .par written beside it is the same table
    assert np.array_equal(read_par(got["files"][0].with_suffix(".par"))["position"], params["position"])


# -------------------------------------------------------- (b) keep only class 2
def test_keep_only_class_2_writes_a_stack_of_exactly_those_particles(template, project, monkeypatch):
    import cistem_mpi.drivers.package as package

    monkeypatch.setattr(package, "COPY_BATCH_BYTES", BOX * BOX * 4 * 7)  # copy in batches of 7 images
    assert _create(project, "--from-refinement", template["run"], "--keep", "2") == 0
    got = _newest(project)
    best = _expected_best(template)
    expected_parents = [i + 1 for i in range(N) if best[i] == 2]
    # the known subset: class 2 = the changed conformation of the simulation
    assert expected_parents == (np.nonzero(template["truth"] == 1)[0] + 1).tolist()
    n = len(expected_parents)
    pkg, stack = got["package"], got["stack"]
    assert pkg["n_particles"] == n and pkg["n_classes"] == 1 and pkg["stack_id"] != template["stack_id"]
    assert stack["n_particles"] == n and stack["box"] == BOX and abs(stack["pixel_size"] - PIXEL) < 1e-6
    assert stack["file"].parent == project / "Assets" / "ParticleStacks"
    assert stack["file"].name == f"particle_stack_{pkg['id']}.mrcs"
    assert not stack["path"].startswith("/")  # inside the project: stored relative
    assert not list(stack["file"].parent.glob("*.part"))
    m = got["members"]
    assert m[:, 0].tolist() == list(range(1, n + 1))
    assert m[:, 1].tolist() == expected_parents
    _images_equal_bytewise(stack["file"], template["stack"], m[:, 1])
    (params,) = got["params"]
    assert params["position"].tolist() == list(range(1, n + 1))
    assert np.all(params["occ"] == 100.0)
    for j, pp in enumerate(expected_parents):
        assert _same_alignment(params[j], template["old"][1][pp - 1])


# ------------------------------------------------------ (c) 3 classes from 2
def test_three_classes_from_two_with_a_split(template, project):
    assert _create(project, "--from-refinement", template["run"], "--classes", 3,
                   "--map", "1:1", "--map", "2:2,2:3") == 0
    got = _newest(project)
    best = _expected_best(template)
    old1, old2 = template["old"]
    assert got["package"]["n_classes"] == 3 and got["refinement"]["n_classes"] == 3
    assert got["package"]["stack_id"] == template["stack_id"]  # all particles kept
    assert [c["class_number"] for c in got["classes"]] == [1, 2, 3]
    p = got["params"]
    for i in range(N):
        if best[i] == 1:
            want_occ = (100.0, 0.0, 0.0)
        else:  # old class 2 split over new classes 2 and 3
            want_occ = (0.0, 50.0, 50.0)
        assert tuple(float(p[k][i]["occ"]) for k in range(3)) == want_occ, i
        # class 1 descends from old class 1, classes 2 and 3 from old class 2 (cisTEM's wizard)
        assert _same_alignment(p[0][i], old1[i])
        assert _same_alignment(p[1][i], old2[i]) and _same_alignment(p[2][i], old2[i])
    m = got["members"]
    assert m[:, 2].tolist() == [1 if b == 1 else 2 for b in best]  # split: tie -> lowest class
    occ_means = [c["occupancy"] for c in got["classes"]]
    n1 = int((best == 1).sum())
    assert np.allclose(occ_means, [100 * n1 / N, 50 * (N - n1) / N, 50 * (N - n1) / N], atol=1e-3)


def test_single_class_template_split_over_k_classes_and_randomised(template, project):
    # first a 1-class package (merge), then 4 classes from it: every particle in every class
    assert _create(project, "--from-refinement", template["run"], "--classes", 1) == 0
    one = _newest(project)
    assert _create(project, "--from-refinement", one["refinement"]["id"], "--classes", 4) == 0
    four = _newest(project)
    assert four["package"]["parent_id"] == one["package"]["id"]
    for k in range(4):
        assert np.all(four["params"][k]["occ"] == 25.0)
        assert np.array_equal(four["params"][k]["psi"], one["params"][0]["psi"])
    assert _create(project, "--from-refinement", one["refinement"]["id"], "--classes", 4,
                   "--randomise-occupancies", "--seed", 3) == 0
    rnd = _newest(project)
    occ = np.stack([q["occ"] for q in rnd["params"]])
    assert occ.min() >= 0 and occ.max() < 50.0 and occ.std() > 5  # uniform in [0, 200/K)
    assert rnd["members"][:, 2].tolist() == (occ.argmax(axis=0) + 1).tolist()


def test_from_stack(template, project):
    assert _create(project, "--from-stack", template["stack_id"], "--classes", 2) == 0
    got = _newest(project)
    assert got["package"]["stack_id"] == template["stack_id"] and got["package"]["n_particles"] == N
    assert got["package"]["parent_id"] is None
    for q in got["params"]:
        assert q["position"].tolist() == list(range(1, N + 1)) and np.all(q["occ"] == 50.0)
    # no parameters with the stack: orientations uniform on the sphere (mean cos(theta) ~ 0)
    theta = got["params"][0]["theta"]
    assert 0 <= theta.min() and theta.max() <= 180 and abs(np.cos(np.radians(theta)).mean()) < 0.15


# ------------------------------------------------- (d) 2D classification
def _add_classification(project: Path, template, n_classes: int = 4, seed: int = 2) -> np.ndarray:
    """Register 2D classification #1 of the template package with a class_2d column; return the classes."""
    classes = np.random.default_rng(seed).integers(1, n_classes, N)  # class n_classes stays empty
    params = template["old"][0].copy()
    params["psi"] = 33.0  # in-plane angle of the 2D alignment
    h5 = project / "Assets" / "ClassAverages" / "classification_1_params.h5"

    def body(ctx):
        if ctx.is_controller:
            write_params_h5(h5, params, columns={"class_2d": classes})
            ctx.register("classifications_2d", number=1, package_id=template["package"], n_classes=n_classes,
                         path=project / "Assets" / "ClassAverages" / "class_averages_0001.mrc", params_path=h5)
        return {}

    assert run_job(job_args(project), "classify_2d", body) == 0
    return classes


def test_from_2d_classification(template, project):
    classes = _add_classification(project, template)
    assert _create(project, "--from-classification", 1, "--select", "2,1", "--classes", 2) == 0
    got = _newest(project)
    expected_parents = [i + 1 for i in range(N) if classes[i] in (1, 2)]
    n = len(expected_parents)
    assert got["package"]["n_particles"] == n and got["package"]["parent_id"] == template["package"]
    m = got["members"]
    assert m[:, 0].tolist() == list(range(1, n + 1)) and m[:, 1].tolist() == expected_parents
    _images_equal_bytewise(got["stack"]["file"], template["stack"], m[:, 1])
    src = template["old"][0]
    for q in got["params"]:
        assert q["position"].tolist() == list(range(1, n + 1))
        assert np.all(q["occ"] == 50.0) and np.all(q["shx"] == 0) and np.all(q["shy"] == 0)
        for j, pp in enumerate(expected_parents):  # CTF carried over
            assert q["df1"][j] == src["df1"][pp - 1] and q["df2"][j] == src["df2"][pp - 1]
        assert not np.all(q["psi"] == 33.0)  # 3D orientations are new, not the 2D in-plane angle


# ------------------------------------------------------------ (e) bad input
def _snapshot(project: Path) -> tuple[list[str], set[str]]:
    with Project.open(project, readonly=True) as p:
        dump = list(p.conn.iterdump())
    files = {str(f.relative_to(project)) for f in (project / "Assets").rglob("*")}
    return dump, files


BAD = [
    (["--keep", "3"], "--keep: class 3 is not a class of refinement"),
    (["--map", "3:1"], "--map: class 3 is not a class of refinement"),
    (["--classes", "2", "--map", "1:1", "--map", "2:3"], "--map: new class 3 (from old class 2) is outside 1..2"),
    (["--keep", "1", "--map", "1:1,2:1"], "--map: class 2 is mapped but not carried over"),
    (["--classes", "2", "--map", "1:1"], "--map: class 2 is carried over but not mapped"),
    (["--classes", "3", "--map", "1:1,2:2"], "--map: new class 3 gets no old class"),
    (["--keep", "1,2", "--classes", "3"], "--map: cannot guess how the 2 kept classes"),
    (["--classes", "0"], "--classes: the number of classes must be at least 1"),
    (["--map", "1=1"], "--map: expected OLD:NEW"),
    (["--keep", "one"], "--keep: expected class numbers"),
    (["--symmetry", "X5"], "--symmetry: unknown symmetry"),
    (["--select", "1"], "--select: cannot be used with --from-refinement"),
]


def test_bad_template_input_changes_nothing(template, project, capsys):
    # a 3-class package of the same stack whose class 3 never has the highest occupancy
    p3 = template["old"][0].copy()
    p3["occ"] = 0.0
    write_par(template["base"] / "class3_empty.par", p3)
    assert main(["import", "particles", str(template["stack"]), "--pixel-size", str(PIXEL), "-p", str(project),
                 *[x for f in ("class1.par", "class2.par", "class3_empty.par")
                   for x in ("--params", str(template["base"] / f))]]) == 0
    with Project.open(project, readonly=True) as p:
        run3 = p.conn.execute("SELECT max(id) FROM refinements").fetchone()[0]
    _add_classification(project, template)
    before = _snapshot(project)
    cases = [(["--from-refinement", template["run"], *args], msg) for args, msg in BAD] + [
        (["--from-refinement", run3, "--keep", "3"], "--keep: no particle has its highest occupancy in class(es) 3"),
        (["--from-refinement", 99], "--from-refinement: no refinement #99"),
        (["--from-classification", 1, "--select", "4"], "--select: no particle is in 2D class(es) 4"),
        (["--from-classification", 1, "--select", "5"], "--select: class 5 is not a class of 2D classification #1"),
        (["--from-classification", 1], "--select: give the 2D classes"),
        (["--from-classification", 2, "--select", "1"], "--from-classification: no 2D classification #2"),
        (["--from-stack", template["stack_id"], "--keep", "1"], "--keep: cannot be used with --from-stack"),
        (["--from-stack", 42], "--from-stack: no particle stack #42"),
    ]
    for args, msg in cases:
        capsys.readouterr()
        assert _create(project, *args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and msg in err, (args, err)
        assert _snapshot(project) == before, args  # database and asset files exactly as before


def test_missing_template_stack_is_reported_before_anything_is_written(template, project, tmp_path, capsys):
    moved = tmp_path / "elsewhere.mrcs"
    shutil.copy(template["stack"], moved)
    with Project.open(project) as p:  # point the package at a stack that then disappears
        with p.conn:
            p.conn.execute("UPDATE particle_stacks SET path = ? WHERE id = ?", (str(moved), template["stack_id"]))
    moved.unlink()
    before = _snapshot(project)
    assert _create(project, "--from-refinement", template["run"], "--keep", "2") == 2
    assert "file not found" in capsys.readouterr().err
    assert _snapshot(project) == before
