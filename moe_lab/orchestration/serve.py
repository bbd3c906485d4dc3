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
  ``{"error": ...}`` if reading it fails), ``GET /healthz`` (no auth; with a key set it
  names no model), ``GET /openapi.json`` and ``GET /docs`` (the schema and its Swagger page).

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
  and every route but ``/healthz`` needs ``Authorization: Bearer <key>`` (401 otherwise):
  the ``/v1`` routes, ``/openapi.json`` and ``/docs``. :func:`start_server` also guards the
  proxy's own ``/-/routes`` (:mod:`moe_lab.serving.proxy_guard`).
- Request bodies: at most ``max_body_bytes``. A larger Content-Length gets 413 before the
  body is read (at the proxy, and in the replica); a chunked body gets 413 as soon as what
  arrived passes the limit.
- Bad input gets a 4xx naming the field, never a 5xx: invalid JSON, wrong types, an empty
  or too long prompt, max_tokens <= 0 or above ``max_tokens_limit``, temperature < 0,
  top_p outside (0, 1], token ids outside the vocabulary, an unknown model (404).

Start-up: :func:`app_builder` checks the checkpoint in the driver before anything of Ray
runs (:func:`~moe_lab.serving.preflight.check_servable_checkpoint`). A replica that fails
anyway (no such device, the key not set in the replica, out of memory) raises
:class:`ReplicaStartupError` whose message is its root cause on one line;
:func:`start_server` finds that line in Serve's deployment status and raises it in the
driver, instead of Serve's "Failed to update the deployments" and its wrapper traceback.
"""

import asyncio
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from ..errors import ConfigError, DistributedError, MoEError
from ..serving import protocol, proxy_guard
from ..serving.args import ServeArgs, resolve_checkpoint, serve_args_from
from ..serving.batching import DecodeBatcher
from ..serving.preflight import describe_exception
from ..serving.protocol import APIError

logger = logging.getLogger("moe_lab.serve")

#: the import path a Serve config file names
APP_IMPORT_PATH = "moe_lab.orchestration.serve:app_builder"

# the schema and docs are routes of the deployment below, behind the key when one is set
api = FastAPI(title="moe_lab completions", docs_url=None, redoc_url=None, openapi_url=None)

#: what a replica's start-up failure says first; :func:`start_server` looks for it
STARTUP_FAILURE = "moe_lab replica failed to start: "


class ReplicaStartupError(DistributedError):
    """A replica of the server failed in its constructor; the message is the root cause."""


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
        try:
            self._start(serve_args_from(args))
        except Exception as exc:  # Serve wraps this in its traceback; the driver finds the line
            raise ReplicaStartupError(STARTUP_FAILURE + describe_exception(exc, limit=1000)) from exc

    def _start(self, args: ServeArgs) -> None:
        import torch

        from ..inference import OptimizedMoEModel

        self.args = args
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
            declared = protocol.content_length(request.headers.get("content-length"))
            raw = await protocol.read_body(request.stream(), declared, self.args.max_body_bytes)
            body = protocol.parse_completion_request(raw, model_name=self.args.model_name,
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
        if self.api_key is not None:  # open to every caller: it tells them nothing
            return {"status": "ok"}
        return {"status": "ok", "model": self.args.model_name}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Any:
        self._authorize(request)
        return api.openapi()

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Any:
        from fastapi.openapi.docs import get_swagger_ui_html

        self._authorize(request)
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title=api.title)

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

    The checkpoint is checked first, in this process and before any Ray call
    (:func:`~moe_lab.serving.preflight.check_servable_checkpoint`), so ``serve run`` and
    ``serve deploy`` of a Serve config naming this builder refuse a broken checkpoint at once.

    Returns a bound ``serve.Application``; run it with ``serve.run(app, route_prefix="/")``
    (or :func:`deploy`, which reports a replica's start-up failure by its root cause).

    Raises:
        ConfigError: bad arguments (the message names the field).
        CheckpointError: a checkpoint the replicas could not load (one line).
    """
    args = resolve_checkpoint(serve_args_from(args))  # the checkpoint is checked here: no Ray yet
    actor: Dict[str, Any] = {"num_cpus": args.num_cpus_per_replica}
    if args.num_gpus_per_replica:
        actor["num_gpus"] = args.num_gpus_per_replica
    options: Dict[str, Any] = {}
    if args.replica_start_attempts is not None:
        options["max_constructor_retry_count"] = args.replica_start_attempts
    return MoECompletions.options(
        num_replicas=args.num_replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        ray_actor_options=actor,
        **options,
    ).bind(args)


