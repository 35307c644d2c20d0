"""``cistem-mpi report``: on a project made by small real jobs, with failed and running jobs, moved, in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from cistem_mpi.cli import main
from cistem_mpi.db import jobs as jobs_db
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.simulate import simulate_micrographs, simulate_movies, simulate_particles

import chromium_setup

CLI = [sys.executable, "-m", "cistem_mpi"]
PICK = ["--characteristic-radius", "72.5", "--maximum-radius", "100", "--highest-resolution", "10",
        "--edge", "32", "--threshold", "4"]
N_PARTICLES = 400
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A project made by real jobs: 2 images (find-ctf, find-particles), 1 movie (align-movies),
    400 simulated particles (import, reconstruct, classify-2d)."""
    b = tmp_path_factory.mktemp("report")
    root = b / "proj"
    assert main(["project", "create", str(root)]) == 0
    sim = simulate_micrographs(b / "mic", n_micrographs=2, shape=(512, 512), n_per_micrograph=12, pixel_size=3.0,
                               exposure=50.0, seed=21, physics="realistic", defocus_mean=17500,
                               defocus_spread=2000, astigmatism=200, ice_thickness=250)
    assert main(["import", "images", "-p", str(root), "--pixel-size", "3.0", *map(str, sim.micrographs)]) == 0
    assert main(["find-ctf", "-p", str(root), "--box", "256", "--max-resolution", "8"]) == 0
    assert main(["find-particles", "-p", str(root), *PICK]) == 0
    mov = simulate_movies(b / "mov", 1, (256, 256), 8, 4.0, 1.5, seed=11, formats=("mrc",), ice_sigma=0.05,
                          n_per_micrograph=4)
    assert main(["import", "movies", "-p", str(root), *map(str, mov.movies["mrc"]), "--pixel-size", "1.5",
                 "--dose-per-frame", "4"]) == 0
    assert main(["align-movies", "-p", str(root)]) == 0
    sp = simulate_particles(b / "data", n_particles=N_PARTICLES, box=48, pixel_size=3.0, snr=0.5, seed=5)
    assert main(["import", "particles", "-p", str(root), str(sp.stack), "--params", str(sp.par),
                 "--pixel-size", "3.0"]) == 0
    assert main(["reconstruct", "-p", str(root), "--mask-radius", "60"]) == 0
    assert main(["classify-2d", "-p", str(root), "--classes", "3", "--rounds", "1", "--angular-step", "15"]) == 0
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    Project.open(dst).close()  # the first open at the new place records the move
    return dst


