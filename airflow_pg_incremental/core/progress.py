"""Progress lines for long work: bytes done, rate, ETA."""

from __future__ import annotations

import logging
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    def __init__(self, what: str, total: int | None = None, logger: logging.Logger | None = None,
                 interval: float = 10.0):
        self.what = what
        self.total = total
        self.log = logger or logging.getLogger("airflow_pg_incremental.progress")
        self.interval = interval
        self.done = 0
        self.extra = ""
        self.t0 = time.monotonic()
        self._last = self.t0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.log.info("%s", self.line())

    def update(self, probe) -> None:
        """Log on schedule, with done = probe() (an absolute count, asked for only when a line is due)."""
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.done = probe()
            self.log.info("%s", self.line())

    def line(self) -> str:
        el = max(time.monotonic() - self.t0, 1e-6)
        rate = self.done / el
        s = f"{self.what}: {human_bytes(self.done)}"
        if self.total:
            pct = min(100.0, 100.0 * self.done / self.total)
            s += f" of ~{human_bytes(self.total)} ({pct:.0f}%)"
        s += f", {human_bytes(rate)}/s"
        if self.total and rate > 0 and self.done < self.total:
            s += f", ETA {(self.total - self.done) / rate:.0f} s"
        if self.extra:
            s += f"; {self.extra}"
        return s

    def finish(self) -> float:
        el = time.monotonic() - self.t0
        self.log.info("%s (done in %.1f s)", self.line(), el)
        return el


class CountingReader:
    """Passes read() through to `reader`, adding what it returns to `progress`."""

    def __init__(self, reader, progress: Progress):
        self._reader = reader
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        d = self._reader.read(n)
        self._progress.add(len(d))
        return d