def startup_failure(messages: List[str]) -> Optional[str]:
    """The root cause in Serve's status ``messages`` (the deployments' first, the app's last):
    the line a replica's :class:`ReplicaStartupError` wrote, else the last line of the first
    message (a traceback's exception), else None."""
    for message in messages:
        found = re.findall(re.escape(STARTUP_FAILURE) + r"(.+)", message)
        if found:
            return found[-1].strip()
    for message in messages:
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    return None


def deploy(app: Any, name: str, route_prefix: str = "/", **run_options: Any) -> None:
    """``serve.run(app)`` on a running Serve, with a failed deploy reported by its root cause.

    Raises:
        ReplicaStartupError: a replica failed to start (the message is its root cause, one line).
    """
    try:
        serve.run(app, name=name, route_prefix=route_prefix, **run_options)
    except RuntimeError as exc:
        try:
            status = serve.status().applications.get(name)
        except Exception:  # the status is only there to explain the failure
            status = None
        if status is None:
            raise
        messages = [d.message for d in status.deployments.values() if d.message] + [status.message or ""]
        cause = startup_failure(messages)
        if cause is None:
            raise
        raise ReplicaStartupError(
            f"the server did not start: {cause} (Serve's replica logs: the serve/ folder of Ray's session logs)"
        ) from None


# ---------------------------------------------------------------------------------------
# running it: a local (or joined) cluster, Serve's proxy on loopback, until Ctrl-C / SIGTERM
# ---------------------------------------------------------------------------------------

APP_NAME = "moe-lab"


def start_server(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None) -> str:
    """Start Ray (a local cluster unless ``address``), Serve's proxy on ``host:port`` and the app.

    The checkpoint is checked before Ray starts. The proxy guards its own ``/-/routes`` with
    the key and refuses a declared body over ``max_body_bytes``
    (:mod:`moe_lab.serving.proxy_guard`; for a local cluster, which inherits this process's
    environment).

    Returns the base URL.

    Raises:
        ConfigError, CheckpointError: bad arguments or checkpoint (before Ray starts).
        ReplicaStartupError: a replica failed to start; the message is its root cause.
    """
    from ray.serve.schema import LoggingConfig

    from .cluster import init_ray

    app = app_builder(args)  # validated before Ray starts
    configure_proxy(args)
    init_ray(address=address, log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO chatter from the driver
    quiet = LoggingConfig(log_level="WARNING", enable_access_log=False)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": args.request_timeout_s + 30},
                logging_config=quiet)
    deploy(app, APP_NAME, route_prefix="/", logging_config=quiet)
    return f"http://{host}:{port}"


_PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


def configure_proxy(args: ServeArgs) -> None:
    """Point Serve's proxy at :func:`~moe_lab.serving.proxy_guard.proxy_middlewares`, with the
    key and body limit of ``args``, through this process's environment: a local cluster
    started after this call inherits it (a cluster joined with ``address`` does not; set the
    same variables on its nodes, as ``cluster/rayservice.yaml`` does)."""
    callback = "moe_lab.serving.proxy_guard:proxy_middlewares"
    if os.environ.get(_PROXY_CALLBACK, callback) != callback:
        logger.warning("%s is set by the user: /-/routes is not guarded by the API key", _PROXY_CALLBACK)
        return
    os.environ[_PROXY_CALLBACK] = callback
    # the proxy imports moe_lab (and torch with it) for the guard before it reports ready;
    # Serve's 5 s readiness check would kill it on a busy machine
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    os.environ[proxy_guard.MAX_BODY_VAR] = str(args.max_body_bytes)
    if args.api_key_env:
        os.environ[proxy_guard.KEY_ENV_VAR] = args.api_key_env
    else:
        os.environ.pop(proxy_guard.KEY_ENV_VAR, None)


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