class _Links(HTMLParser):
    """Every src/href of a page, the text of its job table rows, and its SVG count."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.rows: list[list[str]] = []
        self.svgs = 0
        self._depth = 0  # <table> nesting
        self._jobs_depth = -1  # depth of the job table (settings tables nest inside its cells)
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key) is not None:
                self.links.append((tag, a[key]))
        if tag == "svg":
            self.svgs += 1
        if tag == "table":
            self._depth += 1
            if a.get("class") == "jobs":
                self._jobs_depth = self._depth
        at_jobs = self._depth == self._jobs_depth
        if at_jobs and tag == "tr":
            self._row = []
        if at_jobs and tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        at_jobs = self._depth == self._jobs_depth
        if at_jobs and tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if at_jobs and tag == "tr" and self._row:
            self.rows.append(self._row)
            self._row = None
        if tag == "table":
            if at_jobs:
                self._jobs_depth = -1
            self._depth -= 1

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(page: Path) -> _Links:
    p = _Links()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def _check_links(report: Path) -> dict[str, int]:
    """Every src/href of every page resolves to a file (relative, no network); returns counts of <img> per page."""
    imgs = {}
    pages = sorted(report.glob("*.html"))
    assert pages
    for page in pages:
        parsed = _parse(page)
        imgs[page.name] = sum(1 for tag, _ in parsed.links if tag == "img")
        for tag, url in parsed.links:
            parts = urlsplit(url)
            assert not parts.scheme and not parts.netloc, f"{page.name}: {url} is not relative"
            assert not url.startswith("/"), f"{page.name}: {url} is absolute"
            target = (page.parent / unquote(parts.path)).resolve()
            assert target.is_file(), f"{page.name}: <{tag}> {url} does not resolve"
        assert "http://" not in page.read_text().replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in page.read_text()
    return imgs


def _report(root: Path, *extra: str) -> Path:
    assert main(["report", "-p", str(root), *extra]) == 0
    return root / "Report"


def _job_ids_and_states(root: Path) -> dict[str, str]:
    with Project.open(root, readonly=True) as p:
        return {str(k): v for k, v in jobs_db.job_states(p.conn).items()}


def test_every_page_written_and_every_link_resolves(built, tmp_path):
    root = _copy(built, tmp_path / "p")
    report = _report(root)
    names = {p.name for p in report.glob("*.html")}
    assert {"index.html", "images_1.html", "ctf.html", "classifications.html", "classification_1.html",
            "refinements.html", "refinement_1.html", "volumes.html"} <= names
    imgs = _check_links(report)
    with Project.open(root, readonly=True) as p:
        n_images = p.conn.execute("SELECT count(*) FROM images").fetchone()[0]
        n_ctf = p.conn.execute("SELECT count(*) FROM ctf_estimates").fetchone()[0]
        n_pick_images = p.conn.execute("SELECT count(DISTINCT image_id) FROM particle_positions").fetchone()[0]
        n_traj = p.conn.execute("SELECT count(*) FROM images WHERE trajectory_path IS NOT NULL").fetchone()[0]
    assert (n_images, n_ctf, n_traj) == (3, 2, 1) and n_pick_images >= 1
    # one image per trajectory, CTF fit and pick overlay that the jobs wrote
    text = (report / "images_1.html").read_text()
    assert imgs["images_1.html"] == n_ctf + n_pick_images + n_traj
    assert text.count("_shifts.png") >= 1 and text.count("_picks.png") >= n_pick_images
    # CTF histograms (defocus, fit resolution, astigmatism) as SVG
    assert _parse(report / "ctf.html").svgs == 3
    bars = [int(n) for n in re.findall(r"<title>[^<]*–[^<]*: (\d+)</title></rect>", (report / "ctf.html").read_text())]
    assert sum(bars) == 3 * n_ctf  # every estimate in each of the three histograms
    # 2D: the gallery PNG and a population chart; populations sum to the particles
    cls = (report / "classification_1.html").read_text()
    assert "class_averages_0001.png" in cls and _parse(report / "classification_1.html").svgs == 1
    pops = [float(x) for x in re.findall(r"<title>class \d+: ([0-9.e+]+)</title>", cls)]
    assert len(pops) == 3 and sum(pops) == pytest.approx(N_PARTICLES)
    # refinement: orth view PNG, FSC and angular distribution of every particle
    ref = (report / "refinement_1.html").read_text()
    assert "OrthViews/volume_1_1.png" in ref and f"({N_PARTICLES} particles)" in ref
    cells = [int(x) for x in re.findall(r"°: (\d+)</title></rect>", ref)]
    assert sum(cells) == N_PARTICLES
    assert ref.count("<polyline") >= 1 and _parse(report / "refinement_1.html").svgs == 2
    with Project.open(root, readonly=True) as p:
        fsc = json.loads(p.conn.execute("SELECT fsc FROM volumes").fetchone()[0])
    # the FSC polyline has one point per shell
    line = re.search(r'<polyline[^>]*points="([^"]+)"><title>half maps</title>', ref).group(1)
    assert len(line.split()) == len(fsc["fsc"])


def test_job_table_lists_every_job(built, tmp_path):
    root = _copy(built, tmp_path / "p")
    rows = _parse(_report(root) / "index.html").rows
    states = _job_ids_and_states(root)
    assert {r[0]: r[2] for r in rows} == states
    assert len(states) == 8 and set(states.values()) == {"finished"}
    types = [r[1] for r in rows]
    assert types[:3] == ["import_images", "find_ctf", "find_particles"] and "classify_2d" in types


def _add_jobs(root: Path) -> dict[str, int]:
    """A failed job, a running job (process alive) and one whose process died."""
    keeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with Project.open(root) as p:
        failed = jobs_db.create_job(p.conn, "find_ctf", {"box": 512}, ranks=3)
        jobs_db.end_job(p.conn, failed, "failed", "Traceback: <boom> & friends")
        running = jobs_db.create_job(p.conn, "auto_refine", {"rounds": 4}, ranks=2)
        p.conn.execute("UPDATE jobs SET pid = ? WHERE id = ?", (keeper.pid, running))
        jobs_db.update_progress(p.conn, running, 3, 10, "round 2 of 4")
        dead = jobs_db.create_job(p.conn, "classify_2d", {}, ranks=1)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        p.conn.execute("UPDATE jobs SET pid = ? WHERE id = ?", (gone.pid, dead))
        p.conn.commit()
    return {"failed": failed, "running": running, "died": dead, "keeper": keeper}


def test_failed_and_running_jobs_render_with_their_state(built, tmp_path):
    root = _copy(built, tmp_path / "p")
    ids = _add_jobs(root)
    try:
        report = _report(root)
        rows = {r[0]: r for r in _parse(report / "index.html").rows}
        assert rows[str(ids["failed"])][2] == "failed" and "<boom> & friends" in rows[str(ids["failed"])][9]
        assert rows[str(ids["running"])][2] == "running" and rows[str(ids["running"])][5] == "3/10"
        assert "round 2 of 4" in rows[str(ids["running"])][9]
        assert rows[str(ids["died"])][2] == "died"
        assert rows[str(ids["failed"])][3] == "3"
        assert len(rows) == 11
        assert "Jobs are running" in (report / "index.html").read_text()
        _check_links(report)

        # --watch keeps remaking the report while the job runs and stops once it no longer does
        watch = subprocess.Popen(CLI + ["report", "-p", str(root), "--watch", "0.3"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        first = (report / "index.html").stat().st_mtime_ns
        while (report / "index.html").stat().st_mtime_ns == first and time.time() < deadline:
            time.sleep(0.2)
        assert watch.poll() is None, watch.communicate()
        ids["keeper"].kill()
        ids["keeper"].wait()
        out, err = watch.communicate(timeout=60)
        assert watch.returncode == 0, err
        lines = out.splitlines()
        assert len(lines) >= 2 and "(jobs running)" in lines[0] and "(jobs running)" not in lines[-1]
        rows = {r[0]: r for r in _parse(report / "index.html").rows}
        assert rows[str(ids["running"])][2] == "died"
    finally:
        ids["keeper"].kill()


def test_moved_project_report_still_resolves_and_long_lists_are_paged(built, tmp_path):
    root = _copy(built, tmp_path / "a" / "p")
    report = _report(root, "--page-size", "1")
    assert sorted(p.name for p in report.glob("images_*.html")) == ["images_1.html", "images_2.html",
                                                                    "images_3.html"]
    assert 'href="images_3.html"' in (report / "images_1.html").read_text()
    moved = tmp_path / "elsewhere" / "q"
    moved.parent.mkdir()
    shutil.move(str(root), moved)
    imgs = _check_links(moved / "Report")  # the old report, not remade
    assert sum(imgs.values()) >= 5
    _report(moved)  # remade at the new place: the extra pages of the paged run are gone
    assert sorted(p.name for p in (moved / "Report").glob("images_*.html")) == ["images_1.html"]
    _check_links(moved / "Report")


@pytest.mark.parametrize("argv, where", [(["--page-size", "0"], "--page-size"), (["--watch", "-1"], "--watch"),
                                         (["--watch", "nan"], "--watch")])
def test_bad_options_one_line_error(built, tmp_path, capsys, argv, where):
    root = _copy(built, tmp_path / "p")
    assert main(["report", "-p", str(root), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {where}:")
    assert not (root / "Report").exists()


def test_not_a_project(tmp_path, capsys):
    assert main(["report", "-p", str(tmp_path / "nothing")]) == 2
    assert "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the browser
_CHECK = """<script>window.addEventListener("load", () => {
  const bad = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  document.body.setAttribute("data-broken", JSON.stringify(bad));
  document.body.setAttribute("data-images", String(document.images.length));
});</script></body>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    path, why = chromium_setup.ensure()
    if path is None:
        pytest.skip(why)
    return path


