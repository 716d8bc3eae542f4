"""What the serving routes share: settings, workers, queue, metrics, and the lifespan that
starts and stops the workers (audited as "serve-start"). Its own module so that both fronts,
the OpenAI one (``appliance.serve.app``) and the Ollama one (``appliance.serve.ollama``),
use it without importing each other."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette

from appliance.errors import BadRequestError, ModelNotFoundError
from appliance.serve import access
from appliance.serve.engine import resolve_engine
from appliance.serve.llama_server import make_workers
from appliance.serve.metrics import Metrics
from appliance.serve.model import ModelResolver, ServeSettings
from appliance.serve.queue import RequestQueue
from appliance.serve.supervisor import READY, Audit, Worker

log = logging.getLogger("appliance.serve")


class ServerState:
    """Everything the routes share: settings, workers, queue, metrics."""

    def __init__(self, settings: ServeSettings, resolver: ModelResolver,
                 audit: Audit | None) -> None:
        if not settings.models:
            raise BadRequestError("no model to serve")
        self.settings = settings
        self.audit = audit
        self.metrics = Metrics()
        self.queue = RequestQueue(settings.max_queue)
        self.started = int(time.time())
        self.engine = resolve_engine(settings.engine)
        self.workers = make_workers(settings, resolver, metrics=self.metrics, queue=self.queue,
                                    audit=audit, engine=self.engine)
        self.metrics.queue_depth = lambda: self.queue.waiting
        self.metrics.model_ready = lambda: {n: w.state == READY for n, w in self.workers.items()}

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.audit is not None:
            details = {"models": list(self.settings.models), "listen": self.settings.listen,
                       "pid": os.getpid(), "n_threads": self.settings.n_threads,
                       "n_ctx": self.settings.n_ctx, "engine": self.engine}
            await asyncio.to_thread(self.audit, "serve-start", details)
        for worker in self.workers.values():
            worker.start()
        try:
            yield
        finally:
            await asyncio.gather(*(w.stop() for w in self.workers.values()))
            log.info("server stopped; workers of %s shut down", ", ".join(self.workers))

    def worker_for(self, model: str | None) -> Worker:
        if model is None:
            if len(self.workers) == 1:
                return next(iter(self.workers.values()))
            raise BadRequestError("'model' is required: this server serves "
                                  f"{', '.join(sorted(self.workers))}")
        worker = self.workers.get(model)
        access.note(model)
        if worker is None:
            raise ModelNotFoundError(f"model '{model}' is not served here; GET /v1/models lists "
                                     "the served models")
        return worker
