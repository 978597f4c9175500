"""What dcml prints besides its own lines: whether Ray's own output shows (the verbosity), and the
progress of long steps, drawn in place on a terminal and as a line now and then elsewhere (CI,
`ray job logs`). The `dcml` command turns progress on (`enable`); as a library, dcml draws none.

Nothing here imports Ray.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

LOG_ENV = "DCML_LOG"  # "debug" (what `dcml -v` sets): Ray's own logs, bars and banners show too
EVERY_S = 10.0  # where nothing can be drawn in place, a progress line this often

_enabled = _verbose = False


def verbose() -> bool:
    return _verbose or os.environ.get(LOG_ENV, "").strip().lower() == "debug"


def quiet(configured: bool = True) -> bool:
    """Whether Ray's own output is hidden: `cluster.quiet` (on by default), unless verbose."""
    return configured and not verbose()


def enable(on: bool = True, verbose: bool = False) -> None:
    """Show progress (the `dcml` command does; a library caller gets none), and with `verbose`
    Ray's own output too (`dcml -v`)."""
    global _enabled, _verbose
    _enabled, _verbose = on, verbose


def enabled() -> bool:
    return _enabled


def drawn() -> bool:
    """Whether progress is drawn in place (stdout is a terminal) rather than printed as lines."""
    return _enabled and sys.stdout.isatty()


def last_line(text: str, limit: int = 200) -> str:
    """The last non-empty line of an error's text (where a remote traceback ends: the error)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def _rich():
    try:
        import rich.live
        import rich.progress
        import rich.text

        return rich
    except ImportError:  # typer-slim without rich: lines instead
        return None


class Progress:
    """A long step's progress: rows done (of how many, when known), their rate, and the parts
    (files, blocks) done. A bar on a terminal, removed when the step ends (its caller prints the
    summary); elsewhere a line every EVERY_S seconds to `log`, so a short step adds no line."""

    def __init__(
        self,
        what: str,
        rows: int | None = None,
        parts: int | None = None,
        part: str = "file",
        log: Callable[[str], None] | None = None,
    ):
        self.what, self.total, self.parts_total, self.part = what, rows, parts, part
        self.log = log  # where the lines go (default: stdout, under the `dcml` command only)
        self.rows = self.parts = 0
        self.start = self.last = time.monotonic()
        self._bar = self._task = None

    def __enter__(self) -> Progress:
        rich = _rich() if drawn() else None
        if rich is not None:
            self._bar = rich.progress.Progress(
                rich.progress.TextColumn("{task.description}"),
                rich.progress.BarColumn(),
                rich.progress.TextColumn("{task.fields[detail]}"),
                rich.progress.TimeElapsedColumn(),
                transient=True,
            )
            total = self.total or self.parts_total or None
            self._task = self._bar.add_task(self.what, total=total, detail="")
            self._bar.start()
        return self

    def update(self, rows: int = 0, parts: int = 1) -> None:
        self.rows += rows
        self.parts += parts
        if self._bar is not None:
            done = self.rows if self.total else self.parts
            self._bar.update(self._task, completed=done, detail=self.detail())
        elif time.monotonic() - self.last >= EVERY_S:
            self.last = time.monotonic()
            if self.log is not None:
                self.log(f"{self.what}: {self.detail()}")
            elif _enabled:
                print(f"{self.what}: {self.detail()}", flush=True)

    def detail(self) -> str:
        rate = self.rows / max(time.monotonic() - self.start, 1e-6)
        text = f"{self.rows:,}" + (f"/{self.total:,}" if self.total else "")
        text += f" rows, {rate:,.0f} rows/s"
        if self.parts_total:
            text += f", {self.parts}/{self.parts_total} {self.part}(s)"
        return text

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


class LiveText:
    """Text redrawn in place on a terminal (a table that changes as work reports), and removed
    when closed; elsewhere it shows nothing (`drawn()` is False: callers print lines)."""

    def __init__(self):
        self._live = None

    def show(self, text: str) -> None:
        rich = _rich() if drawn() else None
        if rich is None:
            return
        if self._live is None:
            self._live = rich.live.Live(rich.text.Text(text), transient=True)
            self._live.start()
        else:
            self._live.update(rich.text.Text(text))

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
