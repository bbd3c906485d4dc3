"""The OpenAI-style completions protocol: request parsing, responses, SSE framing and errors.

Covers ``/v1/completions`` (:class:`CompletionBody`) and ``/v1/chat/completions``
(:class:`ChatBody`; :func:`render_chat` turns its messages into a prompt).

Pure: no Ray, no FastAPI app, no model. The Serve deployment
(:mod:`moe_lab.orchestration.serve`) parses with these functions, calls the model and
formats the result with them::

    body = parse_completion_request(raw_bytes, model_name="moe-lab", max_tokens_limit=256)
    ...                                      # raises APIError: .status, .to_dict()
    completion_response(completion, model="moe-lab")            # a dict for JSON
    async for frame in sse_stream(chunks, model="moe-lab"): ...  # "data: {...}\\n\\n", then "data: [DONE]\\n\\n"

Request (``POST /v1/completions``; strict JSON types, unknown fields ignored): ``model``,
``prompt`` (a string or a list of token ids), ``max_tokens`` (16), ``temperature`` (1.0),
``top_p`` (1.0), ``top_k`` (an extension), ``stop`` (a string or up to 4), ``seed``, ``n``
(1 only), ``stream``; ``echo``, ``logprobs``, ``best_of`` > 1 and non-zero penalties are
refused. Checks that need the model (token ids inside the vocabulary, prompt plus
``max_tokens`` inside the context) happen in the model's ``check_request``.

The chat body has the same sampling fields, with ``messages`` (``[{"role": "system" | "user"
| "assistant", "content": str}]``, at least one) instead of ``prompt``. The prompt is the
tokenizer's chat template when it has one, else one ``"<role>: <content>\\n"`` line per
message followed by ``"assistant:"`` (:data:`DEFAULT_CHAT_FORMAT`).

Errors have the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``: ``param``
names the bad field and ``message`` starts with it, e.g. ``temperature: Input should be
greater than or equal to 0 (got -0.5)``.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Dict, List, Literal, Mapping, Optional, Protocol, Tuple, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

#: at most this many stop sequences per request (OpenAI's limit)
MAX_STOP_SEQUENCES = 4

#: the last frame of every SSE stream
SSE_DONE = "data: [DONE]\n\n"

_ERROR_CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large", 503: "overloaded",
                504: "timeout"}


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


class APIError(Exception):
    """An OpenAI-style error answer: HTTP ``status``, ``message``, ``param`` (the field), ``type``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.headers = headers

    @property
    def code(self) -> Optional[str]:
        return _ERROR_CODES.get(self.status)

    def to_dict(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def describe_validation_error(exc: ValidationError) -> Tuple[Optional[str], str, Dict[str, Any]]:
    """``(field, message, error)`` of the first error: the top-level field it is about (None for
    the whole object), a message that starts with that field, and pydantic's error dict."""
    first = exc.errors()[0]
    loc = first.get("loc", ())
    field = loc[0] if loc and isinstance(loc[0], str) else None  # later parts: union tags, list indices
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")  # a validator's ValueError
    return field, f"{field or 'body'}: {msg} (got {got})", first


def error_from_validation(exc: ValidationError) -> APIError:
    """A 400 naming the first invalid field (``param``), from pydantic's ValidationError."""
    field, message, _ = describe_validation_error(exc)
    return APIError(400, message, field)


def unauthorized() -> APIError:
    return APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error", headers={"WWW-Authenticate": "Bearer"})


def timeout_error(timeout_s: float, what: str = "request") -> APIError:
    """The 504 of a request (or ``what="stream"``) that ran past ``request_timeout_s``."""
    return APIError(504, f"the {what} did not finish within request_timeout_s={timeout_s}s", type="timeout_error")


def draining_error() -> APIError:
    """The 503 of a request that arrives while the server drains (SIGTERM): retry elsewhere."""
    return APIError(503, "the server is shutting down and takes no new requests; retry on another server",
                    type="service_unavailable", headers={"Retry-After": "1", "Connection": "close"})


def check_api_key(authorization: Optional[str], api_key: Optional[str]) -> None:
    """Raise a 401 unless ``authorization`` is ``Bearer <api_key>`` (no key configured: no check)."""
    if api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise unauthorized()


def body_too_large(max_body_bytes: int, size: Optional[int] = None) -> APIError:
    """The 413 of a body over ``max_body_bytes`` (``size``: its Content-Length, when it said).

    It asks the client to close the connection: the rest of the body is never read."""
    said = "" if size is None else f" ({size} bytes)"
    return APIError(413, f"body: the request body{said} is larger than this server's max_body_bytes={max_body_bytes}",
                    type="invalid_request_error", headers={"Connection": "close"})


def content_length(value: Optional[str]) -> Optional[int]:
    """The Content-Length header as a number (None when absent); a 400 when it is not one."""
    if value is None:
        return None
    if not value.strip().isdigit():
        raise APIError(400, f"Content-Length: expected a number of bytes, got {value!r}")
    return int(value)


async def read_body(chunks: AsyncIterator[bytes], declared: Optional[int], max_body_bytes: int) -> bytes:
    """The request body from its ``chunks``, read only while it stays within ``max_body_bytes``.

    Args:
        chunks: the body as it arrives (Starlette's ``request.stream()``).
        declared: the Content-Length (None for a chunked body).
        max_body_bytes: the limit.

    Raises:
        APIError: 413 before a chunk is read when ``declared`` is over the limit, or as soon
            as the chunks received pass it (a chunked body, or one longer than it said).
    """
    if declared is not None and declared > max_body_bytes:
        raise body_too_large(max_body_bytes, declared)
    parts: List[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_body_bytes:
            raise body_too_large(max_body_bytes)
        parts.append(chunk)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------


def _unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", message)


class _SamplingBody(BaseModel):
    """The fields ``/v1/completions`` and ``/v1/chat/completions`` share (strict types;
    unknown fields are ignored).

    Validate with ``context={"max_tokens_limit": n}`` to cap ``max_tokens`` (the server's
    ``max_tokens_limit``).
    """

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(None, ge=0, description="an extension: sample from the k most likely tokens")
    stop: Union[None, str, List[str]] = Field(None, description=f"a string or up to {MAX_STOP_SEQUENCES}")
    seed: Optional[StrictInt] = Field(None, ge=0)
    n: StrictInt = Field(1, description="only 1 is supported")
    stream: StrictBool = Field(False, description="server-sent events, ending with `data: [DONE]`")
    presence_penalty: float = Field(0.0, description="only 0 is supported")
    frequency_penalty: float = Field(0.0, description="only 0 is supported")

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_limit(cls, v: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_tokens_limit")
        if limit is not None and v > limit:
            raise PydanticCustomError("too_large", "must be <= {limit}, this server's max_tokens_limit", {"limit": limit})
        return v

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, v: Union[None, str, List[str]]) -> Union[None, str, List[str]]:
        if isinstance(v, list) and len(v) > MAX_STOP_SEQUENCES:
            raise PydanticCustomError("too_long", "at most {n} stop sequences", {"n": MAX_STOP_SEQUENCES})
        return v

    @field_validator("n")
    @classmethod
    def _only_one_n(cls, v: int) -> int:
        if v != 1:
            raise _unsupported("only 1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise _unsupported("not supported (must be 0)")
        return v

    @property
    def stop_sequences(self) -> List[str]:
        """``stop`` as a list (a single string is one stop sequence)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(_SamplingBody):
    """The body of ``POST /v1/completions``."""

    prompt: Union[str, List[StrictInt]] = Field(description="text, or a list of token ids")
    echo: StrictBool = Field(False, description="not supported")
    logprobs: Optional[StrictInt] = Field(None, description="not supported")
    best_of: Optional[StrictInt] = Field(None, description="only 1 is supported")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: Union[str, List[int]]) -> Union[str, List[int]]:
        if not v:
            raise PydanticCustomError("empty", "is empty" if isinstance(v, str) else "is an empty token list")
        return v

    @field_validator("best_of")
    @classmethod
    def _only_one(cls, v: Optional[int]) -> Optional[int]:
        if v not in (None, 1):
            raise _unsupported("only 1 is supported")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise _unsupported("not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Optional[int]) -> Optional[int]:
        if v is not None:
            raise _unsupported("not supported")
        return v


class ChatMessage(BaseModel):
    """One message of a chat: ``role`` and its text ``content``."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_SamplingBody):
    """The body of ``POST /v1/chat/completions``."""

    messages: List[ChatMessage] = Field(min_length=1, description="the conversation so far, oldest first")
    logprobs: Optional[StrictBool] = Field(None, description="not supported")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Optional[bool]) -> Optional[bool]:
        if v:
            raise _unsupported("not supported")
        return v


#: how a chat becomes a prompt when the tokenizer has no chat template: one line per message,
#: ``"<role>: <content>\n"``, then ``"assistant:"`` for the answer to follow
DEFAULT_CHAT_FORMAT = "{role}: {content}\n"


def render_chat(messages: List[ChatMessage], tokenizer: Any) -> str:
    """The prompt text of a chat: the tokenizer's chat template (with the generation prompt)
    when it has one, else :data:`DEFAULT_CHAT_FORMAT` per message and ``"assistant:"``."""
    rows = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        return tokenizer.apply_chat_template(rows, tokenize=False, add_generation_prompt=True)
    return "".join(DEFAULT_CHAT_FORMAT.format(**r) for r in rows) + "assistant:"


def request_body_schema(body: type, components: Dict[str, Any]) -> Dict[str, Any]:
    """The ``openapi_extra`` of a route whose JSON body ``body`` (a pydantic model) validates:
    the body's schema, with its nested models added to ``components`` (OpenAPI's
    ``components.schemas``)."""
    schema = body.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components[body.__name__] = schema
    ref = {"$ref": f"#/components/schemas/{body.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def parse_completion_request(raw: Union[bytes, str], *, model_name: str,
                             max_tokens_limit: Optional[int] = None, body: type = CompletionBody) -> Any:
    """Parse and validate a ``/v1/completions`` body (``body=ChatBody``: a
    ``/v1/chat/completions`` one).

    Raises:
        APIError: 400 for invalid JSON, a non-object body or a bad field (``param`` names
            it); 404 when ``model`` is given and is not ``model_name``.
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"body: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"body: expected a JSON object, got {type(data).__name__}")
    try:
        parsed = body.model_validate(data, context={"max_tokens_limit": max_tokens_limit})
    except ValidationError as exc:
        raise error_from_validation(exc) from None
    if parsed.model is not None and parsed.model != model_name:
        raise APIError(404, f"model: {parsed.model!r} is not served here; available: [{model_name!r}]", "model")
    return parsed


# ---------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------


class CompletionLike(Protocol):
    """What the responses read from a model's completion (or streamed chunk)."""

    text: str
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Optional[str] = None  #: "stop" or "length"; None on all but the last chunk of a stream


class CompletionResponse(BaseModel):
    """A ``text_completion`` object: the whole answer, or one chunk of a stream."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None  #: on the answer and on the last chunk of a stream only

    @classmethod
    def of(cls, completion: CompletionLike, *, model: str, id: Optional[str] = None,
           created: Optional[int] = None, with_usage: bool = True) -> "CompletionResponse":
        usage = None
        if with_usage:
            p, c = completion.prompt_tokens, completion.completion_tokens
            usage = Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
        return cls(id=id or new_completion_id(), created=int(time.time()) if created is None else created, model=model,
                   choices=[CompletionChoice(text=completion.text, finish_reason=completion.finish_reason)], usage=usage)

    def to_dict(self) -> Dict[str, Any]:
        out = self.model_dump()
        if self.usage is None:
            del out["usage"]
        return out


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def completion_response(completion: CompletionLike, *, model: str) -> Dict[str, Any]:
    """The JSON answer of a non-streamed completion (with ``usage``)."""
    return CompletionResponse.of(completion, model=model).to_dict()


def completion_chunk(chunk: CompletionLike, *, model: str, id: str, created: int) -> Dict[str, Any]:
    """One streamed chunk; the last one (``finish_reason`` set) carries ``usage``."""
    return CompletionResponse.of(chunk, model=model, id=id, created=created,
                                 with_usage=chunk.finish_reason is not None).to_dict()


def new_chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _usage(c: CompletionLike) -> Dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def chat_completion_response(completion: CompletionLike, *, model: str) -> Dict[str, Any]:
    """The JSON answer of a non-streamed chat completion (a ``chat.completion`` with ``usage``)."""
    return {"id": new_chat_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": completion.finish_reason}],
            "usage": _usage(completion)}


def chat_completion_chunk(chunk: CompletionLike, *, model: str, id: str, created: int,
                          first: bool = False) -> Dict[str, Any]:
    """One streamed ``chat.completion.chunk``: ``delta`` holds the new text (and the role on
    the first chunk); the last one (``finish_reason`` set) carries ``usage``."""
    delta: Dict[str, Any] = {"role": "assistant"} if first else {}
    if chunk.text or first:
        delta["content"] = chunk.text
    out: Dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": chunk.finish_reason}]}
    if chunk.finish_reason is not None:
        out["usage"] = _usage(chunk)
    return out


def models_response(model: str, *, created: int, max_model_len: int, checkpoint: str) -> Dict[str, Any]:
    """``GET /v1/models``: the one served model (``checkpoint``: the directory's name)."""
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "moe_lab",
                  "max_model_len": max_model_len, "checkpoint": checkpoint}],
    }


