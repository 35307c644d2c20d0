"""tests/data/PROVENANCE.md stays true: every bundled file is listed, with its size and SHA-256."""

from __future__ import annotations

import hashlib
import re

ROW = re.compile(r"^\| `([^`]+)` \|.*\| (\d+) \| ([0-9a-f]{64}) \|$")


def _rows(test_data) -> dict[str, tuple[int, str]]:
    text = (test_data / "PROVENANCE.md").read_text(encoding="utf-8")
    return {m[1]: (int(m[2]), m[3]) for m in map(ROW.match, text.splitlines()) if m}


def test_every_bundled_file_is_listed_with_its_size_and_sha256(test_data):
    rows = _rows(test_data)
    on_disk = sorted(p.relative_to(test_data).as_posix() for p in test_data.rglob("*")
                     if p.is_file() and p.name != "PROVENANCE.md")
    assert on_disk and sorted(rows) == on_disk
    for name, (size, sha) in rows.items():
        data = (test_data / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha), name


def test_bundled_data_stays_small(test_data):
    total = sum(p.stat().st_size for p in test_data.rglob("*") if p.is_file())
    assert total < 30 * 2**20
