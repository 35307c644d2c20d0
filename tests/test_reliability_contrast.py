"""Issue #13 items 0 and 17: RELION particles have protein white; our RELION exports are RELION-readable."""

from __future__ import annotations

import mrcfile
import numpy as np

from cistem_mpi.cli import main
from helpers_reliability import db_rows, simulated


def _relion_way(tmp, sim):
    """The simulated particles as relion_preprocess writes them: protein white, a RELION 3.1 .star without
    our contrast comment."""
    from cistem_mpi.io.star import CONTRAST_MARK, write_relion_star

    white = tmp / "Extract" / "particles.mrcs"
    white.parent.mkdir()
    data = mrcfile.read(sim.stack)
    with mrcfile.new(white) as m:
        m.set_data((-data).astype(np.float32))
        m.set_image_stack()
        m.voxel_size = sim.particles.optics[0].pixel_size
    star = tmp / "Extract" / "run_data.star"
    write_relion_star(star, sim.particles, stack="particles.mrcs")
    star.write_text("".join(ln for ln in star.read_text().splitlines(True) if not ln.startswith(CONTRAST_MARK)))
    return white, star


def _corr(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_relion_star_import_inverts_protein_white_particles(tmp_path):
    sim = simulated(tmp_path / "sim", n=150, box=32, pixel_size=4.0, snr=2.0)
    white, star = _relion_way(tmp_path, sim)
    truth = mrcfile.read(sim.map)
    corr = {}
    for name, flags in (("default", []), ("dark", ["--protein-is-dark"])):
        root = tmp_path / name
        assert main(["project", "create", str(root)]) == 0
        assert main(["import", "particles", "-p", str(root), str(white), "--params", str(star)] + flags) == 0
        assert main(["reconstruct", "-p", str(root)]) == 0
        (white_flag,), = db_rows(root, "SELECT protein_is_white FROM particle_stacks")
        assert white_flag == (1 if name == "default" else 0)
        corr[name] = _corr(mrcfile.read(root / "Assets/Volumes/volume_1_1.mrc"), truth)
    # RELION's convention by default: the map has the truth's contrast; --protein-is-dark overrides it
    assert corr["default"] > 0.5, corr
    assert corr["dark"] < -0.5, corr


def test_our_exports_state_their_contrast(tmp_path):
    from cistem_mpi.drivers.import_assets import protein_is_white_for
    from cistem_mpi.io.star import star_protein_is_white, write_relion_star

    sim = simulated(tmp_path / "sim", n=8)
    # simulate's RELION .star points at a protein-dark stack and says so: importing it back does not invert
    assert star_protein_is_white(sim.relion_star) is False
    assert protein_is_white_for({}, [sim.relion_star]) is False
    assert protein_is_white_for({}, [sim.par]) is False
    white = tmp_path / "white.star"
    write_relion_star(white, sim.particles, stack=str(sim.stack), protein_is_white=True)
    assert star_protein_is_white(white) is True
    assert protein_is_white_for({"protein_is_white": False}, [white]) is False  # the option wins


def test_negative_reference_correlation_is_detected(tmp_path):
    from cistem_mpi.kernels import refinement as rf
    from cistem_mpi.drivers.refine_rounds import contrast_score

    sim = simulated(tmp_path / "sim", n=40, box=32, pixel_size=4.0, snr=2.0)
    ref = mrcfile.read(sim.map).astype(np.float32)
    o = sim.particles.optics[0]
    plan = {"stack": str(sim.stack), "params": sim.particles.params, "box": 32, "pixel_size": 4.0,
            "optics": (o.voltage, o.cs, o.amplitude_contrast), "high_resolution": 10.0, "low_resolution": 300.0,
            "align": rf.AlignSettings(mask_radius=14.0)}
    right = contrast_score(plan, [ref])
    wrong = contrast_score({**plan, "invert": True}, [ref])
    assert right > 5.0 and wrong < -5.0, (right, wrong)


def test_relion_exports_pass_relions_reader_rules(tmp_path):
    """RELION 3.1+ (ObservationModel) needs rlnImageSize and rlnImageDimensionality in data_optics."""
    from cistem_mpi.io.star import read_star, relion_readability_problems, write_relion_star

    sim = simulated(tmp_path / "sim", n=8, box=32)
    assert relion_readability_problems(sim.relion_star) == []
    out = tmp_path / "export.star"
    write_relion_star(out, sim.particles, image_size=32, stack="particles.mrcs")
    text = out.read_text()
    assert "_rlnImageSize" in text and "_rlnImageDimensionality" in text
    assert relion_readability_problems(out) == []
    back = read_star(out)
    assert int(back.optics[0].extra["rlnImageSize"]) == 32
    # what the exports looked like before: refused by RELION (getBoxSize: box sizes not available)
    legacy = tmp_path / "legacy.star"
    lines = [ln for ln in text.splitlines(True) if "rlnImageSize" not in ln and "rlnImageDimensionality" not in ln]
    # drop the two optics values too (last two columns of the optics row)
    fixed = []
    in_optics = False
    for ln in lines:
        if ln.startswith("data_optics"):
            in_optics = True
        elif ln.startswith("data_particles"):
            in_optics = False
        if in_optics and ln.strip() and not ln.startswith(("_", "loop_", "data_", "#")):
            ln = " ".join(ln.split()[:-2]) + "\n"
        fixed.append(ln)
    legacy.write_text("".join(fixed))
    problems = relion_readability_problems(legacy)
    assert any("rlnImageSize" in p for p in problems) and any("Dimensionality" in p for p in problems)
    # a round trip through the converter keeps them
    conv = tmp_path / "conv.star"
    assert main(["convert", str(sim.par), str(conv), "--to", "relion-star", "--pixel-size", "4.0",
                 "--box-size", "32", "--stack", "particles.mrcs"]) == 0
    assert relion_readability_problems(conv) == []
