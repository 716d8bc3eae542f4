"""``appliance serve``: serve verified store models through an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from appliance.cli import receipt
from appliance.cli.options import LibraryChoices
from appliance.errors import UsageError
from appliance.serve.model import DEFAULT_N_CTX, VERIFY_MODES, ServeSettings
from appliance.store.location import require_existing_store

DEFAULT_LISTEN = "127.0.0.1:8080"

DESCRIPTION = """\
Serve models from the store with llama.cpp behind an OpenAI-compatible API:
GET /v1/models, POST /v1/chat/completions, /v1/completions (both with "stream": true; with
the llama-server engine also tools, tool_choice, response_format json_schema, logprobs) and
/v1/embeddings (embedding models), GET /health (503 until every preloaded model is loaded)
and GET /metrics (Prometheus). Ollama's API on the same port: /api/version, /api/tags,
/api/show, /api/ps, /api/chat, /api/generate, /api/embed.

The engine is llama.cpp's own llama-server (scripts/build_llama_server.sh) when built: one
child per loaded model, --parallel requests at once (continuous batching). A model loads on
its first request (--preload: at start), unloads after --keep-alive idle, and at most
--max-loaded are loaded at once.

Only published, verified store models load. Before each load (at start and after a worker
restart) the file is checked against the store: --verify-on-load quick re-hashes the GGUF
header against the signed manifest and checks sizes; full re-hashes every byte. A model that
fails is refused, reported by /health and the API, and recorded in the audit log.

Each model runs in its own llama.cpp worker process: a native crash (SIGSEGV, SIGILL) fails
only the request it was answering (the error names the signal), and the worker restarts.
Requests queue per model (--queue waiting at most; more get HTTP 429).
"""

EPILOG = """\
examples:
  appliance serve --model gemma3-270m
  appliance serve --listen 0.0.0.0:8080 --api-key-file /etc/appliance/keys --threads 8
  curl -s localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "gemma3-270m", "messages": [{"role": "user", "content": "Hi"}]}'

The API key file holds one key per line (at least 16 characters; '#' starts a comment).
Clients send 'Authorization: Bearer KEY'; /health needs no key.
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "serve",
        parents=[common],
        help="serve store models through an OpenAI-compatible API (llama.cpp)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"address to listen on; port 0 picks a free one "
                             f"(default {DEFAULT_LISTEN})")
    parser.add_argument("--model", action="extend", nargs="+", default=[], metavar="NAME",
                        help="store model to serve, NAME or NAME:VERSION (repeatable; "
                             "default: every verified model in the store)")
    parser.add_argument("--api-key-file", type=Path, metavar="FILE",
                        help="require 'Authorization: Bearer KEY' with a key from FILE")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                        metavar="N", help="llama.cpp threads per model (default: CPUs, max 8)")
    parser.add_argument("--ctx", type=int, default=DEFAULT_N_CTX, metavar="N",
                        help="context length in tokens; 0 uses the model's own "
                             f"(default {DEFAULT_N_CTX})")
    parser.add_argument("--max-tokens-default", type=int, default=256, metavar="N",
                        help="tokens a chat completion generates when the request names no "
                             "max_tokens (default 256; text completions: 16, as OpenAI)")
    parser.add_argument("--queue", type=int, default=16, metavar="N",
                        help="requests allowed to wait for a busy model; more get 429 "
                             "(default 16)")
    parser.add_argument("--verify-on-load", choices=VERIFY_MODES, default="quick",
                        help="check before each load: quick (header + sizes) or full "
                             "(re-hash every byte) (default quick)")
    engine = parser.add_argument_group("engine and model lifecycle")
    # The engines are named by serve.engine, which loads the worker and subprocess
    # machinery: read only when --engine is checked or ``serve --help`` is drawn.
    engine.add_argument("--engine", default="auto",
                        choices=LibraryChoices("appliance.serve.engine", "ENGINES"),
                        help="llama-server (llama.cpp's own server, parallel slots, tools, "
                             "JSON schemas, GPU), llama-cpp-python (one request at a time), "
                             "or auto: llama-server when built (default auto)")
    engine.add_argument("--parallel", type=int, default=4, metavar="N",
                        help="requests generated at once per model (llama-server slots, "
                             "continuous batching; default 4)")
    engine.add_argument("--gpu-layers", default="auto", metavar="N|auto",
                        help="layers offloaded to the GPU; auto: all when llama.cpp has a GPU "
                             "backend, else 0 (default auto)")
    engine.add_argument("--preload", action="store_true",
                        help="load every model at start and keep it loaded (default: load on "
                             "the first request)")
    engine.add_argument("--keep-alive", default="5m", metavar="DURATION",
                        help="unload a model idle this long (30s, 5m, 1h; -1: never; "
                             "default 5m)")
    engine.add_argument("--max-loaded", type=int, default=3, metavar="N",
                        help="models loaded at once; the least recently used idle one unloads "
                             "(0: no limit; default 3)")
    engine.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow browser pages from ORIGIN (repeatable; '*' for any)")
    receipt.add_serve_options(parser)
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from appliance.http_server import address, parse_listen
    from appliance.serve.app import create_app
    from appliance.serve.auth import load_api_keys
    from appliance.serve.server import ANY_HOST, bind, run
    from appliance.serve.store_resolver import servable_names, serve_audit, store_resolver
    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    if args.ctx < 0:
        raise UsageError("--ctx must be 0 (the model's own) or positive")
    if args.queue < 0:
        raise UsageError("--queue must be 0 or more")
    if args.max_tokens_default < 1:
        raise UsageError("--max-tokens-default must be at least 1")
    if args.parallel < 1:
        raise UsageError("--parallel must be at least 1")
    if args.gpu_layers != "auto" and not args.gpu_layers.isdigit():
        raise UsageError("--gpu-layers takes a number of layers or auto")
    from appliance.serve.engine import parse_keep_alive
    try:
        keep_alive = parse_keep_alive(args.keep_alive)
    except ValueError as e:
        raise UsageError(str(e)) from e
    host, _ = parse_listen(args.listen, any_host=ANY_HOST)
    keys = load_api_keys(args.api_key_file) if args.api_key_file else frozenset()
    require_existing_store(args.store)
    models = servable_names(args.store, args.model)
    receipts = receipt.serve_receipts(args)  # before binding: a missing site key says so now
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("appliance.serve")
    if not keys and not _is_loopback(host):
        log.warning("serving on %s without API keys: anyone who can reach it may use it "
                    "(use --api-key-file)", args.listen)
    sock = bind(args.listen)
    where = address(sock)
    settings = ServeSettings(
        models=models, n_threads=args.threads, n_ctx=args.ctx, max_queue=args.queue,
        max_tokens_default=args.max_tokens_default, api_keys=keys, listen=where,
        engine=args.engine, parallel=args.parallel, gpu_layers=args.gpu_layers,
        keep_alive=None if args.preload else keep_alive, max_loaded=args.max_loaded,
        preload=args.preload, cors_origins=tuple(args.cors_origin),
    )
    app = create_app(settings, store_resolver(args.store, verify=args.verify_on_load),
                     audit=serve_audit(args.store, via="cli"), receipts=receipts)
    log.info("serving %s on http://%s (store %s)", ", ".join(models), where, args.store)
    run(app, sock, log_level="debug" if args.debug else "warning")
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
