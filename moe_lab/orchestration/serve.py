"""Ray Serve app: an OpenAI-compatible completions server for a moe_lab checkpoint.

    from ray import serve
    from moe_lab.serving import ServeArgs
    from moe_lab.orchestration.serve import app_builder
    serve.run(app_builder(ServeArgs(checkpoint="outputs/demo/model")), route_prefix="/")

or ``moe-lab serve outputs/demo/model`` (see :mod:`moe_lab.cli._serve`), or a Ray Serve
config file whose application has ``import_path: moe_lab.orchestration.serve:app_builder``
and ``args:`` holding :class:`~moe_lab.serving.ServeArgs` fields (``cluster/rayservice.yaml``).

This module is the deployment only: the protocol (parsing, validation, responses, SSE,
errors) is :mod:`moe_lab.serving.protocol`, the metrics :mod:`moe_lab.serving.metrics` and
the decoding the model's :class:`~moe_lab.inference.engine.InferenceEngine`; each route
parses with the protocol, submits to the engine and formats with the protocol.

Routes (FastAPI ingress; errors in the OpenAI shape ``{"error": {"message", "type", "param",
"code"}}``):

- ``POST /v1/completions``: ``model``, ``prompt`` (a string or a list of token ids),
  ``max_tokens``, ``temperature``, ``top_p``, ``top_k`` (extension), ``stop``, ``seed``,
  ``n`` (1 only), ``stream`` (server-sent events, ending with ``data: [DONE]``).
- ``POST /v1/chat/completions``: the same fields with ``messages`` instead of ``prompt``;
  the prompt is the tokenizer's chat template, or ``"<role>: <content>\\n"`` per message
  then ``"assistant:"`` when it has none (:func:`~moe_lab.serving.protocol.render_chat`);
  streamed as ``chat.completion.chunk`` deltas.
- ``GET /v1/models``, ``GET /v1/stats`` (expert-cache stats, the engine's counters under
  ``engine``, tokens served, requests, the residency chosen at start-up, and ``monitor``:
  the live stats of the :class:`~moe_lab.analytics.ExpertMonitor` each replica attaches at
  start-up; the key is absent if it could not be attached, and holds ``{"error": ...}`` if
  reading it fails), ``GET /metrics`` (Prometheus: time to first token, inter-token
  latency, queue depth, running batch, tokens, expert-cache hit rate; this replica's),
  ``GET /healthz`` (no auth; with a key set it names no model), ``GET /openapi.json`` (every
  request body's schema is the pydantic model that validates it) and ``GET /docs``.

Behaviour:

- The replica loads :class:`~moe_lab.inference.OptimizedMoEModel` in ``__init__`` (with
  ``max_experts_in_memory: auto`` by default; the residency chosen is logged) and starts its
  engine's step loop on a background thread, with ``max_batch_size`` KV slots. Requests are
  batched continuously: a new one joins the running batch at the next decode step, a
  finished one frees its slot; more requests than slots wait in the engine's queue.
- A client that goes away (a closed stream, a dropped connection) cancels its request: its
  slot is free at the next decode step.
- Back-pressure: ``max_ongoing_requests`` per replica plus ``max_queued_requests``; beyond
  that Serve answers 503. A request that runs past ``request_timeout_s`` gets 504 (it is
  cancelled at the deadline; a stream gets an error frame, then ``[DONE]``).
- With ``api_key_env`` set, the key is read from that environment variable in the replica
  and every route but ``/healthz`` needs ``Authorization: Bearer <key>`` (401 otherwise):
  the ``/v1`` routes, ``/openapi.json`` and ``/docs``. :func:`start_server` also guards the
  proxy's own ``/-/routes`` (:mod:`moe_lab.serving.proxy_guard`).
- SIGTERM drain (:func:`drain`; ``moe-lab serve`` runs it on SIGTERM before stopping):
  every replica answers new requests with 503 (``/healthz`` too) while the requests in
  flight finish, streams to their end; then Serve stops.
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
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from ..errors import ConfigError, DistributedError, MoEError
from ..serving import protocol, proxy_guard
from ..serving.args import ServeArgs, resolve_checkpoint, serve_args_from
from ..serving.metrics import ServeMetrics
from ..serving.preflight import describe_exception
from ..serving.protocol import APIError

logger = logging.getLogger("moe_lab.serve")

#: the import path a Serve config file names
APP_IMPORT_PATH = "moe_lab.orchestration.serve:app_builder"

#: response header naming the replica that answered a completion (its Serve replica id)
REPLICA_HEADER = "X-MoE-Lab-Replica"

# the schema and docs are routes of the deployment below, behind the key when one is set
api = FastAPI(title="moe_lab completions", docs_url=None, redoc_url=None, openapi_url=None)

#: what a replica's start-up failure says first; :func:`start_server` looks for it
STARTUP_FAILURE = "moe_lab replica failed to start: "


class ReplicaStartupError(DistributedError):
    """A replica of the server failed in its constructor; the message is the root cause."""


#: the request bodies' schemas (and the models they nest), added to the OpenAPI document
_SCHEMAS: Dict[str, Any] = {}


def openapi_schema() -> Dict[str, Any]:
    """The app's OpenAPI document: the routes, with each request body's schema (the pydantic
    model that validates it, :mod:`moe_lab.serving.protocol`)."""
    if api.openapi_schema is None:
        schema = api.openapi()
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_SCHEMAS)
    return api.openapi_schema


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


def _residency(model: Any, requested: Any) -> str:
    """One line: how many experts per MoE layer are resident on the device, and why."""
    num = model.config.num_experts
    n = model.max_experts_in_memory
    how = "all experts resident" if n >= num else "the rest offloaded behind the expert cache"
    return (f"max_experts_in_memory={requested!r}: {min(n, num)} of {num} experts per MoE layer on {model.device} "
            f"({how})")


@serve.deployment(name="MoECompletions")
@serve.ingress(api)
class MoECompletions:
    """One replica: an OptimizedMoEModel's inference engine behind the OpenAI routes."""

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
        self.residency = _residency(self.model, args.max_experts_in_memory)
        logger.setLevel(logging.INFO)
        logger.info("%s", self.residency)
        self.tokenizer = self.model.tokenizer
        self.model.max_batch_size = args.max_batch_size  # KV slots, before the engine is built
        self.engine = self.model.engine
        self.engine.start()  # the step loop on its own thread: the event loop stays free
        self.monitor = _attach_monitor(self.model.model)
        self.metrics = ServeMetrics(self.engine.stats, self.model.expert_loader.stats)
        self.created = int(time.time())
        self.draining = False  # set by reconfigure({"draining": True}): new requests get 503
        self._lock = threading.Lock()
        self.counters: Dict[str, Any] = {
            "requests": 0, "completed": 0, "streamed": 0, "errors_4xx": 0, "timeouts": 0, "cancelled": 0,
            "prompt_tokens": 0, "completion_tokens": 0,
            "in_flight": 0,  # engine requests submitted and not finished
        }

    def __del__(self) -> None:  # Serve calls this when it stops the replica
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # ---- helpers ----------------------------------------------------------------------
    def _count(self, **inc: Union[int, float]) -> None:
        with self._lock:
            for k, v in inc.items():
                self.counters[k] += v

    def _authorize(self, request: Request) -> None:
        protocol.check_api_key(request.headers.get("authorization"), self.api_key)

    async def _parse(self, request: Request, chat: bool) -> Any:
        """The body as a validated CompletionRequest; APIError (counted as a 4xx) otherwise."""
        from ..inference import CompletionRequest

        try:
            declared = protocol.content_length(request.headers.get("content-length"))
            raw = await protocol.read_body(request.stream(), declared, self.args.max_body_bytes)
            body = protocol.parse_completion_request(raw, model_name=self.args.model_name,
                                                     max_tokens_limit=self.args.max_tokens_limit,
                                                     body=protocol.ChatBody if chat else protocol.CompletionBody)
            prompt = protocol.render_chat(body.messages, self.tokenizer) if chat else body.prompt
            req = CompletionRequest(prompt, body.max_tokens, body.temperature, body.top_p, body.top_k,
                                    body.stop_sequences, body.seed)
        except APIError:
            self._count(errors_4xx=1)
            raise
        return body.stream, req

    def reconfigure(self, config: Dict[str, Any]) -> None:
        """Serve's ``user_config`` hook, called on every replica: ``{"draining": True}`` makes
        this replica answer new requests with 503; those in flight go on (see :func:`drain`)."""
        if config.get("draining") and not self.draining:
            self.draining = True
            logger.info("draining: %d requests in flight; new requests get 503", self.counters["in_flight"])

    def drain_state(self) -> Dict[str, Any]:
        """``{"replica", "draining", "in_flight"}`` of this replica (:func:`drain` polls it)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, "draining": self.draining,
                "in_flight": self.counters["in_flight"]}

    def _submit(self, creq: Any) -> Tuple[Any, "asyncio.Queue[Any]"]:
        """Validate ``creq`` against the model and queue it on the engine; its events arrive
        on the returned queue (put there from the engine thread)."""
        loop = asyncio.get_running_loop()
        events: "asyncio.Queue[Any]" = asyncio.Queue()
        held: List[Any] = []  # the request, for the finish callback (set before the loop runs it)

        def on_event(ev: Any) -> None:  # on the engine thread: never raise there
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
                if ev.finished:
                    loop.call_soon_threadsafe(self._finished, held)
            except RuntimeError:  # the event loop is closed: the replica is stopping
                pass

        try:  # what only the model knows: the vocabulary and the context length
            req = self.model.submit(creq, self.args.max_tokens_limit, on_event=on_event)
        except MoEError as exc:
            self._count(errors_4xx=1)
            raise APIError(400, str(exc), getattr(exc, "field", None)) from None
        held.append(req)
        self._count(in_flight=1)
        return req, events

    def _finished(self, held: List[Any]) -> None:
        """On the event loop, once per engine request that finished (however it ended)."""
        req = held[0]
        self.metrics.observe(req)
        self._count(prompt_tokens=len(req.prompt), completion_tokens=req.num_generated,
                    cancelled=int(req.finish_reason == "cancelled"), in_flight=-1)

    async def _next_event(self, events: "asyncio.Queue[Any]", deadline: float, what: str) -> Any:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(events.get(), remaining)
        except asyncio.TimeoutError:
            self._count(timeouts=1)
            raise protocol.timeout_error(self.args.request_timeout_s, what) from None

    async def _complete(self, req: Any, events: "asyncio.Queue[Any]", deadline: float) -> Any:
        """The whole completion; the request is cancelled if this is (a client gone, a timeout)."""
        try:
            while not (await self._next_event(events, deadline, "request")).finished:
                pass
        finally:
            if not req.finished:
                self.engine.cancel(req)  # its slot is free at the next step
        self._count(completed=1)
        return self.model.completion(req)

    async def _chunks(self, req: Any, events: "asyncio.Queue[Any]", deadline: float) -> AsyncIterator[Any]:
        """The request's chunks as the engine produces them, until ``deadline``. Closing this
        early (the client went away) cancels the request, which frees its slot."""
        try:
            while True:
                ev = await self._next_event(events, deadline, "stream")
                if ev.finished or ev.text:
                    yield self.model.chunk(ev, len(req.prompt))
                if ev.finished:
                    self._count(completed=1)
                    return
        finally:
            if not req.finished:
                self.engine.cancel(req)

    async def _serve(self, request: Request, chat: bool) -> Any:
        self._count(requests=1)
        self._authorize(request)
        if self.draining:
            raise protocol.draining_error()
        stream, creq = await self._parse(request, chat)
        req, events = self._submit(creq)
        deadline = time.monotonic() + self.args.request_timeout_s
        name = self.args.model_name
        # which replica answered (logs, debugging a multi-replica deployment)
        replica = {REPLICA_HEADER: serve.get_replica_context().replica_id.unique_id}
        if stream:
            self._count(streamed=1)
            frames = protocol.sse_stream(self._chunks(req, events, deadline), model=name, chat=chat)
            return StreamingResponse(frames, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **replica})
        completion = await self._complete(req, events, deadline)
        if chat:
            return JSONResponse(protocol.chat_completion_response(completion, model=name), headers=replica)
        return JSONResponse(protocol.completion_response(completion, model=name), headers=replica)

    # ---- routes -----------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> Any:
        if self.draining:  # a load balancer in front takes this server out
            return JSONResponse({"status": "draining"}, status_code=503)
        if self.api_key is not None:  # open to every caller: it tells them nothing
            return {"status": "ok"}
        return {"status": "ok", "model": self.args.model_name}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Any:
        self._authorize(request)
        return openapi_schema()

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
        cache = self.model.expert_loader.stats()
        with self._lock:
            counters = dict(self.counters)
        monitor = None
        if self.monitor is not None:
            try:
                monitor = await asyncio.to_thread(lambda: self.monitor.get_current_stats().to_dict())
            except Exception as exc:  # monitoring must never break the endpoint
                monitor = {"error": f"{type(exc).__name__}: {exc}"}
        return protocol.stats_response(self.args.model_name, counters, cache, monitor, engine=self.engine.stats(),
                                       residency=self.residency)

    @api.get("/metrics")
    async def prometheus(self, request: Request) -> Response:
        """Prometheus text exposition of this replica (see :mod:`moe_lab.serving.metrics`)."""
        self._authorize(request)
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    @api.post("/v1/completions", openapi_extra=protocol.request_body_schema(protocol.CompletionBody, _SCHEMAS))
    async def completions(self, request: Request) -> Any:
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=protocol.request_body_schema(protocol.ChatBody, _SCHEMAS))
    async def chat_completions(self, request: Request) -> Any:
        return await self._serve(request, chat=True)

    def startup_residency(self) -> str:
        """The residency line this replica logged at start-up (for the CLI, through a handle)."""
        return self.residency

    def check_health(self) -> None:
        """Serve's replica health check: the engine's step loop must still run."""
        if not self.engine.loop_alive:  # started in _start; gone if a step raised
            raise RuntimeError("the inference engine's step loop is not running")


def app_builder(args: Union[ServeArgs, Dict[str, Any]], draining: bool = False) -> Any:
    """Build the Serve application from typed arguments (a dict is validated into ServeArgs).

    The checkpoint is checked first, in this process and before any Ray call
    (:func:`~moe_lab.serving.preflight.check_servable_checkpoint`), so ``serve run`` and
    ``serve deploy`` of a Serve config naming this builder refuse a broken checkpoint at once.

    ``draining=True`` builds the same app with every replica draining (see :func:`drain`).

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
    autoscaling = args.autoscaling_config()
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = args.num_replicas
    return MoECompletions.options(
        user_config={"draining": draining},  # see drain()
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        ray_actor_options=actor,
        **options,
    ).bind(args)


