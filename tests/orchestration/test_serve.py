"""The Ray Serve app over real HTTP on 127.0.0.1: routes, streaming, bad input, auth, load.

One local Ray cluster and one Serve instance for the whole module (on a free port), with
three apps from the same builder:

- ``/``        the default app (auth off, max_tokens_limit 32, max_body_bytes 64 KiB);
- ``/secured`` the same with ``api_key_env`` (auth on) and max_body_bytes 4 KiB;
- ``/tight``   max_ongoing_requests=1, max_queued_requests=1 and a 0.05 s request timeout;
- ``/long``    a second checkpoint with a 1024-token context, max_tokens_limit 1000 and the
               default ``max_experts_in_memory: auto`` (streams long enough to hang up on).

Serve's proxy runs moe_lab's proxy guard as ``moe-lab serve`` sets it up
(:func:`configure_proxy`): ``/-/routes`` needs the key, a Content-Length over 64 KiB gets 413.
"""

import concurrent.futures
import http.client
import json
import os
import socket
import time

import pytest
import requests
import torch
from helpers import free_port

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from moe_lab import MoEModel, OptimizedMoEModel  # noqa: E402
from moe_lab.data import ByteTokenizer  # noqa: E402
from moe_lab.inference import CompletionRequest  # noqa: E402
from moe_lab.orchestration.serve import ReplicaStartupError, app_builder, configure_proxy, deploy, drain  # noqa: E402
from moe_lab.serving import ServeArgs  # noqa: E402
from moe_lab.checkpoint import write_checkpoint  # noqa: E402

KEY_ENV = "MOE_LAB_TEST_SERVE_KEY"
KEY = "s3cret-test-key"
PROXY_LIMIT = 64 * 1024  # max_body_bytes of the proxy and of the default app
SECURED_LIMIT = 4 * 1024  # of /secured: a body between the two passes the proxy, the replica refuses it


def _free_port() -> int:
    return free_port()


def _tiny_checkpoint(path, context=64):
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = MoEModel(vocab_size=len(tok), hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4,
                     experts_per_token=2, expert_hidden_size=32, max_position_embeddings=context, dropout=0.0)
    write_checkpoint(path, model.config, model.state_dict(), tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = _tiny_checkpoint(tmp_path_factory.mktemp("serve") / "model")
    long_ckpt = _tiny_checkpoint(tmp_path_factory.mktemp("serve_long") / "model", context=1024)
    saved = dict(os.environ)
    os.environ[KEY_ENV] = KEY  # replicas of a local cluster inherit the driver's environment
    port = _free_port()
    base = dict(checkpoint=str(ckpt), max_experts_in_memory=2, max_tokens_limit=32, num_cpus_per_replica=0.5,
                torch_threads=1, max_batch_size=8, max_body_bytes=PROXY_LIMIT)
    configure_proxy(ServeArgs(**base, api_key_env=KEY_ENV))  # before the cluster: its proxy inherits it
    ray.init("local", num_cpus=4, object_store_memory=200 * 1024**2, include_dashboard=False,
             log_to_driver=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder(ServeArgs(**base)), name="main", route_prefix="/")
        secured = {**base, "api_key_env": KEY_ENV, "max_body_bytes": SECURED_LIMIT}
        serve.run(app_builder(ServeArgs(**secured)), name="secured", route_prefix="/secured")
        tight = {**base, "max_ongoing_requests": 1, "max_queued_requests": 1, "request_timeout_s": 0.05}
        serve.run(app_builder(ServeArgs(**tight)), name="tight", route_prefix="/tight")
        long = {k: v for k, v in base.items() if k != "max_experts_in_memory"}  # the default: auto
        long.update(checkpoint=str(long_ckpt), max_tokens_limit=1000, max_batch_size=2)
        serve.run(app_builder(ServeArgs(**long)), name="long", route_prefix="/long")
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "ckpt": ckpt, "long": long, "base": base}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def _post(server, body, prefix="", headers=None, timeout=60):
    return requests.post(f"{server['url']}{prefix}/v1/completions", json=body, headers=headers, timeout=timeout)