def stats_response(model: str, counters: Mapping[str, Any], expert_cache: Mapping[str, Any],
                   monitor: Optional[Mapping[str, Any]] = None, engine: Optional[Mapping[str, Any]] = None,
                   residency: Optional[str] = None) -> Dict[str, Any]:
    """``GET /v1/stats``: request counters, tokens served, expert-cache stats, the inference
    engine's counters (queue depth ``waiting``, ``running``, ``mean_batch``, ...), the
    residency line logged at start-up and (when the replica has one) the expert monitor's
    stats. Numbers of any kind become JSON numbers."""
    out: Dict[str, Any] = {
        "model": model,
        "requests": dict(counters),
        "tokens_served": counters["completion_tokens"],
        "expert_cache": dict(expert_cache),
    }
    if engine is not None:
        out["engine"] = dict(engine)
    if residency is not None:
        out["residency"] = residency
    if monitor is not None:
        out["monitor"] = dict(monitor)
    return json.loads(json.dumps(out, default=float))  # tensors / numpy scalars -> floats


# ---------------------------------------------------------------------------------------
# server-sent events
# ---------------------------------------------------------------------------------------


def sse_event(payload: Mapping[str, Any]) -> str:
    """One SSE frame: ``data: <json>`` and a blank line."""
    return f"data: {json.dumps(payload)}\n\n"


async def sse_stream(chunks: AsyncIterator[CompletionLike], *, model: str, chat: bool = False) -> AsyncIterator[str]:
    """Completion chunks as SSE frames (``chat``: as ``chat.completion.chunk`` objects), then
    ``data: [DONE]``.

    An :class:`APIError` raised by ``chunks`` (e.g. a timeout) becomes one error frame, still
    followed by ``[DONE]``. ``chunks`` is closed when the stream ends or is abandoned.
    """
    stream_id, created = (new_chat_id() if chat else new_completion_id()), int(time.time())
    first = True
    async with aclosing(chunks):  # type: ignore[type-var]
        try:
            async for chunk in chunks:
                if chat:
                    yield sse_event(chat_completion_chunk(chunk, model=model, id=stream_id, created=created,
                                                          first=first))
                else:
                    yield sse_event(completion_chunk(chunk, model=model, id=stream_id, created=created))
                first = False
        except APIError as err:
            yield sse_event(err.to_dict())
    yield SSE_DONE