def drain(args: ServeArgs, name: str, route_prefix: str = "/", timeout_s: Optional[float] = None,
          **run_options: Any) -> float:
    """Drain the running app ``name`` (built from ``args``): every replica answers new
    requests with 503 while the requests in flight finish, streams included. Returns once
    every replica has none left (or after ``timeout_s``, default ``request_timeout_s`` + 5 s:
    a request runs no longer than that), with the seconds it took; stop Serve after it.

    Serve applies the new ``user_config`` to each replica in place (its ``reconfigure``,
    no restart), and ``serve.run`` returns once all of them have it. Then each replica's
    :meth:`~MoECompletions.drain_state` is polled through the app's handle until every one
    has reported no request in flight (new ones are refused, so that count only falls).
    ``run_options`` must be those the app was deployed with (e.g. its ``logging_config``),
    so that nothing else changes.
    """
    start = time.monotonic()
    deadline = start + (args.request_timeout_s + 5 if timeout_s is None else timeout_s)
    serve.run(app_builder(args, draining=True), name=name, route_prefix=route_prefix, **run_options)
    handle = serve.get_app_handle(name)
    idle: set = set()
    want = _running_replicas(name) or args.num_replicas  # an autoscaled app may run more than num_replicas
    while len(idle) < want and time.monotonic() < deadline:
        state = handle.drain_state.remote().result(timeout_s=30)
        if state["draining"] and state["in_flight"] == 0:
            idle.add(state["replica"])
        else:
            time.sleep(0.02)
    if len(idle) < want:
        logger.warning("drain: %d of %d replicas still had requests in flight after the timeout",
                       want - len(idle), want)
    time.sleep(0.2)  # the last frames of a stream that just ended reach the client
    return time.monotonic() - start


