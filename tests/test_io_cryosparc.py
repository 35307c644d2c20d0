"""cryoSPARC .cs import.

Expected values: looked up with ``numpy.load`` of the files (the format is
a plain numpy array) and the RELION .star of the same particles; the Euler
convention is checked against scipy's independent rotation code.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cistem_mpi.errors import InputError
from cistem_mpi.io.cryosparc import read_cryosparc
from cistem_mpi.io.star import read_star


@pytest.mark.interop
def test_same_particles_as_star(shared_data):
    # empiar_10076_7.cs and .star hold the same 7 particles (CTF only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cs = read_cryosparc(shared_data / "cryodrgn/empiar_10076_7.cs")
        st = read_star(shared_data / "cryodrgn/empiar_10076_7.star")
    assert len(cs) == len(st) == 7
    np.testing.assert_array_equal(cs.params["position"], st.params["position"])
    np.testing.assert_allclose(cs.params["df1"], st.params["df1"], atol=0.01)
    np.testing.assert_allclose(cs.params["df2"], st.params["df2"], atol=0.01)
    np.testing.assert_allclose(cs.params["angast"], st.params["angast"], atol=0.005)  # 0.092153385 rad = 5.28°
    assert cs.optics[0].pixel_size == pytest.approx(st.optics[0].pixel_size, abs=1e-5)  # 1.31 vs 5e4/38168
    o = cs.optics[0]
    assert (o.voltage, o.cs, o.amplitude_contrast) == (300.0, 2.7, 0.07)
    assert cs.image_names[0] == "000001@empiar_10076_7.mrc"
    assert o.extra["rlnImageSize"] == 320


@pytest.mark.interop
def test_3d_alignments(shared_data):
    f = shared_data / "cryodrgn/cryosparc_P12_J24_001_particles.cs"
    s = read_cryosparc(f)
    assert len(s) == 2019
    o = s.optics[0]
    assert (o.pixel_size, o.voltage, o.cs, o.amplitude_contrast) == (2.95, 200.0, 2.0, 0.07)
    r = s.params[0]
    # first record: df1 45591.37, df2 45309.793, df_angle -1.3636448 rad, shift (11.334375, -1.828125) px
    assert (r["df1"], r["df2"]) == pytest.approx((45591.37, 45309.793), abs=1e-2)
    assert r["angast"] == pytest.approx(np.rad2deg(-1.3636448), abs=1e-4)
    assert (r["shx"], r["shy"]) == pytest.approx((-11.334375 * 2.95, 1.828125 * 2.95), abs=1e-4)
    assert r["position"] == 1 and s.extra["rlnClassNumber"][0] == 1 and s.extra["rlnRandomSubset"][0] == 2
    # every pose: R(axis-angle) is the intrinsic ZYZ rotation (rot, tilt, psi) = (PHI, THETA, PSI)
    pose = np.load(f)["alignments3D/pose"].astype(np.float64)
    ref = Rotation.from_rotvec(pose).as_matrix()
    got = Rotation.from_euler("ZYZ", np.stack([s.params["phi"], s.params["theta"], s.params["psi"]], 1),
                              degrees=True).as_matrix()
    np.testing.assert_allclose(got, ref, atol=2e-6)  # float32 angles


@pytest.mark.interop
def test_2d_alignments_and_exported_paths(shared_data):
    s = read_cryosparc(shared_data / "cryodrgn/cryosparc_J2_particles_exported.cs")
    assert len(s) == 22
    r = s.params[0]
    assert r["psi"] == pytest.approx(np.rad2deg(5.8985004), abs=1e-4)  # alignments2D/pose
    assert (r["shx"], r["shy"]) == pytest.approx((0.0, -12.0 * 1.345), abs=1e-4)  # shift (0, 12) px
    assert s.optics[0].amplitude_contrast == 0.1 and s.optics[0].pixel_size == 1.345
    assert s.image_names[0] == "000001@J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs"  # '>' removed
    assert s.extra["rlnClassNumber"][0] == 5  # class 4, 0-based


def _write_cs(path, arr):
    with open(path, "wb") as fh:  # np.save on a file object keeps the .cs name
        np.save(fh, arr)


def test_synthetic_cs_poses_and_groups(tmp_path):
    rng = np.random.default_rng(4)
    n = 50
    ang = np.stack([rng.uniform(-180, 180, n), rng.uniform(1, 179, n), rng.uniform(-180, 180, n)], 1)
    pose = Rotation.from_euler("ZYZ", ang, degrees=True).as_rotvec()
    dt = [("blob/idx", "<u4"), ("blob/path", "S20"), ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"),
          ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
          ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"), ("ctf/exp_group_id", "<u4"),
          ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))]
    a = np.zeros(n, dtype=dt)
    a["blob/idx"] = np.arange(n)
    a["blob/path"] = b"stack.mrc"
    a["blob/psize_A"] = 1.2
    a["ctf/accel_kv"], a["ctf/cs_mm"], a["ctf/amp_contrast"] = 300, 2.7, 0.1
    a["ctf/df1_A"], a["ctf/df2_A"] = 15000, 14000
    a["ctf/df_angle_rad"] = 0.5
    a["ctf/phase_shift_rad"] = 1.25
    a["ctf/exp_group_id"] = np.arange(n) % 2
    a["alignments3D/pose"] = pose
    a["alignments3D/shift"] = np.stack([np.arange(n) * 0.5, -np.arange(n) * 0.25], 1)
    f = tmp_path / "syn.cs"
    _write_cs(f, a)
    s = read_cryosparc(f)
    got = Rotation.from_euler("ZYZ", np.stack([s.params["phi"], s.params["theta"], s.params["psi"]], 1),
                              degrees=True).as_matrix()
    np.testing.assert_allclose(got, Rotation.from_rotvec(pose.astype(np.float32)).as_matrix(), atol=2e-6)
    np.testing.assert_allclose(s.params["theta"], ang[:, 1], atol=1e-3)
    np.testing.assert_allclose(s.params["shx"], -np.arange(n) * 0.5 * 1.2, atol=1e-5)
    np.testing.assert_allclose(s.params["shy"], np.arange(n) * 0.25 * 1.2, atol=1e-5)
    assert np.all(s.params["pshift"] == np.float32(1.25))  # radians stay radians
    assert s.params["angast"][0] == pytest.approx(np.rad2deg(0.5), abs=1e-4)
    assert len(s.optics) == 2 and list(s.optics_group[:4]) == [0, 1, 0, 1]
    assert list(s.params["position"][:3]) == [1, 2, 3]


def test_bad_cs_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_cryosparc(tmp_path / "none.cs")
    f = tmp_path / "plain.cs"
    _write_cs(f, np.arange(5.0))
    with pytest.raises(InputError, match="structured array"):
        read_cryosparc(f)
    g = tmp_path / "text.cs"
    g.write_text("not numpy")
    with pytest.raises(InputError, match="text.cs"):
        read_cryosparc(g)
    h = tmp_path / "nofields.cs"
    _write_cs(h, np.zeros(3, dtype=[("uid", "<u8")]))
    with pytest.raises(InputError, match="no particle fields"):
        read_cryosparc(h)
