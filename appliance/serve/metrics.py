"""Server counters and their Prometheus text exposition (format 0.0.4), without a client library.

Everything here is touched from the event loop thread only, so plain dicts suffice.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping

from appliance.serve import access
from appliance.serve.histogram import PER_TOKEN_BUCKETS, TTFT_BUCKETS, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (path, status)
        self.prompt_tokens: Counter[str] = Counter()
        self.completion_tokens: Counter[str] = Counter()
        self.generation_seconds: defaultdict[str, float] = defaultdict(float)
        self.last_tokens_per_second: dict[str, float] = {}
        self.last_time_to_first_token: dict[str, float] = {}
        self.worker_restarts: Counter[str] = Counter()
        self.worker_crashes: Counter[tuple[str, str]] = Counter()  # (model, signal)
        self.in_flight = 0
        self.queue_depth: Callable[[], int] = lambda: 0
        self.model_ready: Callable[[], dict[str, bool]] = dict
        self.ttft = Histogram("appliance_serve_time_to_first_token_seconds_hist",
                              "Time to first token.", TTFT_BUCKETS)
        self.per_token = Histogram("appliance_serve_time_per_output_token_seconds",
                                   "Time between generated tokens (decode).", PER_TOKEN_BUCKETS)

    def observe_request(self, path: str, status: int) -> None:
        self.requests[(path, status)] += 1

    def observe_generation(self, model: str, stats: dict[str, float]) -> None:
        generated = int(stats.get("completion_tokens", 0))
        seconds = float(stats.get("generation_seconds", 0.0))
        self.prompt_tokens[model] += int(stats.get("prompt_tokens", 0))
        self.completion_tokens[model] += generated
        self.generation_seconds[model] += seconds
        self.last_time_to_first_token[model] = float(stats.get("time_to_first_token", 0.0))
        access.note(model, stats)
        if generated:
            self.ttft.observe(model, self.last_time_to_first_token[model])
        if generated > 1 and seconds > 0:
            self.per_token.observe(model, seconds / (generated - 1))
        # Rate between the first and the last token: the decode speed, not prompt processing.
        if generated > 1 and seconds > 0:
            self.last_tokens_per_second[model] = (generated - 1) / seconds

    def render(self) -> str:
        out: list[str] = []
        requests = sorted(self.requests.items())
        _family(out, "appliance_serve_requests_total", "counter",
                "HTTP requests answered, by path and status.",
                ((f'path="{_esc(p)}",status="{s}"', n) for (p, s), n in requests))
        _family(out, "appliance_serve_prompt_tokens_total", "counter",
                "Prompt tokens evaluated.", _by_model(self.prompt_tokens))
        _family(out, "appliance_serve_tokens_generated_total", "counter",
                "Tokens generated.", _by_model(self.completion_tokens))
        _family(out, "appliance_serve_generation_seconds_total", "counter",
                "Seconds spent generating (first to last token).",
                _by_model(self.generation_seconds))
        _family(out, "appliance_serve_tokens_per_second", "gauge",
                "Generation speed of the last request.", _by_model(self.last_tokens_per_second))
        _family(out, "appliance_serve_time_to_first_token_seconds", "gauge",
                "Time to first token of the last request.",
                _by_model(self.last_time_to_first_token))
        _family(out, "appliance_serve_queue_depth", "gauge",
                "Requests waiting for a busy worker.", [("", self.queue_depth())])
        _family(out, "appliance_serve_requests_in_flight", "gauge",
                "Requests being answered or waiting.", [("", self.in_flight)])
        _family(out, "appliance_serve_worker_restarts_total", "counter",
                "Worker processes restarted after dying.", _by_model(self.worker_restarts))
        _family(out, "appliance_serve_worker_crashes_total", "counter",
                "Worker processes that died, by signal or exit status.",
                ((f'model="{_esc(m)}",signal="{_esc(s)}"', n)
                 for (m, s), n in sorted(self.worker_crashes.items())))
        _family(out, "appliance_serve_model_ready", "gauge",
                "1 when the model's worker is loaded and ready.",
                ((f'model="{_esc(m)}"', int(r)) for m, r in sorted(self.model_ready().items())))
        self.ttft.render(out)
        self.per_token.render(out)
        return "\n".join(out) + "\n"


def _by_model(values: Mapping[str, float]) -> Iterable[tuple[str, float]]:
    return ((f'model="{_esc(m)}"', v) for m, v in sorted(values.items()))


def _family(
    out: list[str], name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]],
) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        out.append(f"{name}{{{labels}}} {_num(value)}" if labels else f"{name} {_num(value)}")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _esc(label: str) -> str:
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
