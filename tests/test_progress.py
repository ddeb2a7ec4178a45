"""Progress where no bar can be drawn (stderr a pipe or a file, as under pytest's capture): plain lines
on long work, nothing on short work, nothing in quiet mode or under CI."""

from __future__ import annotations

import pytest

from sleigh import progress as progress_mod
from sleigh.progress import progress


def _work(n: int, **kw) -> None:
    with progress("export", n, **kw) as bar:
        for _ in range(n):
            bar.advance()


def test_long_work_reports_in_lines_and_at_its_end(monkeypatch, capsys):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(progress_mod, "LINE_EVERY_S", 0.0)  # every advance is "long enough"
    _work(4)
    lines = capsys.readouterr().err.splitlines()
    assert [l.split(",")[0] for l in lines] == ["export: 1/4 (25 %)", "export: 2/4 (50 %)", "export: 3/4 (75 %)",
                                                "export: 4/4 (100 %)", "export: 4/4 (100 %)"]
    assert all(l.endswith("elapsed") for l in lines)


@pytest.mark.parametrize("case", ["short", "quiet", "CI", "own lines"])
def test_short_quiet_ci_or_a_caller_with_its_own_lines_prints_nothing(monkeypatch, capsys, case):
    monkeypatch.delenv("CI", raising=False)
    if case != "short":
        monkeypatch.setattr(progress_mod, "LINE_EVERY_S", 0.0)
    if case == "CI":
        monkeypatch.setenv("CI", "true")
    _work(3, quiet=case == "quiet", lines=case != "own lines")
    assert capsys.readouterr().err == ""
