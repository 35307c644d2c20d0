"""Checkpoints: exact round trip, atomic replacement, damaged/partial ones ignored, resume == uninterrupted."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cistem_mpi.drivers.runtime.checkpoint import CheckpointStore, rng_from_state, rng_state
from cistem_mpi.errors import InputError
from cistem_mpi.io.params import PARAM_DTYPE, empty_params


def test_round_trip_is_exact(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    params = empty_params(5)
    params["psi"] = np.linspace(0, 359.5, 5)
    params["df1"] = [15000.25, 16000.5, 1.0, 2.0, 3.0]
    ref = np.random.default_rng(3).standard_normal((8, 8, 8)).astype(np.float32)
    rng = np.random.default_rng(42)
    rng.standard_normal(10)
    ref_file = tmp_path / "ref.bin"
    ref_file.write_bytes(b"\x00\x01volume")
    store.save(3, state={"resolution": 7.5, "rng": rng_state(rng)}, arrays={"params": params, "ref": ref},
               files={"ref_1.mrc": ref_file})
    ck = store.latest()
    assert ck is not None and ck.iteration == 3
    assert ck.arrays["params"].dtype == PARAM_DTYPE
    assert ck.arrays["params"].tobytes() == params.tobytes()
    assert ck.arrays["ref"].tobytes() == ref.tobytes()
    assert ck.files["ref_1.mrc"].read_bytes() == b"\x00\x01volume"
    assert ck.state["resolution"] == 7.5
    # the restored generator continues with exactly the same numbers
    restored = rng_from_state(ck.state["rng"])
    assert np.array_equal(restored.standard_normal(100), rng.standard_normal(100))


def test_latest_keeps_newest_and_skips_damaged(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for it in range(4):
        store.save(it, state={"it": it}, arrays={"x": np.full(3, it)})
    assert store.iterations() == [2, 3]  # older pruned
    # damage the newest: its checksum no longer matches -> fall back to 2
    victim = tmp_path / "iter_000003" / "x.npy"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum"):
        store.load(3)
    ck = store.latest()
    assert ck is not None and ck.iteration == 2 and ck.state == {"it": 2}


def test_partial_checkpoint_is_invisible_and_cleaned(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(0, state={"ok": True})
    # what a SIGKILL in the middle of save() leaves: a partial dir without manifest
    partial = tmp_path / "iter_000001.partial-99999999"
    partial.mkdir()
    (partial / "state.json").write_text('{"ok": fal')
    half = tmp_path / "iter_000002"  # a final-named dir without manifest (never produced by save)
    half.mkdir()
    assert store.iterations() == [0]
    assert store.latest().state == {"ok": True}
    store.save(1, state={"ok": 1})
    assert not partial.exists()
    assert store.latest().iteration == 1


def test_resave_same_iteration_replaces(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(5, state={"v": 1})
    store.save(5, state={"v": 2})
    assert store.load(5).state == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000005"]


def test_manifest_names_every_file(tmp_path):
    store = CheckpointStore(tmp_path)
    path = store.save(0, state={}, arrays={"a": np.zeros(2)})
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["entries"]) == {"a.npy", "state.json"}
    for name, entry in manifest["entries"].items():
        assert entry["bytes"] == os.path.getsize(path / name)


def _iterate(store: CheckpointStore, n_iter: int, crash_at: int | None = None) -> np.ndarray:
    """A toy iterative job: random perturbations + a deterministic update, checkpointed."""
    ck = store.latest()
    if ck is None:
        x, rng, start = np.zeros(16), np.random.default_rng(7), 0
    else:
        x, rng, start = ck.arrays["x"], rng_from_state(ck.state["rng"]), ck.iteration + 1
    for it in range(start, n_iter):
        if it == crash_at:
            raise KeyboardInterrupt("killed")
        x = 0.9 * x + rng.standard_normal(16)
        store.save(it, state={"rng": rng_state(rng)}, arrays={"x": x})
    return x


def test_resume_gives_the_uninterrupted_result(tmp_path):
    full = _iterate(CheckpointStore(tmp_path / "a"), 6)
    store = CheckpointStore(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        _iterate(store, 6, crash_at=4)
    assert store.latest().iteration == 3
    resumed = _iterate(store, 6)
    assert resumed.tobytes() == full.tobytes()


def test_bad_names_rejected(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError):
        store.save(0, arrays={"../x": np.zeros(1)})
    with pytest.raises(ValueError):
        store.save(-1)
