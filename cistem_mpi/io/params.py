"""Per-particle alignment parameters: the Frealign X columns as one array.

The 17 columns of a Frealign X ``.par`` file are the project's one name for
per-particle parameters, in code, database, files and docs.  Units are the
``.par`` units (cisTEM's): angles in degrees (ZYZ Euler, cisTEM convention),
shifts in Å, defocus in Å, astigmatism angle in degrees, phase shift in
radians, occupancy in percent.

``PARAM_DTYPE`` is a numpy structured dtype; a parameter table is a 1-D array
of it.  Everything that reads or writes parameters (``.par``, ``.star``,
cryoSPARC ``.cs``, the database's parameter files) converts to and from this
array.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Column names in file order, exactly as cisTEM's header line spells them.
PAR_COLUMNS: tuple[str, ...] = (
    "position", "psi", "theta", "phi", "shx", "shy", "mag", "film",
    "df1", "df2", "angast", "pshift", "occ", "logp", "sigma", "score", "change",
)

#: One row per particle.  ``position`` counts from 1 (particle position in its
#: stack); ``film`` < 0 marks an excluded particle.
PARAM_DTYPE = np.dtype(
    [
        ("position", np.int32),
        ("psi", np.float32),
        ("theta", np.float32),
        ("phi", np.float32),
        ("shx", np.float32),
        ("shy", np.float32),
        ("mag", np.float32),
        ("film", np.int32),
        ("df1", np.float32),
        ("df2", np.float32),
        ("angast", np.float32),
        ("pshift", np.float32),
        ("occ", np.float32),
        # LogP can reach millions; float64 keeps the integer written to .par exact.
        ("logp", np.float64),
        ("sigma", np.float32),
        ("score", np.float32),
        ("change", np.float32),
    ]
)

assert PARAM_DTYPE.names == PAR_COLUMNS


def empty_params(n: int) -> np.ndarray:
    """Return ``n`` parameter rows with cisTEM's neutral defaults.

    Positions run 1..n, occupancy 100 %, sigma 1, everything else 0.

    Parameters
    ----------
    n : int
        Number of particles.

    Returns
    -------
    numpy.ndarray
        Structured array of :data:`PARAM_DTYPE`.
    """
    p = np.zeros(n, dtype=PARAM_DTYPE)
    p["position"] = np.arange(1, n + 1, dtype=np.int32)
    p["occ"] = 100.0
    p["sigma"] = 1.0
    return p


@dataclass
class Optics:
    """Microscope and image settings shared by a group of particles.

    Attributes
    ----------
    pixel_size : float
        Image pixel size in Å.
    voltage : float
        Acceleration voltage in kV.
    cs : float
        Spherical aberration in mm.
    amplitude_contrast : float
        Fraction of amplitude contrast (0..1).
    name : str
        Optics group name (RELION ``rlnOpticsGroupName``).
    extra : dict
        Other per-group values read from a file, keyed by label without the
        leading underscore (``rlnOpticsGroup`` number, ``rlnImageSize``,
        beam tilt, RELION 5 Zernike arrays ...), kept so an export can write
        them back.
    """

    pixel_size: float
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.07
    name: str = "opticsGroup1"
    extra: dict = field(default_factory=dict)


@dataclass
class ParticleSet:
    """Parameters of a set of particles plus what a file needs beside them.

    Attributes
    ----------
    params : numpy.ndarray
        Structured array of :data:`PARAM_DTYPE`.
    optics : list[Optics]
        Optics groups; ``optics_group`` indexes into it (0-based).
    optics_group : numpy.ndarray
        Per-particle index into ``optics`` (int32).
    image_names : list[str] or None
        Per-particle image references as RELION writes them
        (``"000001@stack.mrcs"``), when the source had them.
    extra : dict[str, numpy.ndarray]
        Other per-particle columns read from a file (e.g. coordinates,
        micrograph names), kept so an export can write them back.
    """

    params: np.ndarray
    optics: list[Optics]
    optics_group: np.ndarray | None = None
    image_names: list[str] | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optics_group is None:
            self.optics_group = np.zeros(len(self.params), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.params)

    def take(self, index: np.ndarray) -> "ParticleSet":
        """A new set with the rows ``index`` (reordered or selected) of every per-particle field."""
        index = np.asarray(index)
        return ParticleSet(
            params=self.params[index],
            optics=self.optics,
            optics_group=None if self.optics_group is None else self.optics_group[index],
            image_names=None if self.image_names is None else [self.image_names[i] for i in index],
            extra={k: np.asarray(v)[index] for k, v in self.extra.items()},
        )

    def pixel_sizes(self) -> np.ndarray:
        """Per-particle pixel size in Å (float32)."""
        ps = np.array([o.pixel_size for o in self.optics], dtype=np.float32)
        return ps[self.optics_group]
