"""Progress protocol of long work (docs/ARCHITECTURE.md rule 2: long work is a generator).

Every long operation is a generator that yields :class:`Progress` records and *returns* its
result (``return result`` inside the generator, i.e. ``StopIteration.value``). It does a bounded
amount of work between two yields (well under a second on a CPU), so a driver cancels it by
simply not asking for the next step: napari's ``thread_worker`` (``worker.quit()``), the CLI
(Ctrl-C) and tests (``gen.close()``) all stop it between steps. Code that must clean up uses
``try/finally`` inside the generator.

Three drivers use the same generator: widgets (napari worker), the CLI (:func:`run_sync` with a
text bar) and tests (:func:`run_sync`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Progress:
    """One progress report.

    Attributes
    ----------
    done, total : int
        Steps finished and steps in all (``total == 0`` means unknown).
    message : str
        What is happening, for a status line ("sliding window 3/40").
    info : dict
        Optional figures for live plots (e.g. ``{"loss": 0.31, "dice": 0.8}``).
    """

    done: int
    total: int
    message: str = ""
    info: dict = field(default_factory=dict)


ProgressGen = Generator[Progress, None, T]


def run_sync(
    gen: Generator[Progress, None, T], callback: Callable[[Progress], Any] | None = None
) -> T:
    """Drive a progress generator to the end and return its result.

    Parameters
    ----------
    gen : generator
        Yields :class:`Progress`, returns the result.
    callback : callable, optional
        Called with each :class:`Progress`; if it returns ``False`` the generator is closed
        and :class:`~napari_medseg.errors.CancelledError` is raised.
    """
    from napari_medseg.errors import CancelledError

    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None and callback(p) is False:
            gen.close()
            raise CancelledError("cancelled")


class TextProgress:
    """A small text progress bar on stderr for the command line (silent when ``quiet``)."""

    def __init__(self, quiet: bool = False, stream: Any = None, min_interval: float = 0.2) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self._last = 0.0
        self._last_msg = ""

    def __call__(self, p: Progress) -> None:
        if self.quiet:
            return
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if not tty:
            self._line(p)
            return
        now = time.monotonic()
        final = p.total and p.done >= p.total
        if now - self._last < self.min_interval and not final and p.message == self._last_msg:
            return
        self._last, self._last_msg = now, p.message
        if p.total:
            frac = min(1.0, p.done / p.total)
            bar = "#" * int(frac * 30)
            line = f"\r[{bar:<30}] {100 * frac:5.1f}% {p.message[:60]:<60}"
        else:
            line = f"\r{p.message[:100]:<100}"
        self.stream.write(line)
        if final:
            self.stream.write("\n")
        self.stream.flush()

    def _line(self, p: Progress) -> None:
        """Logs and pipes: one line per phase, and at most one per 10% within a phase."""
        phase = "".join(c for c in p.message if not c.isdigit())[:40]
        pct = int(10 * p.done / p.total) if p.total else -1
        if phase == self._last_msg and pct == getattr(self, "_last_pct", None):
            return
        if phase == self._last_msg and time.monotonic() - self._last < 5 and pct < 10:
            return
        self._last, self._last_msg, self._last_pct = time.monotonic(), phase, pct
        prefix = f"[{100 * p.done / p.total:5.1f}%] " if p.total else ""
        self.stream.write(f"{prefix}{p.message}\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.quiet and getattr(self.stream, "isatty", lambda: False)():
            self.stream.write("\n")
            self.stream.flush()
