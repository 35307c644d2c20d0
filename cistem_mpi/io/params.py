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

import math
from dataclasses import dataclass, field

import numpy as np

from cistem_mpi.errors import InputError

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


class InvalidValue(InputError):
    """A data object built with values it cannot hold (raised at construction).

    ``fields`` names the offending attributes, so a reader can name the file
    or a command the option the values came from (:func:`naming_source`).
    """

    def __init__(self, where: str, problem: str, fields: tuple[str, ...] = ()):
        super().__init__(where, problem)
        self.fields = tuple(fields)


def naming_source(exc: InvalidValue, source, options: bool = False) -> InputError:
    """``exc`` re-said for the file (or, with ``options``, the command-line option) its values came from.

    >>> e = InvalidValue("optics group g1", "voltage must be > 0 kV, got 0", ("voltage",))
    >>> str(naming_source(e, "run.star"))
    'run.star: optics group g1: voltage must be > 0 kV, got 0'
    >>> str(naming_source(e, None, options=True))
    '--voltage: voltage must be > 0 kV, got 0'
    """
    if options and exc.fields:
        return InputError("--" + exc.fields[0].replace("_", "-"), exc.problem)
    return InputError(source, f"{exc.path}: {exc.problem}")


#: What each optical value may be: (lowest, lowest allowed?, highest, highest allowed?, unit) -- checked at
#: construction so that a bad value fails where it enters, not as NaNs hours later.
OPTICS_LIMITS = {
    "pixel_size": (0.0, True, math.inf, False, "Å"),  # 0 = unknown (a file without one; the job asks for it)
    "voltage": (0.0, False, math.inf, False, "kV"),
    "cs": (0.0, True, math.inf, False, "mm"),
    "amplitude_contrast": (0.0, True, 1.0, False, ""),  # 1 would make the phase-contrast term infinite
}


def value_problems(values: dict[str, float], limits: dict[str, tuple]) -> list[tuple[str, str]]:
    """Every value of ``values`` that is not a finite number within its ``limits`` (one sentence each).

    Parameters
    ----------
    values : dict
        Name -> value.
    limits : dict
        Name -> ``(low, low_allowed, high, high_allowed, unit)`` as in :data:`OPTICS_LIMITS`.

    Returns
    -------
    list of (str, str)
        ``(name, sentence)`` per bad value; empty when every value is acceptable.

    >>> value_problems({"voltage": -300.0, "cs": 2.7}, OPTICS_LIMITS)
    [('voltage', 'voltage must be > 0 kV, got -300')]
    """
    out = []
    for name, v in values.items():
        label = "Cs" if name == "cs" else name.replace("_", " ")
        try:
            x = float(v)
        except (TypeError, ValueError):
            out.append((name, f"{label} must be a number, got {v!r}"))
            continue
        if not math.isfinite(x):
            out.append((name, f"{label} must be a finite number, got {x}"))
            continue
        low, low_ok, high, high_ok, unit = limits[name]
        unit = f" {unit}" if unit else ""
        if x < low or (x == low and not low_ok):
            out.append((name, f"{label} must be {'>=' if low_ok else '>'} {low:g}{unit}, got {x:g}"))
        elif x > high or (x == high and not high_ok):
            out.append((name, f"{label} must be {'<=' if high_ok else '<'} {high:g}{unit}, got {x:g}"))
    return out


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

    Raises
    ------
    InvalidValue
        (an InputError) A value outside :data:`OPTICS_LIMITS` (negative pixel size, voltage <= 0, Cs < 0, amplitude
        contrast outside [0, 1), NaN or infinity); the error names the optics group and every bad value.

    Examples
    --------
    >>> Optics(pixel_size=1.06).voltage
    300.0
    >>> Optics(pixel_size=1.06, amplitude_contrast=1.5)
    Traceback (most recent call last):
    ...
    cistem_mpi.io.params.InvalidValue: optics group opticsGroup1: amplitude contrast must be < 1, got 1.5
    """

    pixel_size: float
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.07
    name: str = "opticsGroup1"
    extra: dict = field(default_factory=dict)

    def __setattr__(self, key: str, value) -> None:
        # a value changed later (e.g. ``convert --voltage``) is checked as one given at construction
        if key in OPTICS_LIMITS and "extra" in self.__dict__:
            problems = value_problems({key: value}, OPTICS_LIMITS)
            if problems:
                raise InvalidValue(f"optics group {self.name}", problems[0][1], (key,))
        object.__setattr__(self, key, value)

    def __post_init__(self) -> None:
        problems = value_problems({k: getattr(self, k) for k in OPTICS_LIMITS}, OPTICS_LIMITS)
        if problems:
            raise InvalidValue(f"optics group {self.name}", "; ".join(t for _, t in problems),
                               tuple(f for f, _ in problems))


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
        problems = self.problems()
        if problems:
            raise InvalidValue("particle set", "; ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency of the set (empty list: none): lengths that differ, bad optics indices.

        >>> ParticleSet(params=empty_params(3), optics=[Optics(1.0)], optics_group=np.array([0, 0]))
        Traceback (most recent call last):
        ...
        cistem_mpi.io.params.InvalidValue: particle set: optics_group has 2 rows for 3 particles
        """
        out = []
        p = self.params
        if not isinstance(p, np.ndarray) or p.ndim != 1 or p.dtype.names is None \
                or not set(PAR_COLUMNS) <= set(p.dtype.names):
            return ["params must be a 1-D structured array with the .par columns (PARAM_DTYPE)"]
        n = len(p)
        if not self.optics or not all(isinstance(o, Optics) for o in self.optics):
            out.append("optics must be a non-empty list of Optics")
        g = np.asarray(self.optics_group)
        if g.shape != (n,):
            out.append(f"optics_group has {g.size} rows for {n} particles")
        elif n and self.optics and (g.min() < 0 or g.max() >= len(self.optics)):
            out.append(f"optics_group refers to group index {int(g.max() if g.max() >= len(self.optics) else g.min())}"
                       f" but there are {len(self.optics)} optics groups")
        if self.image_names is not None and len(self.image_names) != n:
            out.append(f"image_names has {len(self.image_names)} entries for {n} particles")
        for k, v in self.extra.items():
            rows = len(v) if hasattr(v, "__len__") else None
            if rows != n:
                out.append(f"extra column {k} has {rows} rows for {n} particles")
        return out

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
