"""Prometheus histograms (cumulative buckets, sum, count) per model, without a client library.

The server's two latency histograms: ``appliance_serve_time_to_first_token_seconds_hist`` (from
the request reaching the engine to its first token) and
``appliance_serve_time_per_output_token_seconds`` (the decode interval between tokens).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class Histogram:
    name: str
    help_text: str
    buckets: tuple[float, ...]
    counts: dict[str, list[int]] = field(default_factory=dict)  # model -> per-bucket (+Inf)
    sums: dict[str, float] = field(default_factory=dict)

    def observe(self, model: str, value: float) -> None:
        counts = self.counts.setdefault(model, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[model] = self.sums.get(model, 0.0) + value

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help_text}")
        out.append(f"# TYPE {self.name} histogram")
        for model in sorted(self.counts):
            label = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            running = 0
            for bound, n in zip((*self.buckets, float("inf")), self.counts[model], strict=True):
                running += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'{self.name}_bucket{{model="{label}",le="{le}"}} {running}')
            out.append(f'{self.name}_sum{{model="{label}"}} {self.sums[model]!r}')
            out.append(f'{self.name}_count{{model="{label}"}} {running}')
