"""Ray Serve app: an OpenAI-compatible completions server for a moe_lab checkpoint.

    from ray import serve
    from moe_lab.serving import ServeArgs
    from moe_lab.orchestration.serve import app_builder
    serve.run(app_builder(ServeArgs(checkpoint="outputs/demo/model")), route_prefix="/")

or ``moe-lab serve outputs/demo/model`` (see :mod:`moe_lab.cli._serve`), or a Ray Serve
config file whose application has ``import_path: moe_lab.orchestration.serve:app_builder``
and ``args:`` holding :class:`~moe_lab.serving.ServeArgs` fields (``cluster/rayservice.yaml``).

This module is the deployment only: the protocol (parsing, validation, responses, SSE,
errors) is :mod:`moe_lab.serving.protocol` and the batching :mod:`moe_lab.serving.batching`;
each route parses with the protocol, calls the model and formats with the protocol.

Routes (FastAPI ingress; errors in the OpenAI shape ``{"error": {"message", "type", "param",
"code"}}``):

- ``POST /v1/completions``: ``model``, ``prompt`` (a string or a list of token ids),
  ``max_tokens``, ``temperature``, ``top_p``, ``top_k`` (extension), ``stop``, ``seed``,
  ``n`` (1 only), ``stream`` (server-sent events, ending with ``data: [DONE]``).
- ``GET /v1/models``, ``GET /v1/stats`` (expert-cache stats, tokens served, requests, and
  ``monitor``: the live stats of the :class:`~moe_lab.analytics.ExpertMonitor` each replica
  attaches at start-up; the key is absent if it could not be attached, and holds
  ``{"error": ...}`` if reading it fails), ``GET /healthz`` (no auth).

Behaviour:

- The replica loads :class:`~moe_lab.inference.OptimizedMoEModel` in ``__init__``. All
  model work runs on one worker thread, so the event loop stays free for new requests.
- Concurrent non-streaming requests are batched by a
  :class:`~moe_lab.serving.DecodeBatcher` into one padded decode (each row keeps its own
  max_tokens, sampling parameters, seed and stop strings); requests that arrive while the
  model is busy form the next batch, of up to ``max_batch_size``.
- Back-pressure: ``max_ongoing_requests`` per replica plus ``max_queued_requests``; beyond
  that Serve answers 503. A request that runs past ``request_timeout_s`` gets 504 (its rows
  stop decoding at the deadline).
- With ``api_key_env`` set, the key is read from that environment variable in the replica
  and every ``/v1`` route needs ``Authorization: Bearer <key>`` (401 otherwise).
- Bad input gets a 4xx naming the field, never a 5xx: invalid JSON, wrong types, an empty
  or too long prompt, max_tokens <= 0 or above ``max_tokens_limit``, temperature < 0,
  top_p outside (0, 1], token ids outside the vocabulary, an unknown model (404).
"""

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from ..errors import ConfigError, MoEError
from ..serving import protocol
from ..serving.args import ServeArgs, resolve_checkpoint, serve_args_from
from ..serving.batching import DecodeBatcher
from ..serving.protocol import APIError

logger = logging.getLogger("moe_lab.serve")

#: the import path a Serve config file names
APP_IMPORT_PATH = "moe_lab.orchestration.serve:app_builder"

api = FastAPI(title="moe_lab completions", docs_url=None, redoc_url=None)


@api.exception_handler(APIError)
async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(status_code=err.status, content=err.to_dict(), headers=err.headers)


def _read_api_key(env: Optional[str]) -> Optional[str]:
    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise ConfigError(f"api_key_env={env!r} but that environment variable is not set in the replica")
    return key


def _attach_monitor(model: Any) -> Any:
    try:
        from ..analytics import ExpertMonitor  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        return ExpertMonitor(model, start=True)
    except Exception as exc:  # an optional extra: the server runs without it
        logger.warning("ExpertMonitor could not be attached: %s", exc)
        return None


