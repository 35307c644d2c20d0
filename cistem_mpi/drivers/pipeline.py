"""``cistem-mpi pipeline``: the whole chain, from movies to a refined map, in one command.

align-movies -> find-ctf -> find-particles -> package create --from-positions
-> classify-2d -> automatic class selection -> package create
--from-classification -> ab-initio -> auto-refine.

Every step is an ordinary recorded job, run as a child process
``[mpiexec -n R] cistem-mpi <job> ...`` so that it gets the normal job
lifecycle (record, log, scratch, all-or-nothing registration); the pipeline
process itself never opens MPI and writes nothing to the database.  It reads
the database (``db/pipeline.py``) to know what finished:

* a step is **skipped** when the newest finished job of its type was run with
  the arguments the pipeline would give it now (the settings of the
  ``--config`` file plus the ids of its inputs, e.g. ``--images 3 4`` or
  ``--package 2``) and after the job that made those inputs;
* a step whose newest matching job died, failed or was cancelled is run
  again; an iterative step (classify-2d, ab-initio, auto-refine) whose
  checkpoints survive continues with ``--resume JOB``.

So rerunning a killed chain continues where it stopped, and separately launched
parts of the chain (``--from STEP --until STEP``, one Slurm job each:
``jobscripts/slurm_pipeline.sh``) hand their results on through the database:
a step's inputs are the outputs of the newest finished job of the step before.
A per-item step (align-movies, find-ctf, find-particles) can also run as a
Slurm job array: ``--array-prepare DIR`` plans the step's job into DIR (or notes
that it finished already), ``--array-run DIR`` computes one array task's share
(no database access), ``--array-merge DIR`` registers the step's one job.  A
failing step stops
the chain with the step named (exit status of the step's job); every step
before it stays registered.

Settings: a TOML file, one table per step, the step's command-line options as
keys (``cistem-mpi pipeline --print-config`` prints every key with its
default and meaning).  Unknown keys, missing values and type errors are one
line naming the key (exit 2, nothing run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cistem_mpi.db import jobs as jobs_db
from cistem_mpi.db import pipeline as pdb
from cistem_mpi.db.classification import auto_selected_classes
from cistem_mpi.db.project import Project
from cistem_mpi.errors import CistemError, InputError


class StepFailed(CistemError):
    """A step's job failed: the chain stops with that step named."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


#: Options of every job that the pipeline sets itself or that belong to one invocation.
_PER_RUN = frozenset({"project", "resume", "keep_scratch", "debug", "func", "array_prepare", "array_run",
                      "array_merge", "array_task", "array_count"})
#: Recorded arguments ignored when comparing a finished job with what would run (a job registered by
#: an array merge, ``--array-merge DIR``, counts as the same step as one run in one piece).
_IGNORED = frozenset({"project", "resume", "keep_scratch", "debug", "func", "array_prepare", "array_run",
                      "array_merge", "array_task", "array_count"})
#: Steps that can run as a Slurm job array (per-item jobs: ``--array-prepare/--array-run/--array-merge``).
ARRAY_STEPS = ("align-movies", "find-ctf", "find-particles")
#: The file in an array directory that tells the array tasks and the merge which job to run.
ARRAY_STEP_FILE = "pipeline-step.json"


@dataclass(frozen=True)
class Step:
    """One step of the chain.

    ``command`` is the CLI words before the options; ``controlled`` the
    option destinations the pipeline fills in (inputs) and that are therefore
    no config keys; ``where`` tells this step's jobs from other jobs of the
    same type (the two ``package create`` steps).
    """

    name: str
    command: tuple[str, ...]
    job_type: str | None
    controlled: frozenset[str] = frozenset()
    where: Callable[[dict[str, Any]], bool] | None = None
    iterative: bool = False
    help: str = ""


_PACKAGE_SOURCES = frozenset({"from_refinement", "from_stack", "from_classification", "from_positions", "keep",
                              "map", "select", "positions_job"})

