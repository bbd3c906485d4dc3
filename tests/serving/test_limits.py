"""The body limit (protocol.read_body), the proxy guard (ASGI, driven directly) and the
start-up failure line found in Serve's status: no Ray cluster."""

import asyncio
import json

import pytest

from moe_lab.serving.protocol import APIError, content_length, read_body
from moe_lab.serving.proxy_guard import ProxyGuard


async def _chunks(parts, seen):
    for p in parts:
        seen.append(p)
        yield p


def _read(parts, declared, limit):
    seen = []
    try:
        return asyncio.run(read_body(_chunks(parts, seen), declared, limit)), seen
    except APIError as err:
        return err, seen


def test_read_body_within_the_limit():
    body, _ = _read([b"ab", b"cd"], 4, 4)
    assert body == b"abcd"
    body, _ = _read([b"ab", b"cd"], None, 4)  # chunked, exactly at the limit
    assert body == b"abcd"


def test_declared_length_over_the_limit_reads_nothing():
    err, seen = _read([b"x" * 10], 10, 4)
    assert isinstance(err, APIError) and err.status == 413 and seen == []
    assert err.to_dict()["error"]["code"] == "request_too_large" and "(10 bytes)" in err.message
    assert err.headers == {"Connection": "close"}


def test_chunked_body_stops_at_the_chunk_that_passes_the_limit():
    err, seen = _read([b"ab", b"cd", b"e", b"never read"], None, 4)
    assert isinstance(err, APIError) and err.status == 413 and seen == [b"ab", b"cd", b"e"]
    err, _ = _read([b"abcdef"], 3, 4)  # longer than it said
    assert isinstance(err, APIError) and err.status == 413


@pytest.mark.parametrize("value, expected", [(None, None), ("0", 0), (" 12 ", 12)])
def test_content_length(value, expected):
    assert content_length(value) == expected


@pytest.mark.parametrize("value", ["-1", "1e3", "abc", ""])
def test_bad_content_length_is_400(value):
    with pytest.raises(APIError, match="Content-Length") as info:
        content_length(value)
    assert info.value.status == 400


def _call(path, headers=(), **guard_options):
    """One request through a ProxyGuard: (status, JSON body or None, whether the app behind it ran)."""
    ran, sent = [], []

    async def app(scope, receive, send):
        ran.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": [(k.encode(), v.encode()) for k, v in headers],
             "query_string": b"", "root_path": ""}
    asyncio.run(ProxyGuard(app, **guard_options)(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body) if body else None, bool(ran)


def test_proxy_guard_key_on_routes_only():
    status, body, ran = _call("/-/routes", api_key="k")
    assert status == 401 and body["error"]["type"] == "authentication_error" and not ran
    assert _call("/-/routes", [("authorization", "Bearer k")], api_key="k")[0] == 200
    assert _call("/-/routes/", [("authorization", "Bearer k2")], api_key="k")[0] == 401
    assert _call("/-/healthz", api_key="k")[2]  # open
    assert _call("/v1/models", api_key="k")[2]  # the app checks its own routes
    assert _call("/-/routes")[2]  # no key configured


def test_proxy_guard_refuses_a_declared_body_over_the_limit_without_reading_it():
    status, body, ran = _call("/v1/completions", [("content-length", "11")], max_body_bytes=10)
    assert status == 413 and "max_body_bytes=10" in body["error"]["message"] and not ran
    assert _call("/v1/completions", [("content-length", "10")], max_body_bytes=10)[2]
    assert _call("/v1/completions", [("content-length", "x")], max_body_bytes=10)[0] == 400


def test_startup_failure_line():
    from moe_lab.orchestration.serve import STARTUP_FAILURE, startup_failure

    wrapped = ("The deployment failed to start 3 times in a row. Error:\n  File \"x.py\", line 1\n"
               f"RuntimeError: Traceback ...\nmoe_lab.orchestration.serve.ReplicaStartupError: {STARTUP_FAILURE}"
               "ConfigError: device_map='cuda:0' but CUDA is not available on this machine\n")
    assert startup_failure(["", wrapped]) == "ConfigError: device_map='cuda:0' but CUDA is not available on this machine"
    # a failure outside the constructor: the last line of Serve's message
    deployment = "Error:\n  File \"y\"\nModuleNotFoundError: No module named 'z'\n"
    app = "Failed to update the deployments ['MoECompletions']."
    assert startup_failure([deployment, app]) == "ModuleNotFoundError: No module named 'z'"
    assert startup_failure(["", app]) == app  # nothing better to show
    assert startup_failure(["", "  "]) is None