@serve.deployment(name="MoECompletions")
@serve.ingress(api)
class MoECompletions:
    """One replica: an OptimizedMoEModel behind the OpenAI completions routes."""

    def __init__(self, args: Union[ServeArgs, Dict[str, Any]]) -> None:
        import torch

        from ..inference import OptimizedMoEModel

        self.args = args = serve_args_from(args)
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        self.api_key = _read_api_key(args.api_key_env)
        self.model = OptimizedMoEModel(
            args.checkpoint,
            device_map=args.device,
            max_experts_in_memory=args.max_experts_in_memory,
            expert_cache_size=args.expert_cache_size,
            eviction_policy=args.eviction_policy,
            prefetch_strategy=args.prefetch_strategy,
        )
        _ = self.model.tokenizer
        self.monitor = _attach_monitor(self.model.model)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-model")  # the model thread
        self.batcher = DecodeBatcher(self._complete_batch, self._executor, args.max_batch_size, args.batch_wait_timeout_s)
        self.created = int(time.time())
        self._lock = threading.Lock()
        self.counters: Dict[str, Any] = {
            "requests": 0, "completed": 0, "streamed": 0, "errors_4xx": 0, "timeouts": 0,
            "prompt_tokens": 0, "completion_tokens": 0,
            "model_seconds": 0.0,  # time the model thread spent on batched completions
        }

    # ---- helpers ----------------------------------------------------------------------
    def _count(self, **inc: Union[int, float]) -> None:
        with self._lock:
            for k, v in inc.items():
                self.counters[k] += v

    def _authorize(self, request: Request) -> None:
        protocol.check_api_key(request.headers.get("authorization"), self.api_key)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _parse(self, request: Request) -> Any:
        """The body as a validated CompletionRequest; APIError (counted as a 4xx) otherwise."""
        from ..inference import CompletionRequest

        try:
            body = protocol.parse_completion_request(await request.body(), model_name=self.args.model_name,
                                                     max_tokens_limit=self.args.max_tokens_limit)
            req = CompletionRequest(body.prompt, body.max_tokens, body.temperature, body.top_p, body.top_k,
                                    body.stop_sequences, body.seed)
            try:  # what only the model knows: the vocabulary and the context length
                self.model.check_request(req, self.args.max_tokens_limit)
            except MoEError as exc:
                raise APIError(400, str(exc), getattr(exc, "field", None)) from None
        except APIError:
            self._count(errors_4xx=1)
            raise
        return body.stream, req

    def _complete_batch(self, reqs: List[Any], deadlines: List[float]) -> List[Any]:
        """On the model thread: one padded decode; each row stops at its deadline."""
        start = time.perf_counter()
        out = self.model.complete(reqs, self.args.max_tokens_limit,
                                  should_stop=lambda i: time.monotonic() > deadlines[i])
        self._count(model_seconds=time.perf_counter() - start)
        return out

    async def _chunks(self, req: Any, deadline: float) -> AsyncIterator[Any]:
        """The model's stream, one chunk per step on the model thread, until ``deadline``."""
        it = self.model.stream(req, self.args.max_tokens_limit)
        last = None
        try:
            while True:
                if time.monotonic() > deadline:
                    self._count(timeouts=1)
                    raise protocol.timeout_error(self.args.request_timeout_s, "stream")
                chunk = await self._run(next, it, None)
                if chunk is None:
                    return
                last = chunk
                yield chunk
        finally:
            await self._run(it.close)  # on the model thread: never while next() runs there
            if last is not None:
                self._count(completed=1, prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens)

    # ---- routes -----------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> Dict[str, Any]:
        return {"status": "ok", "model": self.args.model_name}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        self._authorize(request)
        return protocol.models_response(self.args.model_name, created=self.created,
                                        max_model_len=self.model.config.max_position_embeddings,
                                        checkpoint=Path(self.args.checkpoint).name)

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> Any:
        self._authorize(request)
        cache = await self._run(self.model.stats)
        with self._lock:
            counters = dict(self.counters)
        counters.update(self.batcher.stats())
        monitor = None
        if self.monitor is not None:
            try:
                monitor = await self._run(lambda: self.monitor.get_current_stats().to_dict())
            except Exception as exc:  # monitoring must never break the endpoint
                monitor = {"error": f"{type(exc).__name__}: {exc}"}
        return protocol.stats_response(self.args.model_name, counters, cache, monitor)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        self._count(requests=1)
        self._authorize(request)
        stream, req = await self._parse(request)
        timeout_s = self.args.request_timeout_s
        deadline = time.monotonic() + timeout_s
        if stream:
            self._count(streamed=1)
            frames = protocol.sse_stream(self._chunks(req, deadline), model=self.args.model_name)
            return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            completion = await asyncio.wait_for(self.batcher.submit(req, deadline), timeout=timeout_s)
        except asyncio.TimeoutError:
            self._count(timeouts=1)
            raise protocol.timeout_error(timeout_s) from None
        self._count(completed=1, prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens)
        return protocol.completion_response(completion, model=self.args.model_name)

    def check_health(self) -> None:
        """Serve's replica health check: the model thread must still take work."""
        try:
            self._executor.submit(lambda: None)  # raises once the executor is shut down
        except RuntimeError as exc:
            raise RuntimeError("the model worker thread is gone") from exc


def app_builder(args: Union[ServeArgs, Dict[str, Any]]) -> Any:
    """Build the Serve application from typed arguments (a dict is validated into ServeArgs).

    Returns a bound ``serve.Application``; run it with ``serve.run(app, route_prefix="/")``.
    Raises ConfigError for bad arguments or a directory that is not a checkpoint.
    """
    args = resolve_checkpoint(serve_args_from(args))
    actor: Dict[str, Any] = {"num_cpus": args.num_cpus_per_replica}
    if args.num_gpus_per_replica:
        actor["num_gpus"] = args.num_gpus_per_replica
    return MoECompletions.options(
        num_replicas=args.num_replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        ray_actor_options=actor,
    ).bind(args)


# ---------------------------------------------------------------------------------------
# running it: a local (or joined) cluster, Serve's proxy on loopback, until Ctrl-C / SIGTERM
# ---------------------------------------------------------------------------------------

APP_NAME = "moe-lab"


def start_server(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None) -> str:
    """Start Ray (a local cluster unless ``address``), Serve's proxy on ``host:port`` and the app.

    Returns the base URL. Raises ConfigError on bad arguments, MoEError when the app fails.
    """
    from ray.serve.schema import LoggingConfig

    from .cluster import init_ray

    app = app_builder(args)  # validated before Ray starts
    init_ray(address=address, log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO chatter from the driver
    quiet = LoggingConfig(log_level="WARNING", enable_access_log=False)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": args.request_timeout_s + 30},
                logging_config=quiet)
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config=quiet)
    return f"http://{host}:{port}"


def block_until_signal() -> str:
    """Block until SIGINT or SIGTERM; returns the signal's name."""
    import signal

    got: List[str] = []
    done = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        got.append(signal.Signals(signum).name)
        done.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not done.wait(0.5):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return got[0]


def shutdown_server() -> None:
    """Delete the apps, stop Serve and disconnect from (or stop) the Ray cluster."""
    import ray

    from .cluster import shutdown_ray

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            shutdown_ray()
