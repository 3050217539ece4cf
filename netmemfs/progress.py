"""Progress of long work (a server replaying its log, `umount` waiting on a commit): a
bar on an interactive terminal (rich), plain lines at a steady interval anywhere else
(a pipe, a log file), nothing for work that ends within its first interval.

NETMEMFS_PROGRESS_S sets the interval in seconds (default PROGRESS_S).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import rich.progress

PROGRESS_S = 2.0


def interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get("NETMEMFS_PROGRESS_S", PROGRESS_S)))
    except ValueError:
        return PROGRESS_S


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Work on `what` that will reach `total` bytes (None: unknown, then only the time
    taken is told). update() is cheap (a clock read) and may be called per record."""

    def __init__(
        self,
        what: str,
        total: int | None,
        *,
        logger: logging.Logger | None = None,
        stream: TextIO | None = None,
        at_once: bool = False,
    ) -> None:
        self.what = what
        self.total = total
        self.done = 0
        self.logger = logger
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()
        self.interval_s = interval_s()
        # at_once: shown from the first update (work already known to be long).
        self._next = self.started + (0.0 if at_once else self.interval_s)
        self._tty = self.stream.isatty()
        self._bar: rich.progress.Progress | None = None
        self._task: rich.progress.TaskID | None = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def update(self, done: int, what: str | None = None) -> None:
        self.done = done
        if what is not None:
            self.what = what
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + (0.1 if self._tty else self.interval_s)
        if self._tty:
            self._draw()
        else:
            self._say(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        if self.total is None:
            return f"{self.what}: {elapsed:.1f} s"
        rate = f"{_size(self.done / elapsed)}/s"
        if not self.total:
            return f"{self.what}: {_size(self.done)} ({rate})"
        share = min(1.0, self.done / self.total)
        return f"{self.what}: {share:.0%} ({_size(self.done)} of {_size(self.total)}, {rate})"

    def _say(self, text: str) -> None:
        if self.logger is not None:
            self.logger.info("%s", text)
        else:
            print(text, file=self.stream, flush=True)

    def _draw(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        if self._bar is None:
            columns = [SpinnerColumn(), TextColumn("{task.description}")]
            if self.total:
                columns += [BarColumn(), DownloadColumn(binary_units=True)]
                columns += [TransferSpeedColumn()]
            columns.append(TimeElapsedColumn())
            self._bar = Progress(*columns, console=Console(file=self.stream), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total)
        assert self._task is not None
        self._bar.update(self._task, completed=self.done, description=self.what)

    def close(self) -> None:
        """End the bar; a plain line saying how it went if anything was shown."""
        shown = self._bar is not None or time.monotonic() >= self.started + self.interval_s
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if shown and self.total is not None:
            took = time.monotonic() - self.started
            self._say(f"{self.what}: done, {_size(self.done)} in {took:.1f} s")
