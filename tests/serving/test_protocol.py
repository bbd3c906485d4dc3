"""The completions protocol without Ray or a model: parsing, errors, responses, SSE framing."""

import asyncio
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Optional

import pytest
from pydantic import ValidationError

from moe_lab.serving import protocol
from moe_lab.serving.protocol import APIError, CompletionBody, parse_completion_request


def _parse(body, model_name="moe-lab", max_tokens_limit=32):
    raw = body if isinstance(body, bytes) else json.dumps(body)
    return parse_completion_request(raw, model_name=model_name, max_tokens_limit=max_tokens_limit)


def _error(body, **kw) -> APIError:
    with pytest.raises(APIError) as info:
        _parse(body, **kw)
    return info.value


# ---- parsing ------------------------------------------------------------------------------


def test_defaults_and_accepted_forms():
    b = _parse({"prompt": "hi"})
    assert (b.model, b.max_tokens, b.temperature, b.top_p, b.top_k, b.seed) == (None, 16, 1.0, 1.0, None, None)
    assert b.stop_sequences == [] and b.stream is False and b.n == 1
    b = _parse({"model": "moe-lab", "prompt": [1, 2, 3], "max_tokens": 32, "temperature": 0, "top_p": 0.5,
                "top_k": 0, "stop": "\n", "seed": 0, "stream": True, "user": "ignored", "n": 1, "best_of": 1})
    assert b.prompt == [1, 2, 3] and b.max_tokens == 32 and b.temperature == 0.0 and b.top_k == 0
    assert b.stop_sequences == ["\n"] and b.stream is True and b.seed == 0
    assert _parse({"prompt": "x", "stop": ["a", "b", "c", "d"]}).stop_sequences == ["a", "b", "c", "d"]
    assert _parse(json.dumps({"prompt": "é"}, ensure_ascii=False).encode()).prompt == "é"  # UTF-8 bytes in


BAD = [
    # (body, status, param): param None means the whole body
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"\xff\xfe\xff", 400, None),
    ({"prompt": 123}, 400, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 33}, 400, "max_tokens"),  # above max_tokens_limit=32
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "top_k": -1}, 400, "top_k"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "logprobs": 0}, 400, "logprobs"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -1}, 400, "frequency_penalty"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "model": 7}, 400, "model"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_input_names_the_field(body, status, param):
    err = _error(body)
    assert err.status == status and err.param == param
    assert err.message.startswith(f"{param or 'body'}: "), err.message
    shape = err.to_dict()
    assert set(shape) == {"error"} and set(shape["error"]) == {"message", "type", "param", "code"}
    assert shape["error"]["param"] == param and shape["error"]["type"] == "invalid_request_error"
    assert shape["error"]["code"] == ("model_not_found" if status == 404 else None)


def test_max_tokens_limit_is_the_servers():
    assert _parse({"prompt": "x", "max_tokens": 100}, max_tokens_limit=None).max_tokens == 100
    assert "max_tokens_limit" in _error({"prompt": "x", "max_tokens": 9}, max_tokens_limit=8).message


def test_error_from_validation_names_the_first_bad_field():
    with pytest.raises(ValidationError) as info:
        CompletionBody.model_validate({"prompt": "x", "temperature": -1.0, "top_p": 2.0})
    err = protocol.error_from_validation(info.value)
    assert (err.status, err.param) == (400, "temperature")
    assert err.message == "temperature: Input should be greater than or equal to 0 (got -1.0)"
    with pytest.raises(ValidationError) as info:
        CompletionBody.model_validate({"prompt": "y" * 500, "n": 3})
    assert "y" * 100 not in protocol.error_from_validation(info.value).message  # long inputs are cut


# ---- errors and auth ----------------------------------------------------------------------


def test_timeout_and_auth_errors():
    t = protocol.timeout_error(0.05)
    assert t.status == 504 and t.to_dict()["error"]["code"] == "timeout" and t.type == "timeout_error"
    assert "request_timeout_s=0.05s" in t.message and "request" in t.message
    assert "stream" in protocol.timeout_error(1.0, "stream").message
    protocol.check_api_key(None, None)  # no key configured: anything goes
    protocol.check_api_key("Bearer k3y", "k3y")
    protocol.check_api_key("bearer  k3y", "k3y")
    for header in (None, "", "k3y", "Bearer wrong", "Basic k3y", "Bearer"):
        with pytest.raises(APIError) as info:
            protocol.check_api_key(header, "k3y")
        assert info.value.status == 401 and info.value.type == "authentication_error"
        assert info.value.headers == {"WWW-Authenticate": "Bearer"}
        assert info.value.to_dict()["error"]["code"] == "invalid_api_key"


# ---- responses ----------------------------------------------------------------------------


@dataclass
class _Done:
    text: str
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int


def test_completion_response():
    r = protocol.completion_response(_Done(" 17", "stop", 8, 3), model="tiny")
    assert r["object"] == "text_completion" and r["model"] == "tiny" and r["id"].startswith("cmpl-")
    assert isinstance(r["created"], int)
    assert r["choices"] == [{"text": " 17", "index": 0, "logprobs": None, "finish_reason": "stop"}]
    assert r["usage"] == {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11}
    assert protocol.completion_response(_Done("", "length", 1, 1), model="m")["id"] != r["id"]


