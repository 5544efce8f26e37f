"""Progress of a scoring run: the scoring workers add up the rows they scored, the driver shows them.

* :class:`RowCounter` -- a Ray actor (no CPU) that each scoring worker tells, without waiting, how many
  rows it has finished;
* :class:`ProgressReporter` -- a driver thread that polls the counter: on a terminal a bar redrawn in
  place, in a log (not a terminal) a plain line at most every ``log_every`` seconds and at every tenth.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class RowCounter:
    """Rows finished so far (used as a Ray actor)."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def get(self) -> int:
        return self.rows


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_text(done: int, total: int, elapsed: float) -> str:
    """'12,345 / 30,000 rows (41%), 2,345 rows/s, ETA 0:06'."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = _duration((total - done) / rate) if rate > 0 and done < total else "-"
    pct = 100.0 * done / total if total else 100.0
    return f"{done:,} / {total:,} rows ({pct:.0f}%), {rate:,.0f} rows/s, ETA {eta}"


class ProgressReporter:
    """Polls ``read()`` (rows done) in a thread and reports against ``total`` on ``stream``."""

    def __init__(
        self,
        read,
        total: int,
        stream: TextIO | None = None,
        interval: float = 0.5,
        log_every: float = 30.0,
        label: str = "scoring",
    ):
        self.read, self.total, self.stream = read, total, stream or sys.stderr
        self.interval, self.log_every, self.label = interval, log_every, label
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vaepipe-progress", daemon=True)
        self._t0 = time.perf_counter()
        self._last_line, self._last_tenth = self._t0, 0

    def __enter__(self) -> ProgressReporter:
        self._t0 = self._last_line = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                done = int(self.read())
            except Exception:  # noqa: BLE001 -- progress is best effort: the job itself reports failures
                continue
            self.show(done)

    def show(self, done: int) -> None:
        now = time.perf_counter()
        text = f"{self.label}: {progress_text(done, self.total, now - self._t0)}"
        if self.tty:
            width = 30
            filled = int(width * min(done, self.total) / self.total) if self.total else width
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K")
            self.stream.flush()
            return
        tenth = int(10 * done / self.total) if self.total else 10
        if tenth > self._last_tenth or now - self._last_line >= self.log_every:
            self._last_tenth, self._last_line = max(tenth, self._last_tenth), now
            self.stream.write(text + "\n")
            self.stream.flush()