STEPS: tuple[Step, ...] = (
    Step("align-movies", ("align-movies",), "align_movies", frozenset({"movies", "realign"}),
         help="align every movie of the project (dose-weighted sums become the images)"),
    Step("find-ctf", ("find-ctf",), "find_ctf", frozenset({"images"}),
         help="CTF of the images that align-movies made (all images when the chain starts here)"),
    Step("find-particles", ("find-particles",), "find_particles", frozenset({"images"}),
         help="pick the particles on the images that find-ctf estimated"),
    Step("package-positions", ("package", "create"), "create_package",
         _PACKAGE_SOURCES | {"images", "package_command"}, where=lambda a: bool(a.get("from_positions")),
         help="cut the picked particles out (package create --from-positions --positions-job <find-particles job>)"),
    Step("classify-2d", ("classify-2d",), "classify_2d", frozenset({"package"}), iterative=True,
         help="2D classification of that package"),
    Step("select-classes", (), None,
         help="automatic class selection: the classes of classify-2d's final classification to keep"),
    Step("package-classes", ("package", "create"), "create_package",
         _PACKAGE_SOURCES | {"images", "package_command", "box", "protein_is_white"},
         where=lambda a: a.get("from_classification") is not None,
         help="the particles of the selected classes (package create --from-classification N --select ...)"),
    Step("ab-initio", ("ab-initio",), "ab_initio", frozenset({"refinement"}), iterative=True,
         help="ab initio 3D map from the new package"),
    Step("auto-refine", ("auto-refine",), "auto_refine", frozenset({"refinement"}), iterative=True,
         help="auto-refine from the ab-initio refinement"),
)
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in STEPS)
_BY_NAME = {s.name: s for s in STEPS}

#: Keys every job step's table takes beside the job's own options.
_COMMON_KEYS = {"ranks": "MPI ranks of this step's job (default: --ranks; 1 = no mpiexec)"}
#: The keys of the select-classes table: (default, help).
_SELECT_KEYS = {"classes": ("auto", "'auto': the classes classify-2d selected automatically (its ranking); "
                                    "or a list of class numbers, e.g. [1, 4, 7]")}
#: Config keys required when the step runs (the job cannot choose them).
_REQUIRED = {"package-positions": {"box": "the box size in pixels of the cut particles"}}


# ------------------------------------------------------------------ options of each step (from its parser)
@dataclass
class Option:
    """One config key: a job option as the step's parser defines it."""

    key: str  # the long option without "--" (e.g. "max-shift")
    dest: str
    flag: str
    kind: str  # "bool" | "int" | "float" | "str"
    default: Any
    help: str
    nargs: Any = None  # None, an int, "+" / "*"
    choices: tuple[Any, ...] | None = None
    append: bool = False


_PARSERS: dict[tuple[str, ...], argparse.ArgumentParser] = {}
_TOP: dict[str, argparse.ArgumentParser] = {}


def _parser(command: tuple[str, ...]) -> argparse.ArgumentParser:
    """The argparse parser of a job command (built from its driver's ``register``)."""
    if command not in _PARSERS:
        from cistem_mpi.cli import build_parser

        top = _TOP.get(command[0]) or build_parser(command[0])
        _TOP[command[0]] = top
        p: argparse.ArgumentParser = top
        for word in command:
            sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
            p = sub.choices[word]
        _PARSERS[command] = p
    return _PARSERS[command]


def step_options(step: Step) -> dict[str, Option]:
    """The config keys of a job step, in the order of its ``--help``."""
    out: dict[str, Option] = {}
    for act in _parser(step.command)._actions:
        if not act.option_strings or act.dest in _PER_RUN or act.dest in step.controlled or act.dest == "help":
            continue
        if isinstance(act, argparse._SubParsersAction):
            continue
        flag = next((s for s in act.option_strings if s.startswith("--")), act.option_strings[0])
        if isinstance(act, argparse._StoreTrueAction):
            kind = "bool"
        elif act.type is int:
            kind = "int"
        elif act.type is float:
            kind = "float"
        elif act.type is None:
            kind = "str"
        else:  # pragma: no cover - a new option type: tell the developer
            raise TypeError(f"{step.name}: option {flag} has an unsupported type {act.type}")
        default = act.default
        if isinstance(default, tuple):
            default = list(default)
        out[flag[2:]] = Option(flag[2:], act.dest, flag, kind, default, (act.help or "").replace("%%", "%"),
                               None if kind == "bool" else act.nargs,
                               tuple(act.choices) if act.choices is not None else None,
                               isinstance(act, argparse._AppendAction))
    return out


