"""Atomic models (PDB / mmCIF via gemmi) as element + coordinate arrays.

Also the package's one built-in structure: ``cistem_mpi/data/8zpm_atoms.npz``
(protein atoms of PDB entry 8ZPM, CC0 1.0; see ``cistem_mpi/data/README.md``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cistem_mpi.errors import InputError

__all__ = ["Atoms", "read_atoms", "scattering_coefficients", "builtin_atoms", "BUILTIN_PATH",
           "save_atoms_npz"]

BUILTIN_PATH = Path(__file__).resolve().parents[1] / "data" / "8zpm_atoms.npz"


@dataclass
class Atoms:
    """Atoms of a model.

    Attributes
    ----------
    elements : ndarray of str
        Element symbols ("C", "N", ...), upper case.
    coords : ndarray, float64, (n, 3)
        x, y, z in Å.
    chains : ndarray of str
        Chain name of each atom.
    residues : ndarray of int
        Residue sequence number of each atom.
    """

    elements: np.ndarray
    coords: np.ndarray
    chains: np.ndarray
    residues: np.ndarray

    def __len__(self) -> int:
        return len(self.elements)

    def select(self, keep: np.ndarray) -> "Atoms":
        """The atoms where ``keep`` (bool array) is true."""
        return Atoms(self.elements[keep], self.coords[keep], self.chains[keep], self.residues[keep])


def read_atoms(path: str | os.PathLike, protein_only: bool = True, model_index: int = 0) -> Atoms:
    """Read atoms from a PDB or mmCIF file with gemmi.

    Parameters
    ----------
    path : path
        ``.pdb``, ``.cif``, ``.mmcif`` (optionally gzipped).
    protein_only : bool
        Keep only atoms of standard amino-acid residues (drops ligands,
        lipids, water) and no hydrogens.
    model_index : int
        Which model of a multi-model file.
    """
    import gemmi

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "atomic model file not found")
    try:
        st = gemmi.read_structure(str(p))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with a message
        raise InputError(p, f"cannot read atomic model: {exc}") from None
    if len(st) <= model_index:
        raise InputError(p, f"model {model_index + 1} not present (file has {len(st)})")
    els, xyz, chs, res = [], [], [], []
    for ch in st[model_index]:
        for r in ch:
            if protein_only:
                info = gemmi.find_tabulated_residue(r.name)
                if info is None or not info.is_amino_acid():
                    continue
            for a in r:
                if a.element.is_hydrogen:
                    continue
                els.append(a.element.name.upper())
                xyz.append(a.pos.tolist())
                chs.append(ch.name)
                res.append(r.seqid.num)
    if not els:
        raise InputError(p, "no atoms found" + (" (protein only)" if protein_only else ""))
    return Atoms(np.array(els), np.array(xyz, dtype=np.float64), np.array(chs), np.array(res, dtype=np.int32))


def scattering_coefficients(elements: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Electron scattering Gaussians (a, b) per atom from gemmi's ``c4322`` table.

    ``f(s) = sum_t a_t exp(-b_t s^2/4)`` (International Tables C 4.3.2.2, 5 terms).
    Returns two float64 arrays of shape (n, 5).
    """
    import gemmi

    table: dict[str, tuple[list[float], list[float]]] = {}
    for e in np.unique(elements):
        el = gemmi.Element(str(e))
        c = el.c4322
        if el.atomic_number == 0 or c is None:
            raise InputError(None, f"unknown element {e!r} in atomic model")
        coefs = c.get_coefs()
        k = len(coefs) // 2
        table[str(e)] = (coefs[:k], coefs[k:])
    a = np.array([table[str(e)][0] for e in elements], dtype=np.float64)
    b = np.array([table[str(e)][1] for e in elements], dtype=np.float64)
    return a, b


def save_atoms_npz(path: str | os.PathLike, atoms: Atoms, note: str = "") -> None:
    """Write atoms compactly (element codes + float32 coordinates)."""
    symbols, codes = np.unique(atoms.elements, return_inverse=True)
    np.savez_compressed(
        path, symbols=symbols.astype("U2"), element_index=codes.astype(np.uint8),
        coords=atoms.coords.astype(np.float32), chains=atoms.chains.astype("U4"),
        residues=atoms.residues.astype(np.int16), note=np.array(note))


def builtin_atoms() -> Atoms:
    """The built-in structure: protein atoms of PDB 8ZPM (CXCR4 + nanobody)."""
    if not BUILTIN_PATH.is_file():
        raise InputError(BUILTIN_PATH, "built-in structure missing from the installation")
    with np.load(BUILTIN_PATH) as z:
        els = z["symbols"][z["element_index"]]
        return Atoms(els.astype(str), z["coords"].astype(np.float64), z["chains"].astype(str),
                     z["residues"].astype(np.int32))
