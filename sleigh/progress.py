"""Progress bars for long work: shown on a terminal (stderr), silent in --json mode, pipes and CI."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


def bars_enabled(quiet: bool = False) -> bool:
    return not quiet and sys.stderr.isatty() and not os.environ.get("CI")


class _Task:
    def __init__(self, progress, task_id):
        self._progress, self._id = progress, task_id

    def advance(self, n: float = 1, description: str | None = None) -> None:
        if self._progress is not None:
            kw = {"description": description} if description else {}
            self._progress.update(self._id, advance=n, **kw)


@contextmanager
def progress(description: str, total: float | None, quiet: bool = False):
    """`with progress("export", 3) as bar: ...; bar.advance()`."""
    if not bars_enabled(quiet):
        yield _Task(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as p:
        yield _Task(p, p.add_task(description, total=total))
