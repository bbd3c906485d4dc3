"""The Ray Serve app over real HTTP on 127.0.0.1: routes, streaming, bad input, auth, load.

One local Ray cluster and one Serve instance for the whole module (on a free port), with
three apps from the same builder:

- ``/``        the default app (auth off, max_tokens_limit 32);
- ``/secured`` the same with ``api_key_env`` (auth on);
- ``/tight``   max_ongoing_requests=1, max_queued_requests=1 and a 0.05 s request timeout.
"""

import concurrent.futures
import json
import os
import socket

import pytest
import requests
import torch

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from moe_lab import MoEModel, OptimizedMoEModel  # noqa: E402
from moe_lab.data import ByteTokenizer  # noqa: E402
from moe_lab.inference import CompletionRequest  # noqa: E402
from moe_lab.orchestration.serve import app_builder  # noqa: E402
from moe_lab.serving import ServeArgs  # noqa: E402
from moe_lab.checkpoint import write_checkpoint  # noqa: E402

KEY_ENV = "MOE_LAB_TEST_SERVE_KEY"
KEY = "s3cret-test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_checkpoint(path):
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = MoEModel(vocab_size=len(tok), hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4,
                     experts_per_token=2, expert_hidden_size=32, max_position_embeddings=64, dropout=0.0)
    write_checkpoint(path, model.config, model.state_dict(), tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = _tiny_checkpoint(tmp_path_factory.mktemp("serve") / "model")
    os.environ[KEY_ENV] = KEY  # replicas of a local cluster inherit the driver's environment
    port = _free_port()
    ray.init("local", num_cpus=4, object_store_memory=200 * 1024**2, include_dashboard=False,
             log_to_driver=False, logging_level="WARNING")
    base = dict(checkpoint=str(ckpt), max_experts_in_memory=2, max_tokens_limit=32, num_cpus_per_replica=0.5,
                torch_threads=1, max_batch_size=8, batch_wait_timeout_s=0.01)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder(ServeArgs(**base)), name="main", route_prefix="/")
        serve.run(app_builder(ServeArgs(**base, api_key_env=KEY_ENV)), name="secured", route_prefix="/secured")
        tight = {**base, "max_ongoing_requests": 1, "max_queued_requests": 1, "request_timeout_s": 0.05}
        serve.run(app_builder(ServeArgs(**tight)), name="tight", route_prefix="/tight")
        yield {"url": f"http://127.0.0.1:{port}", "ckpt": ckpt}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(KEY_ENV, None)


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
    assert r.status_code == 200 and r.json()["status"] == "ok"
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
    before = requests.get(f"{server['url']}/v1/stats", timeout=30).json()["requests"]

    def one(i):
        return _post(server, {"prompt": f"{i} + {i} =", "max_tokens": 6, "temperature": 0}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert [r.status_code for r in results] == [200] * 64
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in results)
    after = requests.get(f"{server['url']}/v1/stats", timeout=30).json()["requests"]
    assert after["batched_requests"] - before["batched_requests"] == 64
    assert after["batches"] - before["batches"] < 64  # dynamic batching merged requests
    assert after["max_batch"] > 1


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
