"""Progress for long work: a bar on a terminal (stderr); where no bar can be drawn (a pipe, a log
file, `nohup`), a plain line on stderr every LINE_EVERY_S seconds of work that runs that long, and one
at its end. Short work prints nothing; --json / quiet mode and CI (the `CI` variable) print nothing."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

LINE_EVERY_S = 30.0


def table_console(min_width: int):
    """A rich Console for tables on stdout, at least `min_width` wide, that reads no markup in what it
    prints (a package `pkg[v2]` or a question type `[/x]` is text, not style tags that vanish or fail).
    A closed stdout (`| head`) raises BrokenPipeError, which the CLI ends quietly with 0 (rich itself
    exits 1 there)."""
    from rich.console import Console

    class _TableConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return _TableConsole(width=max(min_width, Console().width), markup=False)


def _silent(quiet: bool) -> bool:
    """Nothing at all is printed: --json / quiet mode, or CI."""
    return quiet or bool(os.environ.get("CI"))


def bars_enabled(quiet: bool = False) -> bool:
    return not _silent(quiet) and sys.stderr.isatty()


class _Task:
    def __init__(self, progress, task_id):
        self._progress, self._id = progress, task_id

    def advance(self, n: float = 1, description: str | None = None) -> None:
        if self._progress is not None:
            kw = {"description": description} if description else {}
            self._progress.update(self._id, advance=n, **kw)


class _Lines:
    """The bar's information as lines: `export: 4/10 (40 %), 1:02 elapsed`."""

    def __init__(self, description: str, total: float | None):
        self.description, self.total, self.done = description, total, 0.0
        self.start = self.last = time.monotonic()
        self.printed = False

    def advance(self, n: float = 1, description: str | None = None) -> None:
        self.done += n
        if description:
            self.description = description
        if time.monotonic() - self.last >= LINE_EVERY_S:
            self.line()

    def line(self) -> None:
        now = time.monotonic()
        self.last, self.printed = now, True
        done = f"{self.done:g}/{self.total:g} ({100 * self.done / self.total:.0f} %)" if self.total else f"{self.done:g}"
        minutes, seconds = divmod(int(now - self.start), 60)
        print(f"{self.description}: {done}, {minutes}:{seconds:02d} elapsed", file=sys.stderr, flush=True)


@contextmanager
def progress(description: str, total: float | None, quiet: bool = False, lines: bool = True):
    """`with progress("export", 3) as bar: ...; bar.advance()`. `lines=False`: no plain lines where no
    bar can be drawn (for a caller that logs its own, as `sleigh train` does)."""
    if not bars_enabled(quiet):
        if _silent(quiet) or not lines:
            yield _Task(None, None)
            return
        task = _Lines(description, total)
        yield task
        if task.printed:  # the end of work long enough to have reported on the way
            task.line()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as p:
        yield _Task(p, p.add_task(description, total=total))
