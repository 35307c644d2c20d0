"""Progress: rate over a window, ETA, throttled plain lines, terminal bar only on a TTY."""

from __future__ import annotations

import io

import pytest

from cistem_mpi.drivers.runtime.progress import Progress, format_duration, format_rate


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration_and_rate():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(86400 + 61) == "1d 0:01:01"
    assert format_duration(None) == "?" and format_duration(float("inf")) == "?"
    assert format_rate(250.4) == "250/s"
    assert format_rate(12.34) == "12.3/s"
    assert format_rate(0.5) == "30.0/min"
    assert format_rate(None) == "?/s"


def test_rate_and_eta_from_known_timeline():
    clock = Clock()
    p = Progress("particles", stream=None, clock=clock, window=60)
    p.update(0, 1000)
    assert p.rate() is None and p.eta() is None
    clock.t += 10
    p.update(100, 1000)  # 10 tasks/s
    assert p.rate() == pytest.approx(10.0)
    assert p.eta() == pytest.approx(90.0)
    # speed doubles; after the window forgets the old samples the rate follows
    for _ in range(12):
        clock.t += 10
        p.update(p.done + 200, 1000 * 10)
    assert p.rate() == pytest.approx(20.0)
    snap = p.snapshot()
    assert snap["done"] == p.done and snap["rate"] == pytest.approx(20.0)
    assert snap["eta_s"] == pytest.approx((10000 - p.done) / 20.0, rel=1e-6)


def test_plain_lines_are_throttled_first_and_last_always():
    clock = Clock()
    out = io.StringIO()
    p = Progress("tasks", stream=out, clock=clock, interval=10.0)
    lines = []
    for done in range(0, 101):
        clock.t += 0.5  # 2 tasks/s -> 50 s total
        lines.append(p.update(done, 100))
    due = [x for x in lines if x is not None]
    # first, then one per 10 s of the 50 s, then the final line
    assert due[0].startswith("tasks 0/100 (0.0%)")
    assert due[-1].startswith("tasks 100/100 (100.0%)") and "ETA 0:00:00" in due[-1]
    assert 5 <= len(due) <= 7
    assert out.getvalue().splitlines() == due  # not a TTY: plain lines, no \r
    assert "\r" not in out.getvalue()
    assert "2.0/s" in due[-1]


def test_bar_only_on_a_tty():
    clock = Clock()
    tty = FakeTTY()
    p = Progress("movies", stream=tty, clock=clock)
    for done in range(0, 11):
        clock.t += 1.0
        p.update(done, 10)
    text = tty.getvalue()
    assert text.count("\r") == 11  # one redraw per update (>= 0.1 s apart)
    assert text.endswith("\n")  # finished bar ends its line
    last = text.split("\r")[-1]
    assert last.startswith("[" + "#" * 30 + "]") and "movies 10/10" in last
    # the returned plain lines are for the log, the TTY only gets the bar
    assert "\nmovies" not in text


def test_restarted_counter_resets_rate():
    clock = Clock()
    p = Progress(stream=None, clock=clock)
    p.update(0, 10)
    clock.t += 1
    p.update(10, 10)
    clock.t += 1
    p.update(0, 10)  # next iteration
    assert p.rate() is None
    clock.t += 2
    p.update(2, 10)
    assert p.rate() == pytest.approx(1.0)
