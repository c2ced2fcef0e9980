"""`python -m serve`: settings -> model plan -> uvicorn, with a SIGTERM that drains and exits 0.

Everything that can be wrong with the command line (bad setting, model not obtainable, TRT-LLM
asked for but absent) fails here, before the port opens, with one line on stderr. The slow part
(download, conversion, loading, warm-up) runs after the server is up so liveness probes pass.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from types import FrameType

import uvicorn
from pydantic import ValidationError

from serve.app import ConfigError, Service, choose_backend, create_app
from serve.model_store import ModelPlan, ModelUnavailable, plan
from serve.settings import Settings, parse_settings

log = logging.getLogger("serve")


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM drains before exiting.

    Draining: readiness turns 503 and new translations get 503 + Retry-After while requests in
    flight finish; then uvicorn's own shutdown runs (backend drained in the lifespan) and the
    process exits 0. A second signal, or `drain_timeout`, exits at once.
    """

    def __init__(self, config: uvicorn.Config, service: Service, drain_timeout: float):
        super().__init__(config)
        self.service, self.drain_timeout = service, drain_timeout
        self.drain_deadline: float | None = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_deadline is None and not self.should_exit:
            self.drain_deadline = time.monotonic() + self.drain_timeout
            self.service.begin_drain()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        draining = self.drain_deadline is not None and not self.should_exit
        if draining and (self.service.idle() or time.monotonic() >= self.drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)

    def fail(self, message: str) -> None:
        """Model loading failed in the background: stop serving, exit non-zero."""
        self.exit_code = 1
        self.should_exit = True


def model_plan(settings: Settings) -> ModelPlan:
    """The checkpoint to serve; with TensorRT-LLM the engine dir carries tokenizer and languages."""
    if choose_backend(settings) == "trtllm":
        assert settings.engine_dir is not None
        if settings.shortlist:
            raise ConfigError("--shortlist is served by the PyTorch backend only")
        return ModelPlan(settings.model, settings.engine_dir.expanduser().resolve())
    return plan(settings.model, settings.cache_dir, settings.resolved_dtype(), settings.tp_size)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        print(f"serve: error: invalid setting: {problems}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        the_plan = model_plan(settings)
    except (ModelUnavailable, ConfigError) as err:
        print(f"serve: error: {err}", file=sys.stderr)
        return 2
    server: DrainingServer | None = None

    def on_fatal(message: str) -> None:
        if server is not None:
            server.fail(message)

    app = create_app(settings, the_plan, on_fatal=on_fatal)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout)), lifespan="on",
    )  # fmt: skip
    server = DrainingServer(config, app.state.service, settings.drain_timeout)
    if the_plan.tiny:
        log.warning(
            "MODEL=tiny: serving a tiny RANDOM model; every translation is MEANINGLESS (smoke tests only)"
        )
    log.info("serving %s on http://%s:%d (docs at /docs)", the_plan.model_id, settings.host, settings.port)
    try:
        server.run()
    except KeyboardInterrupt:
        return 130
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())