def _chromium(exe: str, url: str, *extra: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--hide-scrollbars", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def _browser_check(exe: str, page: Path, profile: Path) -> tuple[list[str], list[str], int]:
    """(console messages of the page, images that did not load, number of images) as Chromium sees them.

    Chromium opens a copy beside the page (same relative paths, every image loaded eagerly) with a script
    that lists the images that did not load; the page has no script of its own, so the probe adds no
    console message and the page's own messages are all that Chromium logs.
    """
    probe = page.with_name(f".probe_{page.name}")
    probe.write_text(page.read_text().replace('loading="lazy"', "").replace("</body>", _CHECK), encoding="utf-8")
    try:
        res = _chromium(exe, probe.as_uri(), "--dump-dom", profile=profile)
    finally:
        probe.unlink()
    assert res.returncode == 0, res.stderr[-2000:]
    console = _console(res.stderr)
    m = re.search(r'data-broken="([^"]*)" data-images="(\d+)"', res.stdout)
    assert m, res.stdout[:2000]
    broken = json.loads(m.group(1).replace("&quot;", '"'))
    return console, broken, int(m.group(2))


@pytest.mark.slow
def test_every_page_loads_in_chromium_with_no_console_errors(built, tmp_path, chromium):
    root = _copy(built, tmp_path / "p")
    ids = _add_jobs(root)  # failed, running and died jobs render too
    try:
        report = _report(root)
    finally:
        ids["keeper"].kill()
    profile = Path(tempfile.mkdtemp(prefix="cistem-chromium-"))
    try:
        # the checks can fail: a console error and a missing image are seen
        bad = report / "zz_bad.html"
        bad.write_text('<!DOCTYPE html><html><body><img src="missing.png">'
                       '<script>console.error("broken page")</script></body></html>')
        console, broken, n = _browser_check(chromium, bad, profile)
        assert any("broken page" in c for c in console) and broken == ["missing.png"] and n == 1
        bad.unlink()

        total = 0
        for page in sorted(report.glob("*.html")):
            console, broken, n = _browser_check(chromium, page, profile)
            assert console == [], (page.name, console)
            assert broken == [], (page.name, broken)
            total += n
        assert total >= 8
        # the job table as the browser builds it
        res = _chromium(chromium, (report / "index.html").as_uri(), "--dump-dom", profile=profile)
        dom_rows = re.findall(r"<tr><td class=\"num\">(\d+)</td>", res.stdout)
        assert sorted(map(int, dom_rows)) == sorted(map(int, _job_ids_and_states(root)))

        DOCS.mkdir(exist_ok=True)
        for page, shot, size in (("index.html", "report_index.png", "1280,900"),
                                 ("refinement_1.html", "report_refinement.png", "1280,720")):
            out = tmp_path / shot
            res = _chromium(chromium, (report / page).as_uri(), f"--screenshot={out}", f"--window-size={size}",
                            profile=profile)
            assert res.returncode == 0 and out.stat().st_size > 10_000, res.stderr[-2000:]
            assert _console(res.stderr) == []
            shutil.copy(out, DOCS / shot)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
