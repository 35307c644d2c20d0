"""``cistem-mpi import``: movies, images, CTF estimates, particle positions, particle stacks, volumes.

Imported files stay where they are (their absolute paths are recorded, as
cisTEM does); everything is checked before anything is registered, so a bad
file leaves the database exactly as it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cistem_mpi.db import assets as assets_db
from cistem_mpi.db import naming
from cistem_mpi.drivers.jobrun import JobContext, add_job_arguments, run_job
from cistem_mpi.drivers.options import add_contrast_arguments
from cistem_mpi.errors import InputError
from cistem_mpi.io.parameter_files import (
    PIXEL_SIZE_TOLERANCE, check_header_pixel_size, read_particle_params, stack_protein_is_white,
)

def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``import`` command."""
    p = sub.add_parser("import", help="import movies, images, CTF estimates, particle positions, particle stacks "
                                      "(+ .par/.star) or volumes")
    isub = p.add_subparsers(dest="what", metavar="<what>", required=True)

    def optics(q: argparse.ArgumentParser, required: bool) -> None:
        q.add_argument("--pixel-size", type=float, required=required, help="Å per pixel")
        q.add_argument("--voltage", type=float, default=300.0, help="kV (default 300)")
        q.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm (default 2.7)")
        q.add_argument("--amplitude-contrast", type=float, default=0.07, help="fraction (default 0.07)")

    m = isub.add_parser("movies", help="movie files (MRC, TIFF incl. LZW, EER)")
    add_job_arguments(m)
    m.add_argument("files", nargs="+")
    optics(m, required=True)
    m.add_argument("--dose-per-frame", type=float, required=True, help="e-/Å² per frame")
    m.add_argument("--gain", help="gain reference (MRC, TIFF or DM4)")
    m.add_argument("--gain-rotate", type=int, default=0, choices=(0, 90, 180, 270), help="rotate gain (degrees)")
    m.add_argument("--gain-flip-x", action="store_true")
    m.add_argument("--gain-flip-y", action="store_true")
    m.add_argument("--eer-fractions", type=int, help="EER: group frames into this many fractions")
    m.add_argument("--eer-upsampling", type=int, default=1, choices=(1, 2, 4))
    m.set_defaults(func=lambda a: run_job(a, "import_movies", _import_movies))

    i = isub.add_parser("images", help="micrographs (MRC)")
    add_job_arguments(i)
    i.add_argument("files", nargs="+")
    optics(i, required=False)
    i.set_defaults(func=lambda a: run_job(a, "import_images", _import_images))

    c = isub.add_parser("ctf", help="CTF estimates of imported images (RELION micrographs_ctf.star, CTFFIND .txt)")
    add_job_arguments(c)
    c.add_argument("files", nargs="+", help="RELION micrographs_ctf.star or CTFFIND4/5 output .txt files")
    c.add_argument("--image", help="image (name or id) for a file that names no micrograph (one file only)")
    c.set_defaults(func=lambda a: run_job(a, "import_ctf", _import_ctf))

    q = isub.add_parser("positions",
                        help="particle positions on imported images (RELION coordinate/particle .star, .box, x y text)")
    add_job_arguments(q)
    q.add_argument("files", nargs="+", help="RELION autopick/particle .star or coordinate-file list, "
                                            ".box, or text with x y in pixels (0 = first pixel)")
    q.add_argument("--image", help="image (name or id) for a file that names no micrograph (one file only)")
    q.set_defaults(func=lambda a: run_job(a, "import_positions", _import_positions))

    s = isub.add_parser("particles", help="a particle stack with .par/.star parameters -> refinement package")
    add_job_arguments(s)
    s.add_argument("stack", help="MRC particle stack (.mrcs/.mrc)")
    s.add_argument("--params", action="append", required=True,
                   help="Frealign X .par, cisTEM or RELION .star, cryoSPARC .cs; repeat once per class")
    optics(s, required=False)
    add_contrast_arguments(s)
    s.add_argument("--symmetry", default="C1")
    s.add_argument("--name", help="refinement package name (default: stack file name)")
    s.add_argument("--molecular-weight", type=float, help="kDa")
    s.add_argument("--largest-dimension", type=float, help="Å")
    s.set_defaults(func=lambda a: run_job(a, "import_particles", _import_particles))

    v = isub.add_parser("volume", help="a 3D map (MRC)")
    add_job_arguments(v)
    v.add_argument("file")
    v.add_argument("--pixel-size", type=float)
    v.add_argument("--name", help="display name (default: file name)")
    v.set_defaults(func=lambda a: run_job(a, "import_volume", _import_volume))


