"""Inference serving: llama.cpp worker processes behind an OpenAI-compatible HTTP API.

    model.py           ServableModel, ModelResolver, ServeSettings, check_file
    store_resolver.py  the resolver over the store (published + verified, quick/full check)
    protocol.py        OpenAI request bodies -> llama-cpp-python arguments (pure)
    worker.py          the child process that owns one loaded model (pipe protocol, test hook)
    supervisor.py      spawn, route, restart a worker; one request at a time per model
    queue.py           the bounded wait line (QueueFullError -> 429)
    metrics.py         counters and Prometheus text
    auth.py            bearer API keys from a file
    app.py             the Starlette app: routes, error shape, auth and metrics layer
    server.py          uvicorn on a socket we bind (CLI) or in a thread (tests, benchmark)

Entry point for code: ``create_app(settings, resolver, audit=...)`` then ``server.run``.
"""
