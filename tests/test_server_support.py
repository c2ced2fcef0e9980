"""Helpers for the server tests (no tests here): a scriptable fake Backend and app runners.

The fake "translates" by echoing the source text ids, so a response decodes back to the source
sentence and layout checks can compare text exactly; knobs inject delay, failures, overload and
slow start-up, and counters record what the engine saw (admitted, cancelled).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from serve.app import create_app
from serve.engine.backend import Backend, EngineStats
from serve.engine.errors import QueueFull, RequestFailed
from serve.engine.request import GenerationRequest, GenerationResult
from serve.model_store import ModelPlan
from serve.settings import Settings


class FakeBackend(Backend):
    """Echo backend. `fail_id` / `overload_id` in a source make that sequence fail / be refused."""

    name = "fake"

    def __init__(
        self,
        delay: float = 0.0,
        hold: bool = False,
        fail_id: int | None = None,
        overload_id: int | None = None,
        block_start: bool = False,
    ):
        self.delay, self.hold = delay, hold
        self.fail_id, self.overload_id = fail_id, overload_id
        self.release_start = threading.Event()
        if not block_start:
            self.release_start.set()
        self.release: asyncio.Event | None = None
        self.active = self.admitted = self.cancelled = self.completed = self.generated = 0
        self.shutdown_called: bool | None = None

    def start(self) -> None:
        self.release_start.wait(timeout=60)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        text_ids = request.encoder_ids[1:-1]
        if self.overload_id is not None and self.overload_id in text_ids:
            raise QueueFull("waiting queue is full", retry_after=2.5)
        if self.release is None:
            self.release = asyncio.Event()
        self.active += 1
        self.admitted += 1
        try:
            await asyncio.sleep(0)
            if self.fail_id is not None and self.fail_id in text_ids:
                raise RequestFailed("injected failure")
            if self.hold:
                await self.release.wait()
            await asyncio.sleep(self.delay)
            first = time.monotonic()
            self.completed += 1
            self.generated += len(text_ids)
            return GenerationResult(
                request.request_id, list(text_ids), "eos", len(request.encoder_ids), first
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    def stats(self) -> EngineStats:
        return EngineStats(waiting=0, running=self.active, kv_blocks_used=self.active, kv_blocks_free=100 - self.active,
                           generated_tokens=self.generated)  # fmt: skip

    async def shutdown(self, drain: bool = True) -> None:
        self.shutdown_called = drain


def make_app(ckpt: Path, backend: Backend | None = None, **overrides: object) -> FastAPI:
    settings = Settings(**overrides)
    return create_app(settings, ModelPlan("test-model", ckpt), backend=backend)


async def wait_ready(client: httpx.AsyncClient, attempts: int = 1200) -> None:
    """Poll /health/ready (bounded by a count, not a clock threshold)."""
    for _ in range(attempts):
        if (await client.get("/health/ready")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("server never became ready")


@asynccontextmanager
async def running(app: FastAPI, ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and an in-process client."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            if ready:
                await wait_ready(client)
            yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def uvicorn_server(app: FastAPI) -> AsyncIterator[str]:
    """A real uvicorn on 127.0.0.1 in this event loop; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.ensure_future(server.serve())
    for _ in range(400):
        if server.started:
            break
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
