"""llama-server's answers in our terms: JSON bodies read as untrusted, errors as the worker
protocol's ``("error", rid, kind, text)``, usage and timings as the request's stats, and its
``/metrics`` text relabelled with the model it came from (one llama-server per model)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from appliance.serve.supervisor import Message


def json_body(response: httpx.Response) -> dict[str, Any]:
    return json_bytes(response.content)


def json_bytes(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"error": {"message": raw.decode("utf-8", "replace")[:500]}}
    return value if isinstance(value, dict) else {"value": value}


def error_message(rid: int, status: int, payload: dict[str, Any]) -> Message:
    error = payload.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    kind = "bad_request" if 400 <= status < 500 else "internal"
    return ("error", rid, kind, str(message or payload)[:2000])


def stats(payload: dict[str, Any], started: float, first: float | None) -> dict[str, float]:
    usage = payload.get("usage") or {}
    timings = payload.get("timings") or {}
    prompt_ms = float(timings.get("prompt_ms", 0.0))
    ttft = (first - started) if first is not None else prompt_ms / 1000
    return {
        "prompt_tokens": int(usage.get("prompt_tokens", timings.get("prompt_n", 0))),
        "completion_tokens": int(usage.get("completion_tokens", timings.get("predicted_n", 0))),
        "time_to_first_token": ttft,
        "generation_seconds": float(timings.get("predicted_ms", 0.0)) / 1000,
    }


def merge_metrics(texts: dict[str, str]) -> str:
    """Prometheus text of several llama-servers (``{model: text}``) as one exposition: each
    family's HELP/TYPE once, every sample with a ``model`` label added."""
    families: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for model, text in texts.items():
        label = f'model="{model}"'
        for line in text.splitlines():
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3:
                    families.setdefault(parts[2], [])
                    if line not in families[parts[2]]:
                        families[parts[2]].append(line)
                continue
            if not line.strip():
                continue
            name, _, value = line.partition(" ")
            base = name.split("{", 1)[0]
            labelled = (f"{base}{{{label},{name.split('{', 1)[1]}" if "{" in name
                        else f"{name}{{{label}}}")
            samples.setdefault(base, []).append(f"{labelled} {value}")
    out = []
    for base, lines in samples.items():
        out += families.get(base, [])
        out += lines
    return "\n".join(out) + "\n" if out else ""
