"""Ray Serve app: an OpenAI-compatible completions server for a moe_lab checkpoint.

    from ray import serve
    from moe_lab.orchestration.serve import ServeArgs, app_builder
    serve.run(app_builder(ServeArgs(checkpoint="outputs/demo/model")), route_prefix="/")

or ``moe-lab serve outputs/demo/model`` (see :mod:`moe_lab.cli._serve`), or a Serve config
file whose application has ``import_path: moe_lab.orchestration.serve:app_builder`` and
``args:`` holding :class:`ServeArgs` fields (``jobs/serve.yaml``).

Routes (FastAPI ingress; JSON errors in the OpenAI shape ``{"error": {"message", "type",
"param", "code"}}``):

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
- Concurrent non-streaming requests are batched with ``@serve.batch`` into one padded
  decode (each row keeps its own max_tokens, sampling parameters, seed and stop strings).
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
import hmac
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)
from ray import serve

from ..errors import ConfigError, MoEError

logger = logging.getLogger("moe_lab.serve")

#: the import path a Serve config file names
APP_IMPORT_PATH = "moe_lab.orchestration.serve:app_builder"


class ServeArgs(BaseModel):
    """Arguments of the serving app (validated once, at the boundary)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint directory (config.json + model.safetensors)")
    model_name: str = Field("moe-lab", min_length=1, description="the id clients send as `model`")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    max_experts_in_memory: int = Field(4, ge=1, description="experts per MoE layer on the device")
    expert_cache_size: int = Field(8, ge=0, description="host copies of experts per MoE layer")
    eviction_policy: str = Field("lru", description="expert-cache eviction: lru or lfu")
    prefetch_strategy: str = Field("usage_based", description="expert prefetch: usage_based or none")
    max_batch_size: int = Field(8, ge=1, description="requests batched into one decode")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long a batch waits to fill (0: take what is queued)")
    max_ongoing_requests: int = Field(64, ge=1, description="requests in flight per replica")
    max_queued_requests: int = Field(128, ge=-1, description="requests waiting beyond that (-1: unbounded); then 503")
    request_timeout_s: float = Field(60.0, gt=0, description="per request; then 504")
    max_tokens_limit: int = Field(256, ge=1, description="largest max_tokens a request may ask for")
    api_key_env: Optional[str] = Field(None, min_length=1, description="env var holding the API key (unset: no auth)")
    num_replicas: int = Field(1, ge=1)
    num_cpus_per_replica: float = Field(1.0, ge=0)
    num_gpus_per_replica: float = Field(0.0, ge=0)
    torch_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads per replica")

    @field_validator("eviction_policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        from ..inference.expert_cache import EVICTION_POLICIES

        if v not in EVICTION_POLICIES:
            raise ValueError(f"must be one of {list(EVICTION_POLICIES)}, got {v!r}")
        return v

    @field_validator("prefetch_strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from ..inference.expert_cache import PREFETCH_STRATEGIES

        if v not in PREFETCH_STRATEGIES:
            raise ValueError(f"must be one of {list(PREFETCH_STRATEGIES)}, got {v!r}")
        return v


class CompletionBody(BaseModel):
    """The accepted fields of ``POST /v1/completions`` (strict types; unknown fields are ignored)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    prompt: Union[str, List[StrictInt]]
    max_tokens: StrictInt = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[StrictInt] = None
    stop: Union[None, str, List[str]] = None
    seed: Optional[StrictInt] = None
    n: StrictInt = 1
    stream: StrictBool = False
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def _error(status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
           headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    code = {401: "invalid_api_key", 404: "model_not_found", 503: "overloaded", 504: "timeout"}.get(status)
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": param, "code": code}},
        headers=headers,
    )


def _validation_message(exc: ValidationError) -> tuple:
    first = exc.errors()[0]
    tags = ("str", "int", "float", "bool", "none", "list[int]", "list[str]")  # pydantic's union-member labels
    loc = [p for p in first.get("loc", ()) if isinstance(p, str) and p not in tags and not p.startswith("function-")]
    field = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    return field, f"{where}: {first.get('msg', 'invalid value')} (got {first.get('input')!r})"


def _set_result(fut: "asyncio.Future", value: Any) -> None:
    if not fut.done():  # a timed-out caller may have gone
        fut.set_result(value)


def _set_exception(fut: "asyncio.Future", exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


api = FastAPI(title="moe_lab completions", docs_url=None, redoc_url=None)


@serve.deployment(name="MoECompletions")
@serve.ingress(api)
class MoECompletions:
    """One replica: an OptimizedMoEModel behind the OpenAI completions routes."""

    def __init__(self, args: ServeArgs) -> None:
        import torch

        from ..inference import OptimizedMoEModel

        if isinstance(args, dict):
            args = ServeArgs(**args)
        self.args = args
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        self.api_key: Optional[str] = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                raise ConfigError(f"api_key_env={args.api_key_env!r} but that environment variable is not set in the replica")
            self.api_key = key
        self.model = OptimizedMoEModel(
            args.checkpoint,
            device_map=args.device,
            max_experts_in_memory=args.max_experts_in_memory,
            expert_cache_size=args.expert_cache_size,
            eviction_policy=args.eviction_policy,
            prefetch_strategy=args.prefetch_strategy,
        )
        _ = self.model.tokenizer
        self.monitor = self._attach_monitor()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-model")
        self._lock = threading.Lock()
        self._pending: List[tuple] = []  # (CompletionRequest, deadline, future) waiting for the model
        self.created = int(time.time())
        self.counters: Dict[str, Any] = {
            "requests": 0, "completed": 0, "streamed": 0, "errors_4xx": 0, "timeouts": 0,
            "prompt_tokens": 0, "completion_tokens": 0, "batches": 0, "batched_requests": 0, "max_batch": 0,
            "model_seconds": 0.0,  # time the model thread spent on batched completions
        }
        self._batched.set_max_batch_size(args.max_batch_size)
        self._batched.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    def _attach_monitor(self) -> Any:
        try:
            from ..analytics import ExpertMonitor  # type: ignore[attr-defined]
        except ImportError:
            return None
        try:
            return ExpertMonitor(self.model.model, start=True)
        except Exception as exc:  # an optional extra: the server runs without it
            logger.warning("ExpertMonitor could not be attached: %s", exc)
            return None

    # ---- helpers ----------------------------------------------------------------------
    def _count(self, **inc: int) -> None:
        with self._lock:
            for k, v in inc.items():
                self.counters[k] += v

    def _auth(self, request: Request) -> Optional[JSONResponse]:
        if self.api_key is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return _error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", kind="authentication_error",
                          headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _bad(self, status: int, message: str, param: Optional[str] = None) -> JSONResponse:
        self._count(errors_4xx=1)
        return _error(status, message, param)

    async def _parse(self, request: Request) -> Union[JSONResponse, tuple]:
        from ..inference import CompletionRequest

        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return self._bad(400, f"body: invalid JSON ({exc})")
        if not isinstance(body, dict):
            return self._bad(400, f"body: expected a JSON object, got {type(body).__name__}")
        try:
            b = CompletionBody.model_validate(body)
        except ValidationError as exc:
            field, msg = _validation_message(exc)
            return self._bad(400, msg, field)
        if b.model is not None and b.model != self.args.model_name:
            return self._bad(404, f"model: {b.model!r} is not served here; available: [{self.args.model_name!r}]", "model")
        if b.n != 1:
            return self._bad(400, f"n: only n=1 is supported, got {b.n}", "n")
        if b.best_of not in (None, 1):
            return self._bad(400, f"best_of: only 1 is supported, got {b.best_of}", "best_of")
        if b.echo or b.logprobs is not None:
            name = "echo" if b.echo else "logprobs"
            return self._bad(400, f"{name}: not supported", name)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(b, name) != 0:
                return self._bad(400, f"{name}: not supported (must be 0)", name)
        stop = [b.stop] if isinstance(b.stop, str) else list(b.stop or [])
        if len(stop) > 4:
            return self._bad(400, f"stop: at most 4 stop sequences, got {len(stop)}", "stop")
        req = CompletionRequest(b.prompt, b.max_tokens, b.temperature, b.top_p, b.top_k, stop, b.seed)
        try:
            ids = self.model.check_request(req, self.args.max_tokens_limit)
        except MoEError as exc:
            return self._bad(400, str(exc), getattr(exc, "field", None))
        return b, req, ids

    def _response(self, completion: Any) -> Dict[str, Any]:
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.args.model_name,
            "choices": [{"text": completion.text, "index": 0, "logprobs": None, "finish_reason": completion.finish_reason}],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
        }

    # ---- batching ---------------------------------------------------------------------
    # @serve.batch collects concurrent requests. Serve forms its next batch as soon as the
    # previous one is handed over, so while the model is busy several small batches pile up;
    # they are merged here: each batch queues its items and schedules one "drain" on the
    # model thread, and a drain decodes up to max_batch_size queued items (from any batch)
    # as one padded batch. Drains run in order, so every item is taken by its own batch's
    # drain at the latest.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, max_concurrent_batches=1024)
    async def _batched(self, items: List[tuple]) -> List[Any]:
        """``items``: (CompletionRequest, deadline) pairs; returns their Completions."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        with self._lock:
            self._pending.extend((req, deadline, fut) for (req, deadline), fut in zip(items, futures))
        await self._run(self._drain, loop)
        return list(await asyncio.gather(*futures, return_exceptions=True))  # one failure stays its own

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the model thread: decode up to max_batch_size queued requests together."""
        now = time.monotonic()
        with self._lock:
            expired = [item for item in self._pending if item[1] <= now]  # their callers got 504 already
            self._pending = [item for item in self._pending if item[1] > now]
            take = self._pending[: self.args.max_batch_size]
            del self._pending[: len(take)]
        for _, _, fut in expired:
            loop.call_soon_threadsafe(_set_exception, fut, asyncio.TimeoutError())
        with self._lock:
            if take:
                self.counters["batches"] += 1
                self.counters["batched_requests"] += len(take)
                self.counters["max_batch"] = max(self.counters["max_batch"], len(take))
        if not take:
            return
        reqs = [r for r, _, _ in take]
        deadlines = [d for _, d, _ in take]
        start = time.perf_counter()
        try:
            results = self.model.complete(reqs, self.args.max_tokens_limit,
                                          should_stop=lambda i: time.monotonic() > deadlines[i])
            self._count(model_seconds=time.perf_counter() - start)
        except Exception as exc:  # a bug, not bad input (validated before queueing): fail these requests
            for _, _, fut in take:
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            return
        for (_, _, fut), res in zip(take, results):
            loop.call_soon_threadsafe(_set_result, fut, res)

    # ---- routes -----------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> Dict[str, Any]:
        return {"status": "ok", "model": self.args.model_name}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        denied = self._auth(request)
        if denied:
            return denied
        return {
            "object": "list",
            "data": [{
                "id": self.args.model_name, "object": "model", "created": self.created, "owned_by": "moe_lab",
                "max_model_len": self.model.config.max_position_embeddings, "checkpoint": Path(self.args.checkpoint).name,
            }],
        }

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> Any:
        denied = self._auth(request)
        if denied:
            return denied
        cache = await self._run(self.model.stats)
        with self._lock:
            counters = dict(self.counters)
        out: Dict[str, Any] = {
            "model": self.args.model_name,
            "requests": counters,
            "tokens_served": counters["completion_tokens"],
            "expert_cache": cache,
        }
        if self.monitor is not None:
            try:
                out["monitor"] = await self._run(lambda: self.monitor.get_current_stats().to_dict())
            except Exception as exc:  # monitoring must never break the endpoint
                out["monitor"] = {"error": f"{type(exc).__name__}: {exc}"}
        return json.loads(json.dumps(out, default=float))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        self._count(requests=1)
        denied = self._auth(request)
        if denied:
            return denied
        parsed = await self._parse(request)
        if isinstance(parsed, JSONResponse):
            return parsed
        body, req, ids = parsed
        deadline = time.monotonic() + self.args.request_timeout_s
        if body.stream:
            self._count(streamed=1)
            return StreamingResponse(self._sse(req, deadline), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            completion = await asyncio.wait_for(self._batched((req, deadline)), timeout=self.args.request_timeout_s)
        except asyncio.TimeoutError:
            completion = asyncio.TimeoutError()
        if isinstance(completion, asyncio.TimeoutError):
            self._count(timeouts=1)
            return _error(504, f"the request did not finish within request_timeout_s={self.args.request_timeout_s}s",
                          kind="timeout_error")
        if isinstance(completion, BaseException):
            raise completion
        self._count(completed=1, prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens)
        return self._response(completion)

    async def _sse(self, req: Any, deadline: float):
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        it = self.model.stream(req, self.args.max_tokens_limit)
        last = None
        try:
            while True:
                if time.monotonic() > deadline:
                    self._count(timeouts=1)
                    err = {"error": {"message": f"the stream did not finish within request_timeout_s="
                                                f"{self.args.request_timeout_s}s", "type": "timeout_error",
                                     "param": None, "code": "timeout"}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                chunk = await self._run(next, it, None)
                if chunk is None:
                    break
                last = chunk
                payload = {
                    "id": cid, "object": "text_completion", "created": created, "model": self.args.model_name,
                    "choices": [{"text": chunk.text, "index": 0, "logprobs": None, "finish_reason": chunk.finish_reason}],
                }
                if chunk.finish_reason is not None:
                    payload["usage"] = {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
                                        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await self._run(it.close)  # on the model thread: never while next() runs there
            if last is not None:
                self._count(completed=1, prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens)

    def check_health(self) -> None:
        """Serve's replica health check: the model thread must be alive."""
        if self._executor._shutdown:  # type: ignore[attr-defined]
            raise RuntimeError("the model worker thread is gone")


def app_builder(args: ServeArgs) -> Any:
    """Build the Serve application from typed arguments (a dict is validated into ServeArgs).

    Returns a bound ``serve.Application``; run it with ``serve.run(app, route_prefix="/")``.
    """
    if isinstance(args, dict):
        try:
            args = ServeArgs.model_validate(args)
        except ValidationError as exc:
            field, msg = _validation_message(exc)
            raise ConfigError(f"serve args: {msg}") from None
    ckpt = Path(args.checkpoint).expanduser()
    if not (ckpt / "config.json").exists() or not (ckpt / "model.safetensors").exists():
        raise ConfigError(f"checkpoint: {args.checkpoint!r} is not a checkpoint directory (config.json + model.safetensors)")
    args = args.model_copy(update={"checkpoint": str(ckpt.resolve())})
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
# running it: a local (or joined) cluster, blocking until Ctrl-C / SIGTERM
# ---------------------------------------------------------------------------------------

APP_NAME = "moe-lab"


def _start_cluster(address: Optional[str]) -> Any:
    from .cluster import init_ray

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO chatter from the driver
    return init_ray(address=address, log_to_driver=False)


def _serve_logging() -> Any:
    from ray.serve.schema import LoggingConfig

    return LoggingConfig(log_level="WARNING", enable_access_log=False)


def start_server(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None) -> str:
    """Start Ray (a local cluster unless ``address``), Serve's proxy on ``host:port`` and the app.

    Returns the base URL. Raises ConfigError on bad arguments, MoEError when the app fails.
    """
    app = app_builder(args)
    _start_cluster(address)
    serve.start(
        http_options={"host": host, "port": port, "request_timeout_s": args.request_timeout_s + 30},
        logging_config=_serve_logging(),
    )
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config=_serve_logging())
    return f"http://{host}:{port}"


def load_serve_config(path: Union[str, os.PathLike]) -> Any:
    """Read and validate a Serve config file (``ServeDeploySchema``); its host must be explicit."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"serve config file not found: {path}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with http_options and applications")
    host = (raw.get("http_options") or {}).get("host")
    if not host:
        raise ConfigError(
            f"{path}: set http_options.host explicitly (Serve config files default to 0.0.0.0, every interface); "
            "use 127.0.0.1 for this machine only"
        )
    try:
        config = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise ConfigError(f"{path}: {where}: {first.get('msg')}") from None
    for app in config.applications:
        if app.import_path == APP_IMPORT_PATH:
            args = dict(app.args or {})
            if "checkpoint" in args:  # relative to the current directory, like `moe-lab serve CKPT`
                args["checkpoint"] = str(Path(str(args["checkpoint"])).expanduser().resolve())
            app_builder(args)  # validates the args (and the checkpoint directory) now
            app.args = args
    return config


def start_from_config(path: Union[str, os.PathLike], address: Optional[str] = None, timeout_s: float = 300.0) -> str:
    """Deploy a Serve config file (as ``serve run`` does) and wait until every app runs."""
    from ray.serve.context import _get_global_client

    config = load_serve_config(path)
    _start_cluster(address)
    http = config.http_options.model_dump(exclude_unset=True)
    serve.start(http_options=http, logging_config=_serve_logging())
    _get_global_client().deploy_apps(config, _blocking=False)
    names = [a.name for a in config.applications]
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications
        states = {n: str(getattr(status.get(n), "status", "MISSING")) for n in names}
        if all(s.endswith("RUNNING") for s in states.values()):
            break
        failed = {n: s for n, s in states.items() if s.endswith("DEPLOY_FAILED")}
        if failed:
            msgs = {n: getattr(status[n], "message", "") for n in failed}
            raise ConfigError(f"deploying {path} failed: {msgs}")
        if time.monotonic() > deadline:
            raise ConfigError(f"deploying {path}: apps not running after {timeout_s:.0f}s: {states}")
        time.sleep(0.5)
    return f"http://{config.http_options.host}:{config.http_options.port}"


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

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