def _healthy(server, prefix=""):
    return requests.get(f"{server['url']}{prefix}/healthz", timeout=30).status_code == 200


def test_binds_loopback_only(server):
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.socket() as s:  # the proxy listens on 127.0.0.1, not on every interface
        s.settimeout(1)
        other = ray.util.get_node_ip_address()  # this machine's non-loopback address
        if other.startswith("127."):
            pytest.skip("no non-loopback address on this machine")
        assert s.connect_ex((other, port)) != 0


def test_healthz_and_models(server):
    r = requests.get(f"{server['url']}/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": "moe-lab"}
    models = requests.get(f"{server['url']}/v1/models", timeout=30).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["moe-lab"]
    assert models["data"][0]["max_model_len"] == 64


@pytest.fixture(scope="module")
def local(server):
    """The served checkpoint loaded in this process, as the replicas load it."""
    return OptimizedMoEModel(server["ckpt"], max_experts_in_memory=2)


def test_greedy_completion_equals_local_model(server, local):
    want = local.complete([CompletionRequest("12 + 5 =", max_tokens=12, temperature=0)])[0]
    r = _post(server, {"model": "moe-lab", "prompt": "12 + 5 =", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "moe-lab"
    assert body["choices"][0]["text"] == want.text
    assert body["choices"][0]["finish_reason"] == want.finish_reason
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": want.completion_tokens,
                             "total_tokens": 8 + want.completion_tokens}
    # the same prompt as token ids gives the same completion
    ids = list("12 + 5 =".encode())
    r2 = _post(server, {"prompt": ids, "max_tokens": 12, "temperature": 0})
    assert r2.status_code == 200 and r2.json()["choices"][0]["text"] == want.text


def test_seeded_sampling_is_reproducible(server):
    body = {"prompt": "hello", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    a, b = _post(server, body).json(), _post(server, body).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_streaming_sse_matches_non_streaming(server):
    body = {"prompt": "abc", "max_tokens": 10, "temperature": 0}
    whole = _post(server, body).json()["choices"][0]
    with requests.post(f"{server['url']}/v1/completions", json={**body, "stream": True}, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert all(ln.startswith("data: ") for ln in lines)
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["usage"]["completion_tokens"] >= 1


def test_stats(server):
    _post(server, {"prompt": "stats", "max_tokens": 4, "temperature": 0})
    st = requests.get(f"{server['url']}/v1/stats", timeout=30).json()
    for key in ("hits", "misses", "hit_rate", "evictions", "prefetches", "bytes_loaded", "resident"):
        assert key in st["expert_cache"]
    assert all(len(r) <= 2 for r in st["expert_cache"]["resident"].values())
    assert st["tokens_served"] >= 4 and st["requests"]["requests"] >= 1 and st["requests"]["completed"] >= 1
    try:
        from moe_lab.analytics import ExpertMonitor  # noqa: F401
    except ImportError:
        assert "monitor" not in st
    else:
        assert st["monitor"]["num_forwards"] > 0 and len(st["monitor"]["layers"]) == 2


BAD_INPUTS = [
    # (raw body or JSON, expected status, the field the message names)
    (b"{not json", 400, "body"),
    (b"[1, 2]", 400, "body"),
    ({"prompt": 123}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "y" * 80}, 400, "prompt"),  # longer than the 64-token context
    ({"prompt": "y" * 50, "max_tokens": 20}, 400, "max_tokens"),  # prompt + max_tokens > context
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 33}, 400, "max_tokens"),  # above max_tokens_limit
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": [1, 2, 259]}, 400, "prompt"),  # outside the vocabulary (259 ids)
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "n": 2}, 400, "n"),
]


