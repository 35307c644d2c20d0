"""Optics, ParticleSet and CTFParams check their values at construction (issue #10 item 3)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cistem_mpi.errors import InputError
from cistem_mpi.io.par import write_par
from cistem_mpi.io.params import InvalidValue, Optics, ParticleSet, empty_params
from cistem_mpi.io.star import read_star, write_cistem_star
from cistem_mpi.kernels.ctf import CTFParams


@pytest.mark.parametrize("kwargs, problem", [
    (dict(pixel_size=-1.0), "pixel size must be >= 0 Å, got -1"),
    (dict(pixel_size=1.0, voltage=0.0), "voltage must be > 0 kV, got 0"),
    (dict(pixel_size=1.0, voltage=-300.0), "voltage must be > 0 kV, got -300"),
    (dict(pixel_size=1.0, cs=-2.7), "Cs must be >= 0 mm, got -2.7"),
    (dict(pixel_size=1.0, amplitude_contrast=1.5), "amplitude contrast must be < 1, got 1.5"),
    (dict(pixel_size=1.0, amplitude_contrast=1.0), "amplitude contrast must be < 1, got 1"),
    (dict(pixel_size=1.0, amplitude_contrast=-0.1), "amplitude contrast must be >= 0, got -0.1"),
    (dict(pixel_size=np.nan), "pixel size must be a finite number, got nan"),
    (dict(pixel_size=1.0, voltage=np.inf), "voltage must be a finite number, got inf"),
    (dict(pixel_size="a"), "pixel size must be a number, got 'a'"),
])
def test_optics_rejects(kwargs, problem):
    with pytest.raises(InputError) as e:
        Optics(**kwargs)
    assert str(e.value) == f"optics group opticsGroup1: {problem}"


def test_optics_names_every_bad_value_and_accepts_good_ones():
    with pytest.raises(InvalidValue) as e:
        Optics(pixel_size=-1.0, voltage=0.0, cs=-1.0, amplitude_contrast=2.0, name="g7")
    assert e.value.fields == ("pixel_size", "voltage", "cs", "amplitude_contrast")
    assert str(e.value).startswith("optics group g7: pixel size must be >= 0 Å, got -1; voltage")
    o = Optics(pixel_size=0.0, voltage=200.0, cs=0.0, amplitude_contrast=0.0)  # 0 Å: unknown; Cs-corrected
    assert (o.pixel_size, o.cs, o.amplitude_contrast) == (0.0, 0.0, 0.0)


def test_optics_changed_later_are_checked_too():
    o = Optics(pixel_size=1.0, name="g2")
    o.voltage = 200.0
    with pytest.raises(InvalidValue) as e:
        o.amplitude_contrast = 1.2
    assert str(e.value) == "optics group g2: amplitude contrast must be < 1, got 1.2" and e.value.fields == (
        "amplitude_contrast",)
    assert (o.voltage, o.amplitude_contrast) == (200.0, 0.07)


def test_particle_set_rejects_mismatched_lengths():
    p = empty_params(3)
    o = [Optics(1.0)]
    cases = [
        (dict(optics_group=np.zeros(2, np.int32)), "optics_group has 2 rows for 3 particles"),
        (dict(optics_group=np.array([0, 1, 0])), "optics_group refers to group index 1 but there are 1 optics groups"),
        (dict(image_names=["1@s", "2@s"]), "image_names has 2 entries for 3 particles"),
        (dict(extra={"rlnClassNumber": np.ones(4)}), "extra column rlnClassNumber has 4 rows for 3 particles"),
    ]
    for kwargs, problem in cases:
        with pytest.raises(InputError) as e:
            ParticleSet(params=p, optics=o, **kwargs)
        assert str(e.value) == f"particle set: {problem}"
    with pytest.raises(InputError, match="non-empty list of Optics"):
        ParticleSet(params=p, optics=[])
    with pytest.raises(InputError, match="structured array"):
        ParticleSet(params=np.zeros(3), optics=o)
    assert len(ParticleSet(params=p, optics=o, image_names=["1@s", "2@s", "3@s"]).take([2, 0])) == 2


@pytest.mark.parametrize("kwargs, problem", [
    (dict(voltage=0.0), "voltage must be > 0 kV, got 0"),
    (dict(cs=-0.1), "Cs must be >= 0 mm, got -0.1"),
    (dict(amplitude_contrast=1.5), "amplitude contrast must be in [0, 1), got 1.5"),
    (dict(df1=np.nan), "df1 must be a finite number, got nan"),
    (dict(bfactor=np.inf), "bfactor must be a finite number, got inf"),
])
def test_ctf_params_reject(kwargs, problem):
    with pytest.raises(InputError) as e:
        CTFParams(**kwargs)
    assert str(e.value) == f"CTF parameters: {problem}"


def test_a_file_with_bad_optics_is_named(tmp_path):
    f = tmp_path / "p.star"
    write_cistem_star(f, ParticleSet(params=empty_params(2), optics=[Optics(pixel_size=1.0)]))
    text = f.read_text().replace(" 0.0700 ", " 1.5000 ")
    f.write_text(text)
    with pytest.raises(InputError) as e:
        read_star(f)
    assert str(e.value) == f"{f}: optics group opticsGroup1: amplitude contrast must be < 1, got 1.5"


def test_import_with_a_bad_option_fails_before_anything(tmp_path):
    """`import particles` with --amplitude-contrast 1.5 (a .par carries no optics): exit 2, the option named."""
    import mrcfile

    from helpers_jobs import db_dump

    CLI = [sys.executable, "-m", "cistem_mpi"]
    proj = tmp_path / "p"
    subprocess.run(CLI + ["project", "create", str(proj)], check=True, capture_output=True)
    stack, par = tmp_path / "s.mrcs", tmp_path / "s.par"
    mrcfile.new(str(stack), np.zeros((2, 16, 16), np.float32)).close()
    write_par(par, empty_params(2))
    before = db_dump(proj)
    r = subprocess.run(CLI + ["import", "particles", "-p", str(proj), str(stack), "--params", str(par),
                              "--pixel-size", "1.2", "--amplitude-contrast", "1.5"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "error: --amplitude-contrast: amplitude contrast must be < 1, got 1.5" in r.stderr
    assert "Traceback" not in r.stderr and db_dump(proj) == before


def test_cistem_star_without_voltage_reads_300_kv(tmp_path):
    f = tmp_path / "p.star"
    write_cistem_star(f, ParticleSet(params=empty_params(2), optics=[Optics(pixel_size=1.0, voltage=200.0)]))
    lines = f.read_text().splitlines()
    # drop the voltage column (label 18 of the core columns) and its values
    labels = [i for i, ln in enumerate(lines) if ln.startswith("_cisTEM")]
    k = [i for i in labels if lines[i].startswith("_cisTEMMicroscopeVoltagekV")][0] - labels[0]
    out = []
    for i, ln in enumerate(lines):
        if i in labels and ln.startswith("_cisTEMMicroscopeVoltagekV"):
            continue
        if i > labels[-1] and ln.strip() and not ln.startswith("#"):
            tok = ln.split()
            del tok[k]
            ln = " ".join(tok)
        out.append(ln)
    f.write_text("\n".join(out) + "\n")
    with pytest.warns(UserWarning, match="_cisTEMMicroscopeVoltagekV missing; using 300 kV"):
        ps = read_star(f)
    assert ps.optics[0].voltage == 300.0