def protein_is_white_for(a: dict, params: list[Path]) -> bool:
    """The contrast of a stack imported with parameter files ``params`` (:func:`stack_protein_is_white`)."""
    return stack_protein_is_white(a.get("protein_is_white"), params)


def _existing(path: str) -> Path:
    p = Path(path).absolute()
    if not p.is_file():
        raise InputError(p, "file not found")
    return p


# --------------------------------------------------------------------- movies
def _import_movies(ctx: JobContext) -> dict:
    if not ctx.is_controller:
        return {}
    from cistem_mpi.io.gain import read_gain
    from cistem_mpi.io.movies import open_movie

    a = ctx.args
    gain = None
    if a["gain"]:
        gain_path = _existing(a["gain"])
        gain = read_gain(gain_path, rotate=a["gain_rotate"] // 90, flip_x=a["gain_flip_x"], flip_y=a["gain_flip_y"])
    files = [_existing(f) for f in a["files"]]
    _no_duplicates(ctx, files, "movies")
    for n, path in enumerate(files, 1):
        movie = open_movie(path, eer_fractions=a["eer_fractions"], eer_upsampling=a["eer_upsampling"])
        try:
            n_frames = len(movie)
            ny, nx = movie.shape[-2:]
        finally:
            close = getattr(movie, "close", None)
            if close:
                close()
        if gain is not None and gain.shape != (ny, nx):
            raise InputError(a["gain"], f"gain reference is {gain.shape[1]}x{gain.shape[0]} but movie {path} is {nx}x{ny}")
        ctx.register(
            "movies", path=str(path), name=path.stem, n_frames=n_frames, nx=nx, ny=ny,
            pixel_size=a["pixel_size"], voltage=a["voltage"], cs=a["cs"],
            amplitude_contrast=a["amplitude_contrast"], dose_per_frame=a["dose_per_frame"],
            gain_path=str(_existing(a["gain"])) if a["gain"] else None,
        )
        ctx.progress(n, len(files))
    return {"movies": len(files)}


# --------------------------------------------------------------------- images
def _import_images(ctx: JobContext) -> dict:
    if not ctx.is_controller:
        return {}
    from cistem_mpi.io.mrc import open_stack

    a = ctx.args
    files = [_existing(f) for f in a["files"]]
    _no_duplicates(ctx, files, "images")
    for n, path in enumerate(files, 1):
        with open_stack(path, pixel_size=a["pixel_size"]) as img:
            if len(img) != 1:
                raise InputError(path, f"expected one image, found {len(img)} sections")
            ny, nx = img.shape[-2:]
            pixel_size = _pixel_size(path, img.header.pixel_size, a["pixel_size"])
        ctx.register(
            "images", path=str(path), name=path.stem, nx=nx, ny=ny, pixel_size=pixel_size,
            voltage=a["voltage"], cs=a["cs"], amplitude_contrast=a["amplitude_contrast"],
        )
        ctx.progress(n, len(files))
    return {"images": len(files)}


def _no_duplicates(ctx: JobContext, files: list[Path], table: str) -> None:
    """The same file twice on the command line, or a file already imported: an InputError."""
    seen: dict[str, Path] = {}
    for path in files:
        key = str(path.resolve())
        if key in seen:
            raise InputError(path, "given twice on the command line")
        seen[key] = path
    assert ctx.project is not None
    known = {str(ctx.project.resolve(path).resolve()): row_id
             for row_id, path in assets_db.registered_paths(ctx.project.conn, table)}
    for key, path in seen.items():
        if key in known:
            raise InputError(path, f"already imported (as {table[:-1]} #{known[key]})")


def _pixel_size(path: Path, from_file: float | None, from_user: float | None) -> float:
    """The pixel size to use; a user's value wins over an unset header (0 or 1)."""
    if from_user is not None:
        if from_user <= 0:
            raise InputError("--pixel-size", f"must be positive, got {from_user}")
        return float(from_user)
    if from_file is None or from_file <= 0 or abs(from_file - 1.0) < 1e-6:
        raise InputError(path, "header has no usable pixel size; give --pixel-size")
    return float(from_file)


# ------------------------------------------------- CTF estimates and positions
class ImageIndex:
    """Find the project's image a CTF or coordinate file speaks of.

    A micrograph named in the file (RELION ``rlnMicrographName``, CTFFIND's
    input file) matches the image whose name is the file name without its
    extension (``import images`` names images so).  A file that names no
    micrograph (a per-micrograph autopick ``.star``, ``.box`` or text file)
    matches the image whose name is the longest prefix of the file's name
    followed by ``_``, ``.`` or ``-`` (``mic_0001_autopick.star`` ->
    ``mic_0001``), or the image given with ``--image``.
    """

    def __init__(self, conn, forced: str | None = None):
        self.rows = assets_db.image_rows(conn)
        self.by_name: dict[str, list[int]] = {}
        for i, r in self.rows.items():
            self.by_name.setdefault(r["name"], []).append(i)
        self.forced = self._forced(forced) if forced else None

    def _forced(self, key: str):
        if key.isdigit() and int(key) in self.rows:
            return self.rows[int(key)]
        return self._unique(key, "--image") or self._fail("--image", f"no image '{key}' in this project")

    @staticmethod
    def _fail(where, problem):
        raise InputError(where, problem)

    def _unique(self, name: str, where):
        ids = self.by_name.get(name, [])
        if len(ids) > 1:
            raise InputError(where, f"{len(ids)} images are named '{name}'; give --image with the image id")
        return self.rows[ids[0]] if ids else None

    def named(self, micrograph: str, source: Path):
        """The image for a micrograph named in ``source`` (None if no image has that name)."""
        name = Path(micrograph.replace("\\", "/")).name
        stem = name.rsplit(".", 1)[0] if "." in name else name
        return self._unique(stem, source) or (self._unique(name, source) if stem != name else None)

    def for_file(self, source: Path):
        """The image of a file that names no micrograph (by its file name)."""
        stem = source.name
        best = None
        for name in self.by_name:
            if stem.startswith(name) and (len(stem) == len(name) or stem[len(name)] in "_.-"):
                if best is None or len(name) > len(best):
                    best = name
        if best is None:
            raise InputError(source, "names no micrograph and no image name starts its file name; give --image")
        return self._unique(best, source)

    def image_of(self, micrograph: str, source: Path):
        """The image an entry of ``source`` belongs to (None: a micrograph that is not in the project)."""
        if self.forced is not None:
            return self.forced
        return self.named(micrograph, source) if micrograph else self.for_file(source)


def _entries_with_images(ctx: JobContext, read) -> tuple[list[tuple[Path, list]], list[str]]:
    """Every input file's entries (``read(path)``) paired with their images, checked before anything is
    registered; entries on micrographs that are not images of the project are left out and returned."""
    a = ctx.args
    assert ctx.project is not None
    files = [_existing(f) for f in a["files"]]
    if a.get("image") and len(files) > 1:
        raise InputError("--image", "give one file with --image")
    index = ImageIndex(ctx.project.conn, a.get("image"))
    out, skipped = [], []
    for path in files:
        pairs = []
        for entry in read(path):
            img = index.image_of(entry.micrograph, path)
            if img is None:
                skipped.append(entry.micrograph)
            else:
                pairs.append((entry, img))
        if not pairs:
            raise InputError(path, "none of its micrographs is an image of this project (import the images first)")
        out.append((path, pairs))
    return out, skipped


def _import_ctf(ctx: JobContext) -> dict:
    if not ctx.is_controller:
        return {}
    from cistem_mpi.io.ctf_estimates import read_ctf_estimates

    files, skipped = _entries_with_images(ctx, read_ctf_estimates)
    imported = 0
    for n, (path, pairs) in enumerate(files, 1):
        for est, img in pairs:
            if not (np.isfinite(est.df1) and np.isfinite(est.df2) and est.df1 > 0 and est.df2 > 0):
                raise InputError(path, f"defocus of {est.micrograph or img['name']} is not positive: "
                                       f"{est.df1}, {est.df2} Å")
            ctx.register("ctf_estimates", image_id=int(img["id"]), df1=float(est.df1), df2=float(est.df2),
                         angast=float(est.angast), pshift=float(est.pshift),
                         fit_resolution=_finite_or_none(est.fit_resolution), score=_finite_or_none(est.score))
            imported += 1
        ctx.progress(n, len(files))
    if skipped:
        ctx.log.warning("%d CTF estimate(s) for micrographs that are not images of this project were left out "
                        "(first: %s)", len(skipped), skipped[0])
    return {"ctf_estimates": imported, "skipped": len(skipped)}


def _finite_or_none(v: float) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _import_positions(ctx: JobContext) -> dict:
    if not ctx.is_controller:
        return {}
    from cistem_mpi.io.coordinates import read_coordinates

    files, skipped = _entries_with_images(ctx, read_coordinates)
    total, per_image = 0, {}
    for n, (path, pairs) in enumerate(files, 1):
        for picks, img in pairs:
            nx, ny, ps = int(img["nx"]), int(img["ny"]), float(img["pixel_size"])
            outside = (picks.x < 0) | (picks.x > nx - 1) | (picks.y < 0) | (picks.y > ny - 1)
            if outside.any():
                k = int(np.argmax(outside))
                raise InputError(path, f"particle {k + 1} at ({picks.x[k]:.1f}, {picks.y[k]:.1f}) px lies outside "
                                       f"image {img['name']} ({nx}x{ny}); wrong image or binned coordinates?")
            # stored in Å from the first pixel, as cisTEM stores positions
            rows = [(float(x) * ps, float(y) * ps, _finite_or_none(s))
                    for x, y, s in zip(picks.x, picks.y, picks.score)]
            ctx.register_many("particle_positions", ("x", "y", "peak"), rows, image_id=int(img["id"]))
            per_image[img["name"]] = per_image.get(img["name"], 0) + len(rows)
            total += len(rows)
        ctx.progress(n, len(files))
    if skipped:
        ctx.log.warning("positions on %d micrograph(s) that are not images of this project were left out "
                        "(first: %s)", len(skipped), skipped[0])
    ctx.log.info("%d particle positions on %d image(s)", total, len(per_image))
    return {"positions": total, "images": len(per_image), "skipped_micrographs": len(skipped)}


# ------------------------------------------------------------------ particles
def _import_particles(ctx: JobContext) -> dict:
    if not ctx.is_controller:
        return {}
    from cistem_mpi.io.mrc import open_stack
    from cistem_mpi.io.par import write_par
    from cistem_mpi.io.param_store import write_params_h5
    from cistem_mpi.io.star import write_cistem_star

    a = ctx.args
    assert ctx.project is not None
    stack_path = _existing(a["stack"])
    with open_stack(stack_path, pixel_size=a["pixel_size"]) as stack:
        n, ny, nx = len(stack), stack.shape[-2], stack.shape[-1]
        header_ps = stack.header.pixel_size
    if nx != ny:
        raise InputError(stack_path, f"particle images must be square, got {nx}x{ny}")
    sets = [read_particle_params(_existing(p), a["pixel_size"], n, (a["voltage"], a["cs"], a["amplitude_contrast"]))
            for p in a["params"]]
    # classes are matched by stack position, whatever the row order of each file
    sets = [s.take(np.argsort(s.params["position"], kind="stable")) for s in sets]
    for p, s in zip(a["params"], sets):
        if len(s) != len(sets[0]) or not np.array_equal(s.params["position"], sets[0].params["position"]):
            raise InputError(p, f"lists other particles than {a['params'][0]} (classes must cover the same particles)")
    pixel_size = a["pixel_size"] or float(sets[0].optics[0].pixel_size)
    for p, s in zip(a["params"], sets):
        for o in s.optics:
            if abs(o.pixel_size - pixel_size) > PIXEL_SIZE_TOLERANCE:
                raise InputError(p, f"pixel size {o.pixel_size} Å does not match {pixel_size} Å")
        for o in s.optics:  # RELION's box size must be the stack's
            size = o.extra.get("rlnImageSize") if o.extra else None
            if size is not None and int(float(size)) != nx:
                raise InputError(p, f"_rlnImageSize is {int(float(size))} but the stack's images are {nx}x{ny}")
    if a["pixel_size"] is None:
        # header and metadata disagree: an error unless the pixel size is given explicitly
        check_header_pixel_size(stack_path, header_ps, pixel_size)
    white = protein_is_white_for(a, [Path(p) for p in a["params"]])
    if white:
        ctx.log.info("%s: protein white (RELION's convention%s): images are inverted when read", stack_path.name,
                     "" if a.get("protein_is_white") else "; --protein-is-dark if not")
    optics = sets[0].optics[0]
    conn = ctx.project.conn
    run = naming.next_refinement_run(conn)
    stack_row = ctx.register(
        "particle_stacks", path=str(stack_path), name=stack_path.stem, n_particles=n, box=nx, pixel_size=pixel_size,
        voltage=optics.voltage, cs=optics.cs, amplitude_contrast=optics.amplitude_contrast,
        protein_is_white=int(white),
    )
    n_classes = len(sets)
    package = ctx.register(
        "refinement_packages", name=a["name"] or stack_path.stem, stack_id=stack_row, n_classes=n_classes,
        symmetry=a["symmetry"].upper(), molecular_weight=a["molecular_weight"],
        largest_dimension=a["largest_dimension"], n_particles=len(sets[0]),
    )
    refinement = ctx.register("refinements", package_id=package, kind="start", round=0, n_classes=n_classes)
    occ = np.stack([s.params["occ"] for s in sets])
    best_class = occ.argmax(axis=0) + 1
    param_dir = ctx.project.root / naming.ASSET_DIRS["parameters"]
    for c, s in enumerate(sets, 1):
        base = param_dir / f"params_{run}_{c}"
        param_dir.mkdir(parents=True, exist_ok=True)
        write_params_h5(ctx.stage(base.with_suffix(".h5")), s.params,
                        {"pixel_size": pixel_size, "symmetry": a["symmetry"]})
        write_par(ctx.stage(base.with_suffix(".par")), s.params)
        write_cistem_star(ctx.stage(base.with_suffix(".star")), s)
        ctx.register("refinement_classes", refinement_id=refinement, class_number=c,
                     params_path=base.with_suffix(".h5"), occupancy=float(s.params["occ"].mean()))
    _register_members(ctx, package, sets[0].params["position"], best_class)
    ctx.progress(1, 1)
    return {"particles": len(sets[0]), "classes": n_classes, "refinement_run": run, "protein_is_white": white}


def _register_members(ctx: JobContext, package, positions: np.ndarray, classes: np.ndarray) -> None:
    # the package uses the imported stack itself: position and parent position are both the stack position
    rows = zip(positions.tolist(), positions.tolist(), classes.tolist())
    ctx.register_many("refinement_package_members", ("position", "parent_position", "class_number"), rows,
                      package_id=package)


# --------------------------------------------------------------------- volume
def _import_volume(ctx: JobContext) -> dict:
    if not ctx.is_controller:
        return {}
    from cistem_mpi.io.mrc import read_mrc

    a = ctx.args
    path = _existing(a["file"])
    data, header_ps = read_mrc(path, pixel_size=a["pixel_size"])
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(path, f"expected a cubic 3D map, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise InputError(path, "map contains NaN or infinite values")
    pixel_size = _pixel_size(path, header_ps, a["pixel_size"])
    ctx.register("volumes", path=str(path), display_name=a["name"] or path.stem, kind="imported",
                 box=int(data.shape[0]), pixel_size=pixel_size)
    return {"volume": str(path)}

