"""Progress of a job on rank 0: tasks done/total, rate, ETA.

A progress bar on a terminal (stderr is a TTY), plain lines otherwise (job
logs, ``sbatch`` output files), and a snapshot dict for the job record so
``cistem-mpi status`` can show progress from another shell.

Example
-------
>>> p = Progress("particles", stream=None)
>>> line = p.update(0, 1000)       # first call: always a line
>>> line.startswith("particles 0/1000")
True
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Callable, TextIO


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS`` (days as ``Nd H:MM:SS``); ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf") or seconds < 0:
        return "?"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h}:{m:02d}:{s:02d}" if d else f"{h}:{m:02d}:{s:02d}"


def format_rate(rate: float | None) -> str:
    """Tasks per second with sensible precision (per minute when slow)."""
    if rate is None:
        return "?/s"
    if rate >= 100:
        return f"{rate:.0f}/s"
    if rate >= 1:
        return f"{rate:.1f}/s"
    if rate > 0:
        return f"{rate * 60:.1f}/min"
    return "0/s"


class Progress:
    """Rate/ETA bookkeeping and display of ``done/total``.

    Parameters
    ----------
    label : str
        What is counted (``tasks``, ``particles``, ``movies``).
    stream : text stream or None
        Where to draw: a bar if it is a TTY, plain lines (when due) if not.
        None draws nothing (the caller logs the returned lines).
    interval : float
        Seconds between plain lines (the first and the last are always due).
    window : float
        Seconds of history the rate is measured over (adapts to speed changes).
    clock : callable
        Time source (tests inject a fake clock).
    tty : bool or None
        Force TTY mode on/off (default: ``stream.isatty()``).
    """

    def __init__(
        self,
        label: str = "tasks",
        stream: TextIO | None = sys.stderr,
        interval: float = 10.0,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
        width: int = 30,
    ):
        self.label = label
        self.stream = stream
        self.interval = interval
        self.window = window
        self.clock = clock
        self.width = width
        if tty is None:
            try:
                tty = bool(stream is not None and stream.isatty())
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.t0 = clock()
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._last_line_t: float | None = None
        self._last_bar_t = -1e300
        self._bar_drawn = False
        self.done = 0
        self.total = 0
        self.message = ""

    # ------------------------------------------------------------------ numbers
    def rate(self) -> float | None:
        """Tasks per second over the last ``window`` seconds (None before 2 samples)."""
        if len(self._samples) < 2:
            return None
        t1, d1 = self._samples[-1]
        t0, d0 = self._samples[0]
        if t1 - t0 <= 0:
            return None
        return (d1 - d0) / (t1 - t0)

    def eta(self) -> float | None:
        """Seconds to go at the current rate (0 when done, None if unknown)."""
        if self.total and self.done >= self.total:
            return 0.0
        r = self.rate()
        if not r or r <= 0:
            return None
        return (self.total - self.done) / r

    def snapshot(self) -> dict:
        """Numbers for the job record: done, total, rate (1/s), eta_s, elapsed_s, message."""
        r = self.rate()
        e = self.eta()
        return {
            "done": self.done,
            "total": self.total,
            "rate": None if r is None else round(r, 4),
            "eta_s": None if e is None else round(e, 1),
            "elapsed_s": round(self.clock() - self.t0, 1),
            "message": self.message,
        }

    def line(self) -> str:
        """``label done/total (pct%) rate ETA h:mm:ss [message]``."""
        pct = 100.0 * self.done / self.total if self.total else 0.0
        text = (
            f"{self.label} {self.done}/{self.total} ({pct:.1f}%) "
            f"{format_rate(self.rate())} ETA {format_duration(self.eta())}"
        )
        return f"{text} {self.message}".rstrip()

    def bar(self) -> str:
        """The one-line terminal bar."""
        frac = self.done / self.total if self.total else 0.0
        fill = int(round(frac * self.width))
        return f"[{'#' * fill}{'.' * (self.width - fill)}] {self.line()}"

    # ------------------------------------------------------------------ updates
    def update(self, done: int, total: int, message: str = "") -> str | None:
        """Record progress; draw; return a plain line when one is due, else None.

        A line is due on the first call, when ``done == total``, and then
        every ``interval`` seconds.
        """
        now = self.clock()
        self.done, self.total = int(done), int(total)
        if message:
            self.message = message
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()  # counter restarted (next iteration): rate from scratch
        self._samples.append((now, self.done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        finished = bool(total) and done >= total
        due = self._last_line_t is None or finished or now - self._last_line_t >= self.interval
        if self.stream is not None and self.tty:
            if finished or now - self._last_bar_t >= 0.1:
                self.stream.write("\r" + self.bar() + ("\n" if finished else ""))
                self.stream.flush()
                self._bar_drawn = not finished
                self._last_bar_t = now
        if not due:
            return None
        self._last_line_t = now
        text = self.line()
        if self.stream is not None and not self.tty:
            self.stream.write(text + "\n")
            self.stream.flush()
        return text

    def close(self) -> None:
        """End a bar that was left unfinished (so the next output starts on a new line)."""
        if self.stream is not None and self.tty and self._bar_drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_drawn = False