def test_models_and_stats_responses():
    m = protocol.models_response("moe-lab", created=5, max_model_len=64, checkpoint="model")
    assert m["object"] == "list" and [d["id"] for d in m["data"]] == ["moe-lab"]
    assert m["data"][0]["max_model_len"] == 64 and m["data"][0]["object"] == "model"
    counters = {"requests": 2, "completion_tokens": 7, "model_seconds": Decimal("0.5")}
    s = protocol.stats_response("moe-lab", counters, {"hit_rate": Decimal("0.25")})
    assert s["tokens_served"] == 7 and s["requests"]["model_seconds"] == 0.5 and s["expert_cache"]["hit_rate"] == 0.25
    assert "monitor" not in s
    json.dumps(s)  # plain JSON
    assert protocol.stats_response("m", counters, {}, {"error": "boom"})["monitor"] == {"error": "boom"}


# ---- server-sent events -------------------------------------------------------------------


def _frames(chunks_gen):
    async def collect():
        return [f async for f in protocol.sse_stream(chunks_gen, model="moe-lab")]

    return asyncio.run(collect())


def _events(frames):
    assert all(f.startswith("data: ") and f.endswith("\n\n") for f in frames)
    assert frames[-1] == protocol.SSE_DONE == "data: [DONE]\n\n"
    return [json.loads(f[len("data: "):]) for f in frames[:-1]]


def test_sse_frames_parse_back_and_done_is_last():
    async def chunks():
        yield _Done("1", None, 4, 1)
        yield _Done("2", None, 4, 2)
        yield _Done("", "length", 4, 3)

    events = _events(_frames(chunks()))
    assert "".join(e["choices"][0]["text"] for e in events) == "12"
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, "length"]
    assert ["usage" in e for e in events] == [False, False, True]
    assert events[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert len({e["id"] for e in events}) == 1 and {e["object"] for e in events} == {"text_completion"}


def test_sse_error_mid_stream_is_a_frame_then_done_and_closes_the_source():
    closed = []

    async def chunks():
        try:
            yield _Done("a", None, 1, 1)
            raise protocol.timeout_error(0.5, "stream")
        finally:
            closed.append(True)

    events = _events(_frames(chunks()))
    assert events[0]["choices"][0]["text"] == "a"
    assert events[1]["error"]["code"] == "timeout" and "stream" in events[1]["error"]["message"]
    assert closed == [True]


def test_sse_abandoned_by_the_client_closes_the_source():
    closed = []

    async def chunks():
        try:
            for i in range(100):
                yield _Done(str(i), None, 1, i)
        finally:
            closed.append(True)

    async def first_then_leave():
        stream = protocol.sse_stream(chunks(), model="m")
        first = await stream.__anext__()
        await stream.aclose()
        return first

    assert asyncio.run(first_then_leave()).startswith("data: ") and closed == [True]


# ---- chat ---------------------------------------------------------------------------------


def test_chat_body_and_default_format():
    raw = json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                      "max_tokens": 4, "stop": "\n", "extra": 1})
    b = parse_completion_request(raw, model_name="moe-lab", max_tokens_limit=8, body=protocol.ChatBody)
    assert [m.role for m in b.messages] == ["system", "user"] and b.max_tokens == 4 and b.stop_sequences == ["\n"]
    assert protocol.render_chat(b.messages, tokenizer=object()) == "system: s\nuser: u\nassistant:"
    for bad, param in (({"messages": []}, "messages"), ({"prompt": "x"}, "messages"),
                       ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
                       ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9}, "max_tokens")):
        with pytest.raises(APIError) as info:
            parse_completion_request(json.dumps(bad), model_name="moe-lab", max_tokens_limit=8, body=protocol.ChatBody)
        assert info.value.status == 400 and info.value.param == param


def test_chat_uses_the_tokenizers_template_when_it_has_one():
    class Templated:
        chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"

        def apply_chat_template(self, rows, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "".join(f"[{r['role']}]{r['content']}" for r in rows) + "[assistant]"

    class Untemplated(Templated):
        chat_template = None

    msgs = [protocol.ChatMessage(role="user", content="hi")]
    assert protocol.render_chat(msgs, Templated()) == "[user]hi[assistant]"
    assert protocol.render_chat(msgs, Untemplated()) == "user: hi\nassistant:"


def test_chat_responses_and_sse_deltas():
    done = _Done("ab", "stop", 3, 2)
    body = protocol.chat_completion_response(done, model="m")
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

    async def chunks():
        yield _Done("a", None, 3, 1)
        yield _Done("", "stop", 3, 2)

    async def frames():
        return [f async for f in protocol.sse_stream(chunks(), model="m", chat=True)]

    out = asyncio.run(frames())
    assert out[-1] == protocol.SSE_DONE
    events = [json.loads(f[len("data: "):]) for f in out[:-1]]
    assert [e["choices"][0]["delta"] for e in events] == [{"role": "assistant", "content": "a"}, {}]
    assert events[0]["id"] == events[1]["id"] and events[0]["id"].startswith("chatcmpl-")
    assert "usage" not in events[0] and events[1]["usage"]["completion_tokens"] == 2


def test_request_body_schema_resolves_nested_models():
    components = {}
    extra = protocol.request_body_schema(protocol.ChatBody, components)
    ref = extra["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ChatBody" and set(components) == {"ChatBody", "ChatMessage"}
    assert "$defs" not in components["ChatBody"]
