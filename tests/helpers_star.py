"""Reading a STAR loop by plain text splitting: the independent reference the reader tests compare with."""

from __future__ import annotations


def star_loop(path, block: str) -> tuple[list[str], list[list[str]]]:
    """Labels and rows of loop ``data_<block>``: the file's text split on whitespace."""
    labels: list[str] = []
    rows: list[list[str]] = []
    inside = False
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("data_"):
            if inside:
                break
            inside = s == f"data_{block}"
            continue
        if not inside or not s or s.startswith("#") or s == "loop_":
            continue
        if s.startswith("_"):
            labels.append(s.split()[0][1:])
        else:
            rows.append(s.split())
    assert labels, f"no data_{block} loop in {path}"
    return labels, rows