# ------------------------------------------------------------------ config
def _type_name(opt: Option) -> str:
    base = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[opt.kind]
    if opt.append or opt.nargs in ("+", "*"):
        return f"a list of {base.replace('an ', '').replace('a ', '')}s"
    if isinstance(opt.nargs, int):
        return f"a list of {opt.nargs} {base.replace('an ', '').replace('a ', '')}s"
    return base


def _scalar_ok(kind: str, v: Any) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, str)


def _check_value(where: str, opt: Option, v: Any) -> None:
    listy = opt.append or opt.nargs in ("+", "*") or isinstance(opt.nargs, int)
    values = v if listy else [v]
    ok = isinstance(v, list) if listy else True
    if ok and listy and isinstance(opt.nargs, int) and len(v) != opt.nargs:
        ok = False
    if ok and listy and opt.nargs == "+" and not v:
        ok = False
    if ok:
        ok = all(_scalar_ok(opt.kind, x) for x in values)
    if not ok:
        raise _ConfigError(f"{where} {opt.key}: expected {_type_name(opt)}, got {_toml(v)}")
    if opt.choices is not None:
        for x in values:
            if x not in opt.choices:
                raise _ConfigError(f"{where} {opt.key}: {_toml(x)} is not one of {', '.join(map(_toml, opt.choices))}")


class _ConfigError(Exception):
    pass


@dataclass
class Config:
    """Checked settings: per step, the config keys given (``{key: value}``)."""

    path: str | None
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, step: str) -> dict[str, Any]:
        return self.steps.get(step, {})


def _toml_error_line(path: Path, exc: Exception) -> str:
    """One line for a TOML syntax error; names the key when a value is missing."""
    import re

    msg = str(exc)
    m = re.search(r"line (\d+)", msg)
    if m:
        try:
            line = path.read_text(errors="replace").splitlines()[int(m.group(1)) - 1]
        except (OSError, IndexError):
            line = ""
        k = re.match(r"\s*([A-Za-z0-9_.\"'-]+)\s*=\s*(#.*)?$", line)
        if k:
            return f"line {m.group(1)}: {k.group(1)}: missing value"
    return f"not valid TOML: {msg}"


