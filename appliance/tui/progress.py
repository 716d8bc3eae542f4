"""One progress line for every bar in the TUI (verify, import, pull, re-verify): bytes done of
the total, this run's rate and the time left.

A ``RateMeter`` is started when a job starts; its first report sets the baseline, so bytes
already in the store when an import resumes do not count as this run's speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from appliance.store.layout import human_bytes

# Under this many seconds of measurement a rate is noise: none is shown yet.
_SETTLE_SECONDS = 0.2


def rate_text(bytes_per_second: float, left: int) -> str:
    """``"12.3 MB/s, 0:42 left"``, or ``""`` while there is no rate to tell."""
    if bytes_per_second <= 0:
        return ""
    minutes, seconds = divmod(int(left / bytes_per_second), 60)
    hours, minutes = divmod(minutes, 60)
    eta = f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
    return f"{human_bytes(int(bytes_per_second))}/s, {eta} left"


class RateMeter:
    """Bytes done, rate and time left of one running job."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._first: int | None = None

    def start(self) -> None:
        self._started = self._clock()
        self._first = None

    def rate(self, done: int) -> float:
        now = self._clock()
        if self._first is None:
            self._first, self._started = done, now
        elapsed = now - self._started
        return (done - self._first) / elapsed if elapsed > _SETTLE_SECONDS else 0.0

    def text(self, done: int, total: int) -> str:
        """``"40.0 MB of 120.0 MB  12.3 MB/s, 0:06 left"`` (no rate in the first moment)."""
        rate = rate_text(self.rate(done), max(0, total - done))
        return f"{human_bytes(done)} of {human_bytes(total)}" + (f"  {rate}" if rate else "")
