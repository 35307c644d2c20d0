"""``cistem-mpi report -p DIR``: a static HTML report of the project in ``DIR/Report``.

Pages: ``index.html`` (summary and every job with status, ranks, wall time
and settings), ``images_<k>.html`` (per image: motion trajectory, CTF fit,
pick overlay; 100 images a page), ``ctf.html`` (defocus and fit-resolution
histograms), ``classification_<n>.html`` (2D class gallery and populations),
``refinements.html`` (resolution and occupancy per round) and
``refinement_<id>.html`` (orth views, FSC, angular distribution per class).

The PNGs that jobs already wrote are linked with paths relative to the
report, so a moved or copied project's report still opens; charts are inline
SVG.  No scripts, no network.  The database is opened read-only, so the
report can be made while jobs run (``--watch N`` remakes it every N seconds
until no job is running).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cistem_mpi.db import report as report_db
from cistem_mpi.db.project import Project
from cistem_mpi.errors import InputError
from cistem_mpi.io import report_html as H

REPORT_DIR = "Report"
PICK_DIR = "Assets/ParticlePosition"
#: Particles drawn at most in one angular-distribution chart (a random subset beyond).
MAX_ANGULAR = 200_000
_SLICE = 1_000_000


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` command."""
    p = sub.add_parser("report", help="write a static HTML report of the project into <project>/Report")
    p.add_argument("--project", "-p", required=True, help="project directory")
    p.add_argument("--page-size", type=int, default=100, help="images per page of the image list (default 100)")
    p.add_argument("--watch", type=float, metavar="N",
                   help="remake the report every N seconds while a job is running, then once more and stop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report (and with ``--watch``, keep it up to date while jobs run)."""
    if args.page_size < 1:
        raise InputError("--page-size", f"must be at least 1, got {args.page_size}")
    if args.watch is not None and not (args.watch > 0 and np.isfinite(args.watch)):
        raise InputError("--watch", f"must be a positive number of seconds, got {args.watch}")
    root = Path(args.project)
    if not root.is_dir():
        raise InputError(root, "no such project directory")
    while True:
        index, running = write_report(root, page_size=args.page_size)
        print(f"report: {index}" + (" (jobs running)" if running else ""), flush=True)
        if args.watch is None or not running:
            return 0
        time.sleep(args.watch)


# ----------------------------------------------------------------------------- the report
class _Writer:
    """Collects pages; writes each one atomically and removes pages of an earlier report that are gone."""

    def __init__(self, project: Project, out: Path, generated: str, nav: list[tuple[str, str]]):
        self.project, self.out, self.generated, self.nav = project, out, generated, nav
        self.written: set[str] = set()
        self.picks: dict[str, Path] | None = None

    def link(self, stored: str | None) -> str | None:
        """A stored asset path as a URL relative to the report (None when the file is missing)."""
        if not stored:
            return None
        return H.rel_link(self.project.resolve(str(stored)), self.out)

    def write(self, name: str, title: str, body: str) -> None:
        H.write_page(self.out / name, H.page(title, body, self.nav, self.generated))
        self.written.add(name)

    def prune(self) -> None:
        for p in self.out.glob("*.html"):
            if p.name not in self.written:
                p.unlink(missing_ok=True)


def write_report(root: str | Path, page_size: int = 100) -> tuple[Path, bool]:
    """Write every page of the report; return the index path and whether a job is still running.

    Parameters
    ----------
    root : path
        Project directory.
    page_size : int
        Images per page of the image list.

    Returns
    -------
    (Path, bool)
        ``<project>/Report/index.html`` and True while some job is running.

    >>> write_report("/no/such/project")  # doctest: +SKIP
    """
    with Project.open(root, readonly=True) as project:
        conn = project.conn
        jobs = report_db.jobs(conn)
        counts = report_db.counts(conn)
        images = report_db.images(conn)
        classifications = report_db.classifications(conn)
        refinements = report_db.refinements(conn)
        packages = {p["id"]: p for p in report_db.refinement_packages(conn)}
        volumes = report_db.volumes(conn)
        running = report_db.any_job_running(conn)
        out = project.root / REPORT_DIR
        try:
            out.mkdir(exist_ok=True)
            probe = out / f".write_test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise InputError(out, f"cannot write the report here ({exc.strerror or exc})") from exc
        n_pages = max(1, -(-len(images) // page_size))
        nav = [("Jobs", "index.html"), ("Images", "images_1.html"), ("CTF", "ctf.html"),
               ("2D classes", "classifications.html"), ("Refinements", "refinements.html"),
               ("Volumes", "volumes.html")]
        generated = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        w = _Writer(project, out, generated, nav)
        w.write("index.html", f"Project {project.name}", _index(jobs, counts, running, classifications, refinements))
        for k in range(1, n_pages + 1):
            chunk = images[(k - 1) * page_size:k * page_size]
            w.write(f"images_{k}.html", f"Images (page {k} of {n_pages})",
                    _images_page(w, chunk, k, n_pages, len(images), (k - 1) * page_size))
        w.write("ctf.html", "CTF estimates", _ctf_page(images))
        w.write("classifications.html", "2D classifications", _classifications_index(classifications))
        for c in classifications:
            w.write(f"classification_{c['number']}.html", f"2D classification #{c['number']}",
                    _classification_page(w, c))
        w.write("refinements.html", "Refinements", _refinements_index(refinements))
        for r in refinements:
            w.write(f"refinement_{r['id']}.html", _refinement_title(r), _refinement_page(w, r, packages))
        w.write("volumes.html", "Volumes", _volumes_page(w, volumes))
        w.prune()
        return out / "index.html", running


def _status(s: str) -> str:
    return f'<span class="st-{H.esc(s.rstrip("?"))}">{H.esc(s)}</span>'


def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _settings(d: dict[str, Any]) -> str:
    if not d:
        return '<span class="muted">-</span>'
    shown = {k: v for k, v in d.items() if k not in ("func", "project")}
    rows = [[H.esc(k), H.esc(json.dumps(v, default=str) if not isinstance(v, str) else v)]
            for k, v in sorted(shown.items())]
    return f"<details><summary>{len(rows)} settings</summary>{H.table(['setting', 'value'], rows)}</details>"


def _index(jobs: list[dict], counts: dict[str, int], running: bool, classifications: list[dict],
           refinements: list[dict]) -> str:
    summary = H.table(["asset", "count"], [[H.esc(k.replace("_", " ")), str(v)] for k, v in counts.items()], [1])
    links = []
    if classifications:
        c = classifications[-1]
        links.append(f'<a href="classification_{c["number"]}.html">newest 2D classification (#{c["number"]})</a>')
    if refinements:
        r = refinements[-1]
        links.append(f'<a href="refinement_{r["id"]}.html">newest refinement ({r["id"]})</a>')
    if links:
        summary += "<p>" + " · ".join(links) + "</p>"
    states: dict[str, int] = {}
    for j in jobs:
        states[j["shown_status"]] = states.get(j["shown_status"], 0) + 1
    line = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no jobs yet"
    rows = []
    for j in jobs:
        prog = f"{j['progress_done']}/{j['progress_total']}" if j["progress_total"] else "-"
        note = ""
        if j["shown_status"] in ("failed", "cancelled", "died") and j.get("error"):
            note = f"<pre>{H.esc(j['error'])}</pre>"
        elif j["shown_status"] == "died":
            note = "process gone without finishing (killed?)"
        elif j["shown_status"] == "running" and j.get("progress_message"):
            note = H.esc(j["progress_message"])
        rows.append([str(j["id"]), H.esc(j["type"]), _status(j["shown_status"]), H.fmt(j["ranks"]),
                     H.duration(j["wall_time"]), prog, H.esc(_when(j["started_at"])), H.esc(j.get("host") or "-"),
                     _settings(j["settings"]), note])
    jobs_table = H.table(["id", "type", "status", "ranks", "wall time", "progress", "started", "host", "settings",
                          "error / message"], rows, [0, 3, 4], cls="jobs")
    live = '<p class="st-running">Jobs are running: this report is a snapshot.</p>' if running else ""
    return (f"{live}<h2>Assets</h2>{summary}<h2>Jobs ({len(jobs)}: {H.esc(line)})</h2>{jobs_table}")


def _images_page(w: _Writer, chunk: list[dict], k: int, n_pages: int, total: int, first: int) -> str:
    if not total:
        return '<p class="muted">No images in this project.</p>'
    rows = []
    for i, im in enumerate(chunk, first + 1):
        traj = w.link(im.get("trajectory_path"))
        ctf = w.link(im.get("diagnostic_path"))
        picks = _pick_png(w, im)
        df = (f"{(im['df1'] + im['df2']) / 2:.0f} Å<br>astig {abs(im['df1'] - im['df2']):.0f} Å<br>"
              f"angle {im['angast']:.1f}°") if im.get("df1") is not None else "-"
        fit = H.fmt(im.get("fit_resolution")) + (" Å" if im.get("fit_resolution") is not None else "")
        if im.get("poor_fit"):
            fit += ' <span class="st-failed">poor fit</span>'
        rows.append([str(i), H.esc(im["name"]), H.img(traj, "trajectory"), H.img(ctf, "CTF fit"), df, fit,
                     H.img(picks, "picks"), H.fmt(im.get("n_picks"))])
    return (f"<p>{total} images; {len(chunk)} on this page.</p>" + H.pager(n_pages, k, "images")
            + H.table(["#", "image", "motion trajectory", "CTF fit", "defocus", "fit resolution", "picks", "n picks"],
                      rows, [0, 4, 5, 7]) + H.pager(n_pages, k, "images"))


def _pick_png(w: _Writer, im: dict) -> str | None:
    """find-particles writes ``Assets/ParticlePosition/find_particles_<run>/<image>_picks.png`` (newest run)."""
    if not im.get("n_picks"):
        return None
    if w.picks is None:  # one scan of the folder for the whole report, newest file per image name
        w.picks = {}
        found = sorted((w.project.root / PICK_DIR).glob("find_particles_*/*_picks.png"),
                       key=lambda p: p.stat().st_mtime)
        for p in found:
            w.picks[p.name[:-len("_picks.png")]] = p
    png = w.picks.get(str(im["name"]))
    return H.rel_link(png, w.out) if png is not None else None


def _ctf_page(images: list[dict]) -> str:
    fitted = [im for im in images if im.get("df1") is not None]
    if not fitted:
        return '<p class="muted">No CTF estimates yet.</p>'
    defocus = [(im["df1"] + im["df2"]) / 2 / 1e4 for im in fitted]
    res = [im["fit_resolution"] for im in fitted if im.get("fit_resolution") is not None]
    astig = [abs(im["df1"] - im["df2"]) for im in fitted]
    poor = sum(1 for im in fitted if im.get("poor_fit"))
    stats = H.table(["", "min", "median", "max"], [
        ["mean defocus (µm)"] + [f"{f(defocus):.3f}" for f in (np.min, np.median, np.max)],
        ["astigmatism (Å)"] + [f"{f(astig):.0f}" for f in (np.min, np.median, np.max)],
    ] + ([["fit resolution (Å)"] + [f"{f(res):.2f}" for f in (np.min, np.median, np.max)]] if res else []),
        [1, 2, 3])
    charts = (f'<div class="charts"><div class="card">{H.svg_histogram(defocus, "Mean defocus", "defocus (µm)")}'
              f'</div><div class="card">{H.svg_histogram(res, "Fit resolution", "resolution (Å)")}</div>'
              f'<div class="card">{H.svg_histogram(astig, "Astigmatism", "|DF1 − DF2| (Å)")}</div></div>')
    return (f"<p>{len(fitted)} of {len(images)} images have a CTF estimate; {poor} flagged as poor fits. "
            f'Per-image fits are on the <a href="images_1.html">image pages</a>.</p>{stats}{charts}')


def _classifications_index(classifications: list[dict]) -> str:
    if not classifications:
        return '<p class="muted">No 2D classifications yet.</p>'
    rows = [[f'<a href="classification_{c["number"]}.html">#{c["number"]}</a>', H.esc(c.get("package_name") or "-"),
             H.fmt(c["n_classes"]), H.fmt(c.get("iteration")), H.fmt(c.get("resolution_limit")),
             str(sum(1 for k in c["classes"] if k.get("selected"))), str(c["job_id"])] for c in classifications]
    return H.table(["classification", "package", "classes", "round", "resolution limit (Å)", "selected", "job"],
                   rows, [2, 3, 4, 5, 6])


def _classification_page(w: _Writer, c: dict) -> str:
    gallery = w.link(str(Path(c["path"]).with_suffix(".png"))) if c.get("path") else None
    classes = c["classes"]
    rows = [[str(k["class_number"]), H.fmt(k["population"], 0), H.fmt(k.get("resolution")), H.fmt(k.get("score"), 3),
             H.fmt(k.get("rank")), "yes" if k.get("selected") else ""] for k in classes]
    chart = H.svg_bars([str(k["class_number"]) for k in classes], [k["population"] for k in classes],
                       "Class populations", "particles")
    return (f"<p>Package {H.esc(c.get('package_name') or '-')}, {c['n_classes']} classes, round "
            f"{H.fmt(c.get('iteration'))}, job {c['job_id']}.</p>"
            f"<h2>Class averages (by population)</h2>{H.img(gallery, 'class gallery', 'big')}"
            f'<h2>Populations</h2><div class="charts"><div class="card">{chart}</div><div>'
            + H.table(["class", "population", "resolution (Å)", "score", "rank", "selected"], rows, [0, 1, 2, 3, 4])
            + "</div></div>")


def _refinement_title(r: dict) -> str:
    return f"Refinement {r['id']} ({r['kind']}, round {r['round']}) of {r.get('package_name') or 'package'}"


def _refinements_index(refinements: list[dict]) -> str:
    if not refinements:
        return '<p class="muted">No refinements yet.</p>'
    rows = []
    by_package: dict[str, list[dict]] = {}
    for r in refinements:
        by_package.setdefault(r.get("package_name") or str(r["package_id"]), []).append(r)
        res = ", ".join(H.fmt(_resolution(c)) for c in r["classes"])
        occ = ", ".join(H.fmt(c.get("occupancy"), 1) for c in r["classes"])
        rows.append([f'<a href="refinement_{r["id"]}.html">{r["id"]}</a>', H.esc(r.get("package_name") or "-"),
                     H.esc(r["kind"]), str(r["round"]), str(r["n_classes"]), res, occ, str(r["job_id"])])
    charts = []
    for name, rs in by_package.items():
        n_cls = max(len(r["classes"]) for r in rs)
        steps = list(range(1, len(rs) + 1))
        res_series, occ_series = {}, {}
        for c in range(n_cls):
            xs, ys, os_ = [], [], []
            for s, r in zip(steps, rs):
                if c < len(r["classes"]):
                    xs.append(s)
                    ys.append(_resolution(r["classes"][c]))
                    os_.append(r["classes"][c].get("occupancy"))
            res_series[f"class {c + 1}"] = (xs, ys)
            occ_series[f"class {c + 1}"] = (xs, os_)
        ticks = [(s, str(r["id"])) for s, r in zip(steps, rs)]
        every = max(1, -(-len(ticks) // 12))
        ticks = ticks[::every]
        res_chart = H.svg_lines(res_series, f"{name}: resolution", "refinement", "Å", markers=True, xticks=ticks)
        occ_chart = H.svg_lines(occ_series, f"{name}: occupancy", "refinement", "%", markers=True, xticks=ticks)
        charts.append(f'<div class="card">{res_chart}</div><div class="card">{occ_chart}</div>')
    return (H.table(["refinement", "package", "kind", "round", "classes", "resolution (Å)", "occupancy (%)", "job"],
                    rows, [0, 3, 4, 7]) + '<h2>Per round</h2><div class="charts">' + "".join(charts) + "</div>")


def _resolution(c: dict) -> float | None:
    """A refinement class's resolution, else that of its reconstructed volume (a start refinement has none)."""
    if c.get("resolution") is not None:
        return c["resolution"]
    return (c.get("volume") or {}).get("resolution")


def _fsc_chart(fsc_json: str | None, title: str) -> str:
    if not fsc_json:
        return '<p class="muted">no FSC recorded</p>'
    try:
        d = json.loads(fsc_json)
    except ValueError:
        return '<p class="muted">FSC unreadable</p>'
    f = d.get("frequency") or []
    labels = {"fsc": "half maps", "fsc_unmasked": "half maps, unmasked"}
    series = {labels[k]: (f, d[k]) for k in labels if d.get(k)}
    return H.svg_lines(series, title, "spatial frequency (1/Å)", "FSC", hlines=(0.143, 0.5), y_range=(-0.1, 1.05))


def _angular(w: _Writer, params_path: str | None, title: str) -> str:
    from cistem_mpi.io.param_store import read_params_h5

    if not params_path:
        return '<p class="muted">no parameters</p>'
    path = w.project.resolve(params_path)
    if not path.is_file():
        return f'<p class="muted">parameter file missing: {H.esc(params_path)}</p>'
    theta, phi, occ = [], [], []
    try:  # slice by slice, keeping three columns: ten million particles stay ~120 MB
        start = 0
        while True:
            p = read_params_h5(path, start, start + _SLICE)
            if len(p) == 0:
                break
            theta.append(p["theta"].astype(np.float32))
            phi.append(p["phi"].astype(np.float32))
            occ.append(p["occ"].astype(np.float32))
            start += len(p)
    except Exception as exc:  # a report must render whatever state a file is in
        return f'<p class="muted">cannot read {H.esc(params_path)}: {H.esc(exc)}</p>'
    if not theta:
        return '<p class="muted">no particles</p>'
    th, ph, oc = np.concatenate(theta), np.concatenate(phi), np.concatenate(occ)
    if (oc > 0).any():  # particles with zero occupancy are not in the map
        th, ph = th[oc > 0], ph[oc > 0]
    if len(th) > MAX_ANGULAR:
        pick = np.random.default_rng(0).choice(len(th), MAX_ANGULAR, replace=False)
        th, ph = th[pick], ph[pick]
    return H.svg_angular(th, ph, title)


def _refinement_page(w: _Writer, r: dict, packages: dict[int, dict]) -> str:
    pkg = packages.get(r["package_id"], {})
    parts = [f"<p>Package {H.esc(r.get('package_name') or '-')} ({H.fmt(pkg.get('n_particles'))} particles, symmetry "
             f"{H.esc(pkg.get('symmetry') or '-')}, pixel size {H.fmt(pkg.get('pixel_size'), 3)} Å); kind "
             f"{H.esc(r['kind'])}, round {r['round']}, job {r['job_id']}"
             + (f', parent <a href="refinement_{r["parent_id"]}.html">{r["parent_id"]}</a>' if r.get("parent_id") else "")
             + ".</p>"]
    rows = [[str(c["class_number"]), H.fmt(c.get("resolution")), H.fmt(c.get("occupancy"), 1),
             H.esc(c["volume"]["display_name"]) if c.get("volume") else "-",
             H.fmt((c.get("volume") or {}).get("resolution"))] for c in r["classes"]]
    parts.append(H.table(["class", "resolution (Å)", "occupancy (%)", "volume", "volume resolution (Å)"], rows,
                         [0, 1, 2, 4]))
    for c in r["classes"]:
        v = c.get("volume") or {}
        orth = w.link(str(Path(v["orth_view"]).with_suffix(".png"))) if v.get("orth_view") else None
        fsc = c.get("fsc") or v.get("fsc")
        parts.append(f"<h2>Class {c['class_number']}</h2>" + '<div class="charts">'
                     f'<div class="card">{H.img(orth, "orth view", "big")}</div>'
                     f'<div class="card">{_fsc_chart(fsc, "Class %d: FSC" % c["class_number"])}</div>'
                     f'<div class="card">{_angular(w, c.get("params_path"), "Angular distribution")}</div></div>')
    return "".join(parts)


def _volumes_page(w: _Writer, volumes: list[dict]) -> str:
    if not volumes:
        return '<p class="muted">No volumes yet.</p>'
    parts = []
    for v in volumes:
        orth = w.link(str(Path(v["orth_view"]).with_suffix(".png"))) if v.get("orth_view") else None
        ref = (f' (<a href="refinement_{v["refinement_id"]}.html">refinement {v["refinement_id"]}</a>)'
               if v.get("refinement_id") else "")
        parts.append(f"<h2>{H.esc(v['display_name'])}</h2><p>{H.esc(v['kind'])}, box {v['box']}, "
                     f"{H.fmt(v['pixel_size'], 3)} Å/px, resolution {H.fmt(v.get('resolution'))} Å, job {v['job_id']}"
                     f'{ref}; file <code>{H.esc(v["path"])}</code></p><div class="charts">'
                     f'<div class="card">{H.img(orth, "orth view", "big")}</div>'
                     f'<div class="card">{_fsc_chart(v.get("fsc"), "FSC")}</div></div>')
    return "".join(parts)