@pytest.mark.parametrize("body, status, field", BAD_INPUTS)
def test_bad_input_is_4xx_naming_the_field(server, body, status, field):
    if isinstance(body, bytes):
        r = requests.post(f"{server['url']}/v1/completions", data=body,
                          headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = _post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"].startswith(field) or field in err["message"]
    if field != "body":
        assert err["param"] == field
    assert _healthy(server)


def test_still_serving_after_bad_input(server, local):
    before = requests.get(f"{server['url']}/v1/stats", timeout=30).json()["requests"]
    for body, status, _ in BAD_INPUTS[:6]:
        r = requests.post(f"{server['url']}/v1/completions", timeout=30,
                          data=body if isinstance(body, bytes) else json.dumps(body))
        assert r.status_code == status
    r = _post(server, {"prompt": "ok", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    # the answer after the bad requests is the right one: the same greedy completion as a
    # local model of the same checkpoint, not an empty or stale reply
    want = local.complete([CompletionRequest("ok", max_tokens=3, temperature=0)])[0]
    assert want.text == local.tokenizer.decode(want.token_ids) and want.completion_tokens >= 1
    body = r.json()
    assert body["choices"][0]["text"] == want.text
    assert body["choices"][0]["finish_reason"] == want.finish_reason
    assert body["usage"]["completion_tokens"] == want.completion_tokens
    after = requests.get(f"{server['url']}/v1/stats", timeout=30).json()["requests"]
    assert after["errors_4xx"] - before["errors_4xx"] == 6  # each bad request was counted as a 4xx
    assert after["completed"] - before["completed"] == 1


def test_auth_on(server):
    body = {"prompt": "hi", "max_tokens": 3, "temperature": 0}
    assert _post(server, body, "/secured").status_code == 401
    r = _post(server, body, "/secured", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert _post(server, body, "/secured", headers={"Authorization": KEY}).status_code == 401  # no scheme
    assert requests.get(f"{server['url']}/secured/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{server['url']}/secured/v1/stats", timeout=30).status_code == 401
    ok = {"Authorization": f"Bearer {KEY}"}
    assert _post(server, body, "/secured", headers=ok).status_code == 200
    assert requests.get(f"{server['url']}/secured/v1/models", headers=ok, timeout=30).status_code == 200
    assert _healthy(server, "/secured")  # health checks need no key


def test_auth_off(server):
    r = _post(server, {"prompt": "hi", "max_tokens": 3, "temperature": 0})  # no header at all
    assert r.status_code == 200


def test_64_concurrent_requests_all_succeed_and_are_batched(server):
    before = requests.get(f"{server['url']}/v1/stats", timeout=30).json()["engine"]

    def one(i):
        return _post(server, {"prompt": f"{i} + {i} =", "max_tokens": 6, "temperature": 0}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert [r.status_code for r in results] == [200] * 64
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in results)
    after = requests.get(f"{server['url']}/v1/stats", timeout=30).json()["engine"]
    assert after["requests"] - before["requests"] == 64 and after["finished"] - before["finished"] == 64
    steps, rows = after["decode_steps"] - before["decode_steps"], after["decode_rows"] - before["decode_rows"]
    assert rows / steps >= 3  # continuous batching: several requests per decode step (8 slots)
    assert after["running"] == 0 and after["waiting"] == 0  # every slot free again


def test_backpressure_503_and_timeout_504(server):
    body = {"prompt": "slow", "max_tokens": 30, "temperature": 0}

    def one(_):
        return _post(server, body, "/tight", timeout=120)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = [r.status_code for r in pool.map(one, range(16))]
    assert 503 in codes  # one running + one queued; the rest are turned away
    assert set(codes) <= {503, 504}  # the admitted ones exceed the 0.05 s timeout
    assert 504 in codes
    r = _post(server, body, "/tight")
    assert r.status_code == 504 and "request_timeout_s" in r.json()["error"]["message"]
    assert _healthy(server, "/tight") and _healthy(server)


def test_with_a_key_schema_docs_and_routes_need_it_and_healthz_names_no_model(server):
    ok = {"Authorization": f"Bearer {KEY}"}
    for path in ("/secured/openapi.json", "/secured/docs", "/-/routes"):
        r = requests.get(f"{server['url']}{path}", timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        assert requests.get(f"{server['url']}{path}", headers={"Authorization": "Bearer nope"},
                            timeout=30).status_code == 401
    schema = requests.get(f"{server['url']}/secured/openapi.json", headers=ok, timeout=30)
    assert schema.status_code == 200 and "/v1/completions" in schema.json()["paths"]
    docs = requests.get(f"{server['url']}/secured/docs", headers=ok, timeout=30)
    assert docs.status_code == 200 and "/secured/openapi.json" in docs.text  # Swagger reads the mounted schema
    routes = requests.get(f"{server['url']}/-/routes", headers=ok, timeout=30)
    assert routes.status_code == 200 and routes.json()["/secured"] == "secured"
    health = requests.get(f"{server['url']}/secured/healthz", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert "moe-lab" not in health.text
    # without a key the schema is open; the proxy's own health check stays open
    assert requests.get(f"{server['url']}/openapi.json", timeout=30).status_code == 200
    assert requests.get(f"{server['url']}/-/healthz", timeout=30).status_code == 200


def _post_raw(server, path, headers, body=b"", chunks=()):
    """POST with the given headers and only ``body`` (or the ``chunks``, chunked, without the
    terminating chunk): the server must answer without waiting for more."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    try:
        conn.putrequest("POST", path)
        for k, v in {"Content-Type": "application/json", **headers}.items():
            conn.putheader(k, v)
        conn.endheaders(body or None)
        for chunk in chunks:
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        start = time.monotonic()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), time.monotonic() - start
    finally:
        conn.close()


@pytest.mark.parametrize("prefix, declared", [
    ("", 100 * 1024**2),  # refused by the proxy: 100 MB declared, one byte sent
    ("/secured", 10 * 1024),  # passes the proxy's 64 KiB; the replica's 4 KiB refuses it
])
def test_declared_body_over_the_limit_is_413_before_it_is_sent(server, prefix, declared):
    headers = {"Content-Length": str(declared), "Authorization": f"Bearer {KEY}"}
    status, body, waited = _post_raw(server, f"{prefix}/v1/completions", headers, body=b"{")
    assert status == 413 and body["error"]["code"] == "request_too_large", body
    assert "max_body_bytes" in body["error"]["message"] and waited < 20
    assert _healthy(server, prefix)


def test_chunked_body_over_the_limit_is_413_as_soon_as_it_passes(server):
    chunks = [b" " * 16 * 1024] * (PROXY_LIMIT // (16 * 1024) + 1)  # one chunk past the limit, no end
    status, body, _ = _post_raw(server, "/v1/completions", {"Transfer-Encoding": "chunked"}, chunks=chunks)
    assert status == 413 and f"max_body_bytes={PROXY_LIMIT}" in body["error"]["message"], body
    # at the limit, chunked or not, the body is read and validated as usual
    padded = json.dumps({"prompt": "ok", "max_tokens": 2, "pad": "x" * 1000}).encode()
    r = requests.post(f"{server['url']}/v1/completions", data=iter([padded[:500], padded[500:]]), timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    big = {"prompt": "x", "pad": "y" * (SECURED_LIMIT + 10)}
    r = _post(server, big, "/secured", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413
    assert _post(server, big, "/secured").status_code == 401  # the key is checked before the body is read


def test_replica_failing_at_start_up_reports_its_root_cause(server):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (the replica asks for cuda:0)")
    app = app_builder(ServeArgs(**{**server["base"], "device": "cuda:0", "replica_start_attempts": 1}))
    try:
        with pytest.raises(ReplicaStartupError) as info:
            deploy(app, "broken", route_prefix="/broken")
    finally:
        serve.delete("broken")
    message = str(info.value)
    assert "\n" not in message and "Failed to update" not in message and "Traceback" not in message
    assert "ConfigError: device_map='cuda:0' but CUDA is not available on this machine" in message, message
    assert _healthy(server)  # the other apps keep serving


def _stats(server, prefix=""):
    return requests.get(f"{server['url']}{prefix}/v1/stats", timeout=30).json()


def test_client_hanging_up_mid_stream_frees_its_slot_at_once(server):
    before = _stats(server, "/long")
    body = {"prompt": "a long story:", "max_tokens": 1000, "temperature": 0, "stream": True}
    r = requests.post(f"{server['url']}/long/v1/completions", json=body, stream=True, timeout=60)
    lines = r.iter_lines(decode_unicode=True)
    first = next(ln for ln in lines if ln)
    assert json.loads(first[len("data: "):])["choices"][0]["finish_reason"] is None
    r.close()  # hang up after the first chunk
    hung_up = time.monotonic()
    while True:
        st = _stats(server, "/long")
        if st["requests"]["cancelled"] > before["requests"]["cancelled"]:
            break
        assert time.monotonic() - hung_up < 10, st
        time.sleep(0.05)
    # the engine ended it as cancelled and the slot is free, long before 1000 tokens
    assert st["engine"]["running"] == 0 and st["engine"]["waiting"] == 0 and st["engine"]["prefilling"] == 0
    generated = st["engine"]["generated_tokens"] - before["engine"]["generated_tokens"]
    assert 1 <= generated < 1000
    assert st["requests"]["completed"] == before["requests"]["completed"]  # it was not answered in full
    # the freed slot serves the next request
    ok = _post(server, {"prompt": "after", "max_tokens": 4, "temperature": 0}, "/long")
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_residency_auto_by_default_and_logged_in_stats(server):
    assert "2 of 4 experts per MoE layer" in _stats(server)["residency"]  # max_experts_in_memory=2
    long = _stats(server, "/long")["residency"]
    assert long.startswith("max_experts_in_memory='auto': 4 of 4 experts") and "all experts resident" in long


def _chat(server, body, prefix="", **kw):
    return requests.post(f"{server['url']}{prefix}/v1/chat/completions", json=body, timeout=60, **kw)


def test_chat_completion_uses_the_default_format_and_streams(server, local):
    from moe_lab.serving.protocol import ChatMessage, render_chat

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    prompt = render_chat([ChatMessage(**m) for m in messages], local.tokenizer)
    assert prompt == "system: be brief\nuser: 2+2?\nassistant:"  # the byte tokenizer has no template
    want = local.complete([CompletionRequest(prompt, max_tokens=10, temperature=0)])[0]
    r = _chat(server, {"model": "moe-lab", "messages": messages, "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want.text}
    assert choice["finish_reason"] == want.finish_reason
    assert body["usage"]["prompt_tokens"] == len(prompt.encode())
    with requests.post(f"{server['url']}/v1/chat/completions", stream=True, timeout=60,
                       json={"messages": messages, "max_tokens": 10, "temperature": 0, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in s.iter_lines(decode_unicode=True) if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == want.text
    assert events[-1]["choices"][0]["finish_reason"] == want.finish_reason and "usage" in events[-1]


@pytest.mark.parametrize("body, field", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 33}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "y" * 80}]}, "prompt"),  # the rendered chat exceeds the context
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
])
def test_chat_bad_input_is_400_naming_the_field(server, body, field):
    r = _chat(server, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and r.json()["error"]["message"].startswith(field)


def test_openapi_documents_each_request_body_as_validated(server):
    from moe_lab.serving.protocol import ChatBody, CompletionBody

    schema = requests.get(f"{server['url']}/openapi.json", timeout=30).json()
    components = schema["components"]["schemas"]
    for path, model, required in (("/v1/completions", CompletionBody, ["prompt"]),
                                  ("/v1/chat/completions", ChatBody, ["messages"])):
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body = components[ref.rsplit("/", 1)[1]]
        assert body["required"] == required and set(body["properties"]) == set(model.model_fields)
        assert body["properties"]["max_tokens"]["minimum"] == 1
    message = components["ChatBody"]["properties"]["messages"]["items"]["$ref"].rsplit("/", 1)[1]
    assert components[message]["properties"]["role"]["enum"] == ["system", "user", "assistant"]
    # a body formed from the schema's required fields and defaults is accepted
    r = _post(server, {"prompt": "x", "max_tokens": components["CompletionBody"]["properties"]["max_tokens"]["default"]})
    assert r.status_code == 200, r.text


def test_prometheus_metrics(server):
    from moe_lab.serving.metrics import parse_metrics

    assert _post(server, {"prompt": "metrics", "max_tokens": 5, "temperature": 0}).status_code == 200
    r = requests.get(f"{server['url']}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = parse_metrics(r.text)
    assert m["moe_lab_time_to_first_token_seconds_count"] >= 1
    assert m["moe_lab_inter_token_latency_seconds_count"] >= 1
    assert m["moe_lab_generated_tokens_total"] >= 5
    assert m['moe_lab_requests_finished_total{finish_reason="length"}'] >= 1
    assert m["moe_lab_queue_depth"] == 0 and m["moe_lab_running_requests"] == 0 and m["moe_lab_mean_batch_size"] >= 1
    assert 0 <= m["moe_lab_expert_cache_hit_rate"] <= 1
    assert m["moe_lab_expert_cache_hits_total"] + m["moe_lab_expert_cache_misses_total"] > 0
    # behind the key when one is set
    assert requests.get(f"{server['url']}/secured/metrics", timeout=30).status_code == 401
    ok = requests.get(f"{server['url']}/secured/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert ok.status_code == 200 and "moe_lab_time_to_first_token_seconds" in ok.text


@pytest.mark.slow
def test_drain_finishes_streams_in_flight_and_refuses_new_requests_with_503(server):
    import threading

    # 100-token streams queue behind 2 KV slots on half a CPU: under CI load one can pass the
    # default 60 s request timeout, which would cut it (that is not what this test is about)
    args = ServeArgs(**{**server["long"], "request_timeout_s": 240})
    serve.run(app_builder(args), name="drain", route_prefix="/drain")
    body = {"prompt": "drain me:", "max_tokens": 100, "temperature": 0, "stream": True}
    streams = []  # one per client: {"status", "lines", "end"}

    def client():
        out = {"lines": []}
        streams.append(out)
        with requests.post(f"{server['url']}/drain/v1/completions", json=body, stream=True, timeout=300) as r:
            out["status"] = r.status_code
            for ln in r.iter_lines(decode_unicode=True):  # kept as they come
                if ln:
                    out["lines"].append(ln)
        out["end"] = time.monotonic()

    try:
        drained = []  # when the drain began, and when it returned

        def run_drain():
            drained.append(time.monotonic())
            drain(args, "drain", "/drain")
            drained.append(time.monotonic())

        drainer = threading.Thread(target=run_drain)
        clients = []
        start = time.monotonic()
        # a new stream every 0.2 s: those started just before the replica drains are in flight then;
        # those Serve receives while it applies the drain wait for it, then get 503
        while not any(c.get("status") == 503 for c in streams):
            if len(clients) == 3:
                drainer.start()
            clients.append(threading.Thread(target=client))
            clients[-1].start()
            time.sleep(0.2)
            assert time.monotonic() - start < 90, "the replica never started draining"
        assert requests.get(f"{server['url']}/drain/healthz", timeout=30).status_code == 503
        for _ in range(20):  # under load Serve's proxy may answer its own (plain-text) 503 while
            r = _post(server, {"prompt": "new", "max_tokens": 2}, "/drain")  # it applies the update
            if r.status_code != 503 or r.headers.get("content-type", "").startswith("application/json"):
                break
            time.sleep(0.5)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert r.headers["Retry-After"] == "1"
        drainer.join(timeout=300)
        for c in clients:  # every client ends: its stream finished or it was refused
            c.join(timeout=300)
        assert not drainer.is_alive() and not any(c.is_alive() for c in clients), "a client or the drain hung"
        assert len(drained) == 2
        accepted = [c for c in streams if c["status"] == 200]
        assert len(accepted) >= 3 and all(c["status"] in (200, 503) for c in streams)
        for c in accepted:  # every accepted stream ran to its end: none was cut by the drain
            assert c["lines"][-1] == "data: [DONE]", c["lines"][-3:]
            last = json.loads(c["lines"][-2][len("data: "):])
            assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 100
        # the drain began while accepted streams ran; it returned only after the last one ended
        assert drained[0] < max(c["end"] for c in accepted) < drained[1]
    finally:
        serve.delete("drain")
    assert _healthy(server, "/long")  # the other apps keep serving


@pytest.mark.slow
def test_killing_one_of_two_replicas_fails_only_the_requests_it_held(server):
    """Two replicas under streaming load; SIGKILL-like ``ray.kill`` of one mid-stream: every
    client gets an answer, the streams on the survivor finish, only the killed replica's
    streams end early (cut before ``[DONE]``, never a hang), and new requests keep working."""
    import threading

    from moe_lab.orchestration.serve import REPLICA_HEADER

    serve.run(app_builder(ServeArgs(**{**server["long"], "num_replicas": 2, "max_batch_size": 4})), name="pair",
              route_prefix="/pair")
    body = {"prompt": "pair:", "max_tokens": 300, "temperature": 0, "stream": True}
    streams = []

    def client():
        out = {"lines": [], "first": threading.Event()}
        streams.append(out)
        try:
            with requests.post(f"{server['url']}/pair/v1/completions", json=body, stream=True, timeout=120) as r:
                out["status"], out["replica"] = r.status_code, r.headers.get(REPLICA_HEADER)
                for ln in r.iter_lines(decode_unicode=True):
                    if ln:
                        out["lines"].append(ln)
                        out["first"].set()
        except requests.RequestException as exc:  # the connection cut by the dead replica
            out["error"] = type(exc).__name__
        out["first"].set()

    try:
        clients = [threading.Thread(target=client) for _ in range(6)]
        for c in clients:
            c.start()
            time.sleep(0.1)
        deadline = time.monotonic() + 120
        while len(streams) < 6 or not all(s["first"].is_set() for s in streams):
            assert time.monotonic() < deadline, "the streams did not start"
            time.sleep(0.05)
        replicas = {s.get("replica") for s in streams}
        assert None not in replicas and len(replicas) == 2, f"the load did not reach both replicas: {replicas}"
        victim = streams[0]["replica"]
        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"]]
        assert len(names) == 1, names
        ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
        for c in clients:
            c.join(timeout=180)
        assert not any(c.is_alive() for c in clients), "a client hung after the replica died"
        for s in streams:
            done = bool(s["lines"]) and s["lines"][-1] == "data: [DONE]"
            if s["replica"] == victim:  # cut: no [DONE] (a broken chunked body, or an error event)
                assert not done, s["lines"][-2:]
            else:  # on the survivor: ran to its end
                assert s["status"] == 200 and done and "error" not in s, (s.get("error"), s["lines"][-2:])
                last = json.loads(s["lines"][-2][len("data: "):])
                assert last["usage"]["completion_tokens"] == 300
        for _ in range(3):  # the app keeps answering (the survivor, then the replacement Serve starts)
            r = _post(server, {"prompt": "after", "max_tokens": 4, "temperature": 0}, "/pair")
            assert r.status_code == 200 and r.headers[REPLICA_HEADER] != victim, r.text
    finally:
        serve.delete("pair")