def _running_replicas(name: str) -> int:
    """Replicas of app ``name`` that Serve reports RUNNING (0 if it knows no such app)."""
    app = serve.status().applications.get(name)
    if app is None:
        return 0
    return sum(int(d.replica_states.get("RUNNING", 0)) for d in app.deployments.values())


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
    from .cluster import init_ray

    app = app_builder(args)  # validated before Ray starts
    configure_proxy(args)
    init_ray(address=address, log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO chatter from the driver
    quiet = quiet_logging()
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": args.request_timeout_s + 30},
                logging_config=quiet)
    deploy(app, APP_NAME, route_prefix="/", logging_config=quiet)
    return f"http://{host}:{port}"


def quiet_logging() -> Any:
    """The Serve logging config of :func:`start_server` (warnings only, no access log)."""
    from ray.serve.schema import LoggingConfig

    return LoggingConfig(log_level="WARNING", enable_access_log=False)


def drain_server(args: ServeArgs) -> float:
    """:func:`drain` the app :func:`start_server` runs (``moe-lab serve`` on SIGTERM)."""
    return drain(args, APP_NAME, route_prefix="/", logging_config=quiet_logging())


def startup_residency() -> str:
    """The residency line a replica of the running app logged at start-up."""
    return serve.get_app_handle(APP_NAME).startup_residency.remote().result(timeout_s=60)


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