def load_config(path: str | os.PathLike | None, selected: list[Step] | None = None) -> Config:
    """Read and check a pipeline config; any problem is one :class:`InputError` line naming the key.

    Parameters
    ----------
    path : path or None
        The TOML file (None: every default).
    selected : list of Step, optional
        The steps that will run: their required keys must be given.

    Returns
    -------
    Config

    >>> load_config(None).steps
    {}
    """
    import tomllib

    cfg = Config(None if path is None else str(path))
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(p, "pipeline config not found")
        try:
            with open(p, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise InputError(p, _toml_error_line(p, exc)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(p, f"cannot read: {exc}") from None
    src = path if path is not None else "--config"
    try:
        for name, table in data.items():
            if name not in _BY_NAME:
                raise _ConfigError(f"unknown step [{name}] (steps: {', '.join(STEP_NAMES)})")
            if not isinstance(table, dict):
                raise _ConfigError(f"{name}: expected a table [{name}] of settings, got {_toml(table)}")
            step = _BY_NAME[name]
            out: dict[str, Any] = {}
            if step.job_type is None:
                for key, v in table.items():
                    if key not in _SELECT_KEYS:
                        raise _ConfigError(f"[{name}] unknown key '{key}' (keys: {', '.join(_SELECT_KEYS)})")
                    ok = v == "auto" or (isinstance(v, list) and v and all(
                        isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v))
                    if not ok:
                        raise _ConfigError(f"[{name}] {key}: expected \"auto\" or a list of class numbers, "
                                           f"got {_toml(v)}")
                    out[key] = v
            else:
                opts = step_options(step)
                for key, v in table.items():
                    if key == "ranks":
                        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                            raise _ConfigError(f"[{name}] ranks: expected an integer >= 1, got {_toml(v)}")
                        out[key] = v
                        continue
                    opt = opts.get(key) or opts.get(key.replace("_", "-"))
                    if opt is None:
                        why = " (set by the pipeline)" if key.replace("-", "_") in step.controlled else ""
                        raise _ConfigError(f"[{name}] unknown key '{key}'{why} (keys: ranks, {', '.join(opts)})")
                    _check_value(f"[{name}]", opt, v)
                    out[opt.key] = v
            cfg.steps[name] = out
        for step in selected or []:
            for key, what in _REQUIRED.get(step.name, {}).items():
                if key not in cfg.get(step.name):
                    raise _ConfigError(f"[{step.name}] {key}: missing value ({what}; required)")
    except _ConfigError as exc:
        raise InputError(src, str(exc)) from None
    return cfg


def _toml(v: Any) -> str:
    """A value as TOML writes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{...}"
    return repr(v)


def default_config_text() -> str:
    """Every key of every step with its default and meaning, as a TOML file (``--print-config``)."""
    lines = ["# cistem-mpi pipeline settings: one table per step, the step's command-line options as keys.",
             "# Remove the '#' to set a key without a default; keys left out keep the job's default.",
             "# ranks = N in a table runs that step's job on N MPI ranks (default: pipeline --ranks).", ""]
    for step in STEPS:
        lines.append(f"[{step.name}]")
        lines.append(f"# {step.help}")
        if step.job_type is None:
            for key, (default, text) in _SELECT_KEYS.items():
                lines.append(f"# {text}")
                lines.append(f"{key} = {_toml(default)}")
            lines.append("")
            continue
        lines.append(f"# job: cistem-mpi {' '.join(step.command)} (see its --help)")
        lines.append(f"# {_COMMON_KEYS['ranks']}")
        lines.append("# ranks = 1")
        required = _REQUIRED.get(step.name, {})
        for opt in step_options(step).values():
            text = opt.help or opt.key
            if opt.choices is not None:
                text += f" [one of {', '.join(map(_toml, opt.choices))}]"
            lines.append(f"# {text} ({_type_name(opt)})")
            if opt.key in required:
                lines.append(f"# REQUIRED: {required[opt.key]}")
                lines.append(f"# {opt.key} = ")
            elif opt.default is None:
                lines.append(f"# {opt.key} =")
            else:
                lines.append(f"{opt.key} = {_toml(opt.default)}")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------ command lines
def _argv(step: Step, settings: dict[str, Any], inputs: list[str]) -> list[str]:
    """The job's command line (after ``cistem-mpi``) for the given settings and input options."""
    opts = step_options(step)
    argv = [*step.command, *inputs]
    for key, v in settings.items():
        if key == "ranks":
            continue
        opt = opts[key]
        if opt.kind == "bool":
            if v:
                argv.append(opt.flag)
        elif opt.append:
            for x in v:
                argv += [opt.flag, str(x)]
        elif isinstance(v, list):
            argv += [opt.flag, *map(str, v)]
        else:
            argv += [opt.flag, str(v)]
    return argv


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """Recorded (or would-be) job arguments without the per-invocation ones, as JSON sees them."""
    d = json.loads(json.dumps({k: v for k, v in d.items() if k not in _IGNORED and not k.startswith("_")},
                              default=str))
    return d


def would_record(step: Step, argv: list[str], project: str) -> dict[str, Any]:
    """The arguments the step's job would record for ``argv`` (parsed by the CLI's own parser)."""
    _parser(step.command)
    ns = _TOP[step.command[0]].parse_args([*argv, "--project", project])
    return _comparable(vars(ns))


# ------------------------------------------------------------------ running
def _mpiexec(given: str | None) -> list[str]:
    """The launcher's words: ``--mpiexec`` may be a command with options (``"srun --mpi=pmi2"``)."""
    if given:
        import shlex

        words = shlex.split(given)
        if not words:
            raise InputError("--mpiexec", "empty launcher command")
        return words
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if not found:
        raise InputError("--ranks", "more than 1 rank needs mpiexec, which is not on PATH (give --mpiexec)")
    return [found]


def _child_setup() -> None:  # pragma: no cover - runs in the child
    """The child dies with the pipeline (SIGTERM when the pipeline process is killed, even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_child(cmd: list[str]) -> int:
    """Run one step's job; SIGTERM/SIGINT of the pipeline are passed on and waited for."""
    proc = subprocess.Popen(cmd, preexec_fn=_child_setup if sys.platform.startswith("linux") else None)
    old = signal.getsignal(signal.SIGTERM)

    def forward(signum, _frame):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # Ctrl-C reached the child too; let it record itself as cancelled
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass
class Outcome:
    """What happened to one step."""

    step: str
    action: str  # "ran" | "resumed" | "skipped" | "selected"
    job_id: int | None
    seconds: float
    note: str = ""


def _say(text: str) -> None:
    print(f"pipeline: {text}", flush=True)


# ------------------------------------------------------------------ one step as a Slurm job array
def _array_mode(args: argparse.Namespace) -> tuple[str | None, str]:
    """("prepare" | "run" | "merge", array directory) of ``--array-*``, or (None, "")."""
    for mode in ("prepare", "run", "merge"):
        d = getattr(args, f"array_{mode}", None)
        if d:
            return mode, str(Path(d).absolute())
    return None, ""


def _write_array_step(adir: str, step: str, argv: list[str], after: int, skipped: int | None) -> None:
    """Tell the array tasks and the merge the job's command line (or that the step finished already)."""
    d = Path(adir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{ARRAY_STEP_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"step": step, "argv": argv, "after": after, "skipped": skipped}, indent=1))
    os.replace(tmp, d / ARRAY_STEP_FILE)


def _read_array_step(adir: str, step: str | None) -> dict[str, Any]:
    p = Path(adir) / ARRAY_STEP_FILE
    try:
        planned = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(p, "no array step planned here (run the pipeline with --array-prepare DIR first)") from None
    except (OSError, ValueError) as exc:
        raise InputError(p, f"unreadable ({exc})") from None
    if step is not None and planned.get("step") != step:
        raise InputError(p, f"planned for step {planned.get('step')}, not {step}")
    return planned


def _array_task(args: argparse.Namespace, adir: str) -> int:
    """``--array-run DIR``: this Slurm array task's share of the planned job (no database access)."""
    planned = _read_array_step(adir, None)
    if planned.get("skipped") is not None:
        _say(f"{planned['step']}: skipped (finished already as job {planned['skipped']}; nothing to compute)")
        return 0
    root = str(Path(args.project).absolute())
    cmd = [sys.executable, "-m", "cistem_mpi", *planned["argv"], "--project", root, "--array-run", adir]
    _say(f"{planned['step']}: array task: cistem-mpi {' '.join(_short(cmd[3:]))}")
    rc = _run_child(cmd)
    if rc != 0:
        raise StepFailed(f"step {planned['step']}: array task failed (exit status {rc})", rc if rc > 0 else 3)
    return 0


class _Chain:
    """State of one pipeline run: the project, the settings and the job of each step so far."""

    def __init__(self, args: argparse.Namespace, cfg: Config):
        self.args = args
        self.cfg = cfg
        self.root = str(Path(args.project).absolute())
        self.jobs: dict[str, Any] = {}
        self.selected_classes: list[int] | None = None
        self.classification: int | None = None
        self.outcomes: list[Outcome] = []

    # ---- database reads (the project is opened per read: the children write meanwhile)
    def read(self, fn: Callable[[Any], Any]) -> Any:
        with Project.open(self.root, readonly=True) as p:
            return fn(p.conn)

    def upstream(self, name: str) -> Any:
        """The job of step ``name`` in this chain: the one run or skipped now, else the newest finished one."""
        if name in self.jobs:
            return self.jobs[name]
        step = _BY_NAME[name]
        if step.job_type is None:
            return None
        row = self.read(lambda c: pdb.newest_job(c, step.job_type, step.where, status="finished"))
        self.jobs[name] = row
        return row

    # ---- the inputs of each step (options the pipeline fills in)
    def inputs(self, step: Step) -> tuple[list[str], Any]:
        """(input options, the upstream job whose outputs they are, or None)."""
        n = step.name
        if n == "align-movies":
            ids = self.read(pdb.movie_ids)
            if not ids:
                raise InputError(self.root, "no movies in the project (import movies first, or start the chain "
                                            "later with --from)")
            return ["--movies", *map(str, ids)], None
        if n == "find-ctf":
            up = self.upstream("align-movies")
            ids = self.read(lambda c: pdb.images_of_job(c, up["id"])) if up is not None else self.read(pdb.image_ids)
            if not ids:
                raise InputError(self.root, "no images for find-ctf (run align-movies or import images)")
            return ["--images", *map(str, ids)], up
        if n == "find-particles":
            up = self.upstream("find-ctf")
            ids = (self.read(lambda c: pdb.ctf_images_of_job(c, up["id"])) if up is not None
                   else self.read(pdb.images_with_ctf))
            if not ids:
                raise InputError(self.root, "no images with a CTF estimate for find-particles (run find-ctf)")
            return ["--images", *map(str, ids)], up
        if n == "package-positions":
            up = self._need("find-particles", n)
            return ["--from-positions", "--positions-job", str(up["id"])], up
        if n == "classify-2d":
            up = self._need("package-positions", n)
            pkg = self.read(lambda c: pdb.package_of_job(c, up["id"]))
            if pkg is None:
                raise InputError(self.root, f"job {up['id']} registered no refinement package")
            return ["--package", str(pkg)], up
        if n == "package-classes":
            up = self._need("classify-2d", n)
            classes = self.select_classes()
            return ["--from-classification", str(self.classification), "--select", ",".join(map(str, classes))], up
        if n == "ab-initio":
            up = self._need("package-classes", n)
            ref = self.read(lambda c: pdb.refinement_of_job(c, up["id"]))
            if ref is None:
                raise InputError(self.root, f"job {up['id']} registered no refinement")
            return ["--refinement", str(ref)], up
        if n == "auto-refine":
            up = self._need("ab-initio", n)
            ref = self.read(lambda c: pdb.refinement_of_job(c, up["id"]))
            if ref is None:
                raise InputError(self.root, f"job {up['id']} registered no refinement")
            return ["--refinement", str(ref)], up
        raise AssertionError(n)

    def _need(self, name: str, for_step: str) -> Any:
        up = self.upstream(name)
        if up is None:
            raise InputError(self.root, f"step {for_step} needs a finished {name} job (none in the project; "
                                        f"start the chain earlier with --from)")
        return up

    def select_classes(self) -> list[int]:
        """The automatic class selection of classify-2d's final classification (or the config's classes)."""
        if self.selected_classes is not None:
            return self.selected_classes
        up = self._need("classify-2d", "select-classes")
        number = self.read(lambda c: pdb.classification_of_job(c, up["id"]))
        if number is None:
            raise InputError(self.root, f"classify-2d job {up['id']} registered no classification")
        want = self.cfg.get("select-classes").get("classes", "auto")
        if want == "auto":
            classes = self.read(lambda c: auto_selected_classes(c, number))
            if not classes:
                raise StepFailed(f"step select-classes failed: 2D classification #{number} has no automatically "
                                 f"selected class (give [select-classes] classes = [...])", 2)
        else:
            classes = sorted(set(int(x) for x in want))
        self.classification, self.selected_classes = number, classes
        return classes

    # ---- one step
    def run_step(self, step: Step) -> Outcome:
        t0 = time.monotonic()
        if step.job_type is None:  # select-classes
            classes = self.select_classes()
            return Outcome(step.name, "selected", None, time.monotonic() - t0,
                           f"classes {','.join(map(str, classes))} of 2D classification #{self.classification}")
        settings = self.cfg.get(step.name)
        mode, adir = _array_mode(self.args)
        if mode == "merge":  # register exactly what the prepare part planned (and the array computed)
            planned = _read_array_step(adir, step.name)
            argv, after = list(planned["argv"]), int(planned["after"])
            if planned.get("skipped") is not None:
                return Outcome(step.name, "skipped", int(planned["skipped"]), time.monotonic() - t0,
                               f"finished already as job {planned['skipped']} (nothing to merge)")
        else:
            inputs, up = self.inputs(step)
            argv = _argv(step, settings, inputs)
            after = int(up["id"]) if up is not None else 0
        want = would_record(step, argv, self.root)

        def matches(row: Any) -> bool:
            return row is not None and int(row["id"]) > after and _comparable(pdb.job_arguments(row)) == want

        done = self.read(lambda c: pdb.newest_job(c, step.job_type, step.where, status="finished"))
        if matches(done):
            self.jobs[step.name] = done
            if mode == "prepare":  # the array tasks and the merge see this and do nothing
                _write_array_step(adir, step.name, argv, after, skipped=int(done["id"]))
            took = self.read(lambda c: pdb.wall_time(c, done["id"]))
            return Outcome(step.name, "skipped", int(done["id"]), time.monotonic() - t0,
                           f"finished already as job {done['id']}" + (f" ({took:.1f} s)" if took else ""))
        resume: int | None = None
        last = self.read(lambda c: pdb.newest_job(c, step.job_type, step.where))
        if matches(last) and last["status"] != "finished":
            state = jobs_db.liveness(last)
            if state in ("running", "stalled?"):
                raise StepFailed(f"step {step.name}: job {last['id']} with these settings is still running "
                                 f"(wait for it, or stop it)", 2)
            ck = Path(last["scratch_path"] or "") / "checkpoints"
            if step.iterative and last["scratch_path"] and ck.is_dir() and any(ck.iterdir()):
                resume = int(last["id"])
        cmd_words = argv + ["--project", self.root] + (["--resume", str(resume)] if resume else [])
        ranks = int(settings.get("ranks", self.args.ranks))
        if mode is not None:  # array parts run on one rank each (the array gives the parallelism)
            cmd_words += [f"--array-{mode}", adir]
            ranks = 1
        cmd = [sys.executable, "-m", "cistem_mpi", *cmd_words]
        if ranks > 1:
            cmd = [*_mpiexec(self.args.mpiexec), "-n", str(ranks), *cmd]
        what = f"resuming job {resume}" if resume else "running"
        _say(f"{step.name}: {what} on {ranks} rank(s): cistem-mpi {' '.join(_short(cmd_words))}")
        before = self.read(lambda c: (pdb.newest_job(c, step.job_type) or {"id": 0})["id"])
        rc = _run_child(cmd)
        seconds = time.monotonic() - t0
        if mode == "prepare":
            if rc != 0:
                raise StepFailed(f"step {step.name} failed: its array plan was refused (exit status {rc}); "
                                 f"the steps before it are registered", rc if rc > 0 else 3)
            _write_array_step(adir, step.name, argv, after, skipped=None)
            return Outcome(step.name, "prepared", None, seconds, f"array plan in {adir}")
        job = self.read(lambda c: pdb.newest_job(c, step.job_type, step.where))
        job = job if job is not None and int(job["id"]) > int(before) else None
        if rc != 0:
            if job is None:
                why = "its command was refused (bad input; nothing recorded)"
            else:
                why = f"job {job['id']} {job['status']}" + (f": {job['error']}" if job["error"] else "")
            raise StepFailed(f"step {step.name} failed after {seconds:.1f} s: {why} (exit status {rc}); "
                             f"the steps before it are registered", rc if rc > 0 else 3)
        if job is None or job["status"] != "finished":  # pragma: no cover - exit 0 without a finished job
            raise StepFailed(f"step {step.name}: the job exited 0 but recorded no finished job", 3)
        self.jobs[step.name] = job
        return Outcome(step.name, "resumed" if resume else "ran", int(job["id"]), seconds, f"job {job['id']}")



def _short(words: list[str], limit: int = 8) -> list[str]:
    """A command line with long id lists shortened for the terminal."""
    out: list[str] = []
    run: list[str] = []
    for w in words + ["--"]:
        if w.isdigit():
            run.append(w)
            continue
        if run:
            out += run if len(run) <= limit else [*run[:3], f"...({len(run)} ids)", run[-1]]
            run = []
        out.append(w)
    return out[:-1]


def _selection(args: argparse.Namespace) -> list[Step]:
    first = STEP_NAMES.index(args.from_step) if args.from_step else 0
    last = STEP_NAMES.index(args.until_step) if args.until_step else len(STEPS) - 1
    if first > last:
        raise InputError("--from", f"step {args.from_step} comes after --until {args.until_step}")
    return list(STEPS[first:last + 1])


def run(args: argparse.Namespace) -> int:
    """``cistem-mpi pipeline``: check the settings, then run (or skip) every selected step."""
    if args.print_config:
        sys.stdout.write(default_config_text() + "\n")
        return 0
    if args.project is None:
        raise InputError("--project", "give the project directory (-p DIR)")
    if args.ranks < 1:
        raise InputError("--ranks", f"must be at least 1, got {args.ranks}")
    mode, adir = _array_mode(args)
    if mode == "run":
        return _array_task(args, adir)
    steps = _selection(args)
    if mode is not None and (len(steps) != 1 or steps[0].name not in ARRAY_STEPS):
        raise InputError(f"--array-{mode}", f"select exactly one of the steps {', '.join(ARRAY_STEPS)} "
                                            f"(--from STEP --until STEP)")
    cfg = load_config(args.config, steps)
    if args.print_steps:  # for jobscripts/slurm_pipeline.sh: one line per step, its name and ranks
        for step in steps:
            print(step.name, 0 if step.job_type is None else int(cfg.get(step.name).get("ranks", args.ranks)))
        return 0
    with Project.open(args.project, readonly=True):  # a clear error for a missing project, before anything
        pass
    chain = _Chain(args, cfg)
    t0 = time.monotonic()
    _say(f"steps {steps[0].name} .. {steps[-1].name} on {Path(args.project).absolute()}")
    for step in steps:
        out = chain.run_step(step)
        chain.outcomes.append(out)
        _say(f"{step.name}: {out.action} in {out.seconds:.1f} s ({out.note})")
    _say("summary:")
    for o in chain.outcomes:
        job = f"job {o.job_id}" if o.job_id is not None else "-"
        print(f"  {o.step:<18} {o.action:<9} {job:<9} {o.seconds:8.1f} s", flush=True)
    print(f"  {'total':<18} {'':<9} {'':<9} {time.monotonic() - t0:8.1f} s", flush=True)
    final = chain.jobs.get("auto-refine")
    if final is not None:
        res = chain.read(lambda c: pdb.resolution_of_job(c, final["id"]))
        if res is not None:
            _say(f"final resolution: {res:.2f} Å (auto-refine job {final['id']})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pipeline``."""
    p = sub.add_parser("pipeline", help="the whole chain: movies -> CTF -> picks -> 2D classes -> ab initio -> "
                                        "auto-refine, each step a recorded job; rerun = resume",
                       description="Run the chain align-movies -> find-ctf -> find-particles -> package from positions "
                                   "-> classify-2d -> automatic class selection -> package from the selected classes "
                                   "-> ab-initio -> auto-refine on a project, each step an ordinary recorded job. "
                                   "A step that already finished with the same inputs and settings is skipped, so a "
                                   "rerun continues a killed chain (iterative steps with --resume).")
    p.add_argument("--project", "-p", help="project directory")
    p.add_argument("--config", "-c", metavar="TOML", help="settings, one table per step (see --print-config)")
    p.add_argument("--from", dest="from_step", choices=STEP_NAMES, metavar="STEP",
                   help=f"start at this step ({', '.join(STEP_NAMES)})")
    p.add_argument("--until", dest="until_step", choices=STEP_NAMES, metavar="STEP", help="stop after this step")
    p.add_argument("--ranks", "-n", type=int, default=1,
                   help="MPI ranks of each step's job (a step's 'ranks' key overrides it; 1 = no mpiexec)")
    p.add_argument("--mpiexec", metavar="PATH", help="MPI launcher (default: mpiexec beside python, else on PATH)")
    p.add_argument("--print-config", action="store_true",
                   help="print every setting with its default and meaning (a config to start from) and exit")
    p.add_argument("--print-steps", action="store_true",
                   help="check the config, print the selected steps and their ranks (one 'STEP RANKS' line each; "
                        "0 = no job) and exit (used by jobscripts/slurm_pipeline.sh)")
    arr = p.add_argument_group("one per-item step as a Slurm job array (see jobscripts/slurm_pipeline.sh)")
    mode = arr.add_mutually_exclusive_group()
    mode.add_argument("--array-prepare", metavar="DIR",
                      help="plan the selected step's job into DIR (or note there that it finished already)")
    mode.add_argument("--array-run", metavar="DIR", help="compute this Slurm array task's share of the planned job")
    mode.add_argument("--array-merge", metavar="DIR", help="register the array's results as the step's job")
    p.set_defaults(func=run)
