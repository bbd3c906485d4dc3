"""OptimizedMoEModel: loading, greedy equivalence, batching, streaming, the two memory knobs, text helpers."""

import pytest
import torch

from moe_lab import CheckpointError, ConfigError, InputError, OptimizedMoEModel
from moe_lab.data import ByteTokenizer
from moe_lab.inference import CachedExperts, CompletionRequest, FieldError
from moe_lab.checkpoint import load_pretrained_moe


def _argmax_reference(model, ids, steps):
    """Step-by-step argmax of the full forward, no KV cache."""
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("resident", [4, 2])  # all experts, then half of them
@pytest.mark.parametrize("strategy", ["usage_based", "none"])
def test_greedy_equals_stepwise_argmax_of_full_forward(tiny_ckpt, resident, strategy):
    path, _ = tiny_ckpt
    ref = load_pretrained_moe(path, dropout=0.0).eval()
    model = OptimizedMoEModel(path, device_map="cpu", max_experts_in_memory=resident, prefetch_strategy=strategy)
    for prompt in ([5, 17, 200, 3], [42]):
        ids = torch.tensor([prompt])
        out = model.generate(ids, max_length=len(prompt) + 20, temperature=0)
        assert torch.equal(out, _argmax_reference(ref, ids, 20))
    st = model.stats()
    assert all(len(r) <= resident for r in st["resident"].values())
    if resident == 2:
        assert st["misses"] + st["prefetches"] > 2 * 2  # experts really moved in and out


def test_batched_prompts_of_different_lengths(tiny_ckpt):
    path, _ = tiny_ckpt
    model = OptimizedMoEModel(path, max_experts_in_memory=2)
    prompts = [[1, 2, 3, 4, 5, 6], [7], [100, 101, 102]]
    out = model.generate(prompts, max_length=16, temperature=0)
    assert out.shape == (3, 16)  # max_length = total length, prompt (padded to 6) included
    for i, p in enumerate(prompts):
        alone = model.generate([p], max_length=len(p) + 10, temperature=0)
        assert out[i, -10:].tolist() == alone[0, -10:].tolist()
    # the same batch as a right-padded tensor + attention_mask
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    again = model.generate(ids, attention_mask=mask, max_new_tokens=10, temperature=0)
    assert torch.equal(again[:, -10:], out[:, -10:])


def test_streaming_matches_and_max_length_semantics(tiny_ckpt):
    path, _ = tiny_ckpt
    model = OptimizedMoEModel(path, max_experts_in_memory=2)
    ids = torch.tensor([[9, 8, 7], [1, 2, 3]])
    full = model.generate(ids, max_length=11, temperature=0)
    steps = list(model.generate(ids, max_length=11, temperature=0, streaming=True))
    assert len(steps) == 8 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), full[:, 3:])
    assert model.generate(ids, max_new_tokens=4, temperature=0).shape == (2, 7)  # overrides max_length
    with pytest.raises(InputError, match="max_length \\(3\\) counts the prompt"):
        model.generate(ids, max_length=3)
    with pytest.raises(InputError, match="exceeds the context \\(64\\)"):
        model.generate(ids, max_length=100)
    with pytest.raises(InputError, match="unknown generate\\(\\) arguments \\['beams'\\]"):
        model.generate(ids, beams=2)


def test_sampling_seed_eos_and_greedy_flags(tiny_ckpt):
    path, _ = tiny_ckpt
    model = OptimizedMoEModel(path)
    ids = torch.tensor([[65, 66, 67]])
    a = model.generate(ids, max_length=20, temperature=1.0, top_p=0.9, top_k=50, seed=3)
    b = model.generate(ids, max_length=20, temperature=1.0, top_p=0.9, top_k=50, seed=3)
    assert torch.equal(a, b)
    greedy = model.generate(ids, max_length=20, temperature=0)
    assert torch.equal(model.generate(ids, max_length=20, temperature=1.5, do_sample=False), greedy)
    eos = int(greedy[0, 5])
    stopped = model.generate(ids, max_length=20, temperature=0, eos_token_id=eos, pad_token_id=0)
    assert stopped[0, 5] == eos and stopped.shape[1] == 6  # the only row finished: generation ends
    with pytest.raises(InputError, match="top_p must be in \\(0, 1\\], got 0"):
        model.generate(ids, top_p=0)


def test_two_memory_knobs_are_distinct(tiny_ckpt):
    path, _ = tiny_ckpt
    model = OptimizedMoEModel(path, max_experts_in_memory=1, expert_cache_size=3, prefetch_strategy="none")
    store = model.expert_loader.store
    assert store.file_bytes_read == 0  # nothing read before it is needed (the file is only mapped)
    model.generate([[1, 2, 3, 4, 5, 6, 7, 8]], max_new_tokens=12, temperature=0)
    st = model.stats()
    assert all(len(r) == 1 for r in st["resident"].values())  # device tier: 1 expert per layer
    host = st["store"]["host_resident"]
    assert all(len(r) == 3 for r in host.values())  # host tier: 3 materialised copies per layer
    assert st["store"]["host_hits"] > 0
    # every device slot holds one expert; the slots are all the model has of its experts
    for layer in model.model.moe_layers:
        assert isinstance(layer.experts, CachedExperts) and layer.experts.slots.w_in.shape[0] == 1

    no_host = OptimizedMoEModel(path, max_experts_in_memory=2, expert_cache_size=0, prefetch_strategy="none")
    no_host.generate([[1, 2, 3, 4, 5, 6, 7, 8]], max_new_tokens=12, temperature=0)
    st = no_host.stats()
    assert all(r == [] for r in st["store"]["host_resident"].values())
    assert st["store"]["host_hits"] == 0 and st["store"]["host_misses"] == st["misses"]
    assert st["store"]["file_bytes_read"] == st["bytes_loaded"]  # every load read the mapped file


def test_tokenizer_and_text_helpers(tiny_ckpt):
    path, _ = tiny_ckpt
    model = OptimizedMoEModel(path, max_experts_in_memory=2)
    assert isinstance(model.tokenizer, ByteTokenizer)
    base = model.complete([CompletionRequest("12 + 5 =", max_tokens=12, temperature=0)])[0]
    assert base.finish_reason in ("length", "stop") and base.prompt_tokens == 8
    assert model.generate_text("12 + 5 =", max_new_tokens=12, temperature=0) == base.text
    # a stop string cuts the text before it, in complete() and in stream(): stop at the
    # first ASCII character the model generates after two tokens (bytes < 128 decode alone)
    assert base.finish_reason == "length" and len(base.token_ids) == 12
    stop = next(chr(t) for t in base.token_ids[2:] if 32 <= t < 127)
    cut = base.text[: base.text.find(stop)]
    req = CompletionRequest("12 + 5 =", max_tokens=12, temperature=0, stop=["zzz", stop])
    done = model.complete([req])[0]
    assert done.text == cut and done.finish_reason == "stop" and stop not in done.text
    chunks = list(model.stream(req))
    assert "".join(c.text for c in chunks) == cut and chunks[-1].finish_reason == "stop"
    chunks = list(model.stream(CompletionRequest("12 + 5 =", max_tokens=12, temperature=0)))
    assert "".join(c.text for c in chunks) == base.text and chunks[-1].finish_reason == base.finish_reason


def test_complete_batches_mixed_requests_like_single_ones(tiny_ckpt):
    path, _ = tiny_ckpt
    model = OptimizedMoEModel(path, max_experts_in_memory=2)
    reqs = [
        CompletionRequest("hello", max_tokens=5, temperature=0),
        CompletionRequest([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], max_tokens=9, temperature=0.7, top_p=0.8, seed=11),
        CompletionRequest("x", max_tokens=50, temperature=0),  # long: grouped apart (context 64)
        CompletionRequest("a much longer prompt than the others", max_tokens=3, temperature=1.0, top_k=5, seed=2),
    ]
    batched = model.complete(reqs)
    single = [model.complete([r])[0] for r in reqs]
    for b, s, r in zip(batched, single, reqs):
        assert b.token_ids == s.token_ids and b.text == s.text
        assert len(b.token_ids) <= r.max_tokens


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt=[]), "prompt"),
        (dict(prompt="x" * 64), "prompt"),  # longer than the context
        (dict(prompt=[1, 2, 259]), "prompt"),  # outside the vocabulary
        (dict(prompt=[1, -1]), "prompt"),
        (dict(prompt=[1, "a"]), "prompt"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(max_tokens=33), "max_tokens"),  # above the limit given below
        (dict(prompt="y" * 40, max_tokens=30), "max_tokens"),  # prompt + max_tokens > context
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(seed=-1), "seed"),
    ],
)
def test_request_validation_names_the_field(tiny_ckpt, kwargs, field):
    path, _ = tiny_ckpt
    model = OptimizedMoEModel(path, max_experts_in_memory=2)
    req = CompletionRequest(**{"prompt": "ok", **kwargs})
    with pytest.raises(FieldError) as info:
        model.check_request(req, max_tokens_limit=32)
    assert info.value.field == field and str(info.value).startswith(field + ":")


def test_loading_errors(tmp_path, tiny_ckpt):
    path, _ = tiny_ckpt
    with pytest.raises(CheckpointError, match="not found"):
        OptimizedMoEModel(tmp_path / "missing")
    with pytest.raises(ConfigError, match="device_map must be"):
        OptimizedMoEModel(path, device_map="tpu")
    with pytest.raises(ConfigError, match="max_experts_in_memory must be an int >= 1"):
        OptimizedMoEModel(path, max_experts_in_memory=0)
    with pytest.raises(ConfigError, match="expert_cache_size must be an int >= 0"):
        OptimizedMoEModel(path, expert_cache_size=-1)
    with pytest.raises(ConfigError, match="unknown eviction_policy"):
        OptimizedMoEModel(path, eviction_policy="random")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            OptimizedMoEModel(path, device_map="cuda")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        OptimizedMoEModel(broken)


def test_tied_embeddings_and_dense_layers(tmp_path, make_ckpt):
    path = tmp_path / "tied"
    make_ckpt(path, routing=False, tie_word_embeddings=True, num_layers=3, moe_layer_frequency=2)
    ref = load_pretrained_moe(path, dropout=0.0).eval()
    model = OptimizedMoEModel(path, max_experts_in_memory=1)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(model.generate(ids, max_length=15, temperature=0).cpu(), _argmax_reference(ref, ids, 10))
    assert list(model.stats()["resident"]) == [1]  # only layer 1 is MoE


def test_auto_residency_and_engine_stats(tiny_ckpt, caplog):
    """``max_experts_in_memory="auto"`` keeps every expert on a CPU device (and logs it); the
    offload path runs through the engine with misses counted; the CLI takes "auto" and rejects junk."""
    import logging

    from typer.testing import CliRunner

    from moe_lab.cli import app

    path, _ = tiny_ckpt
    with caplog.at_level(logging.INFO, logger="moe_lab.inference.optimized"):
        auto = OptimizedMoEModel(path, device_map="cpu", max_experts_in_memory="auto")
    assert all(c.cache_size == 4 for c in auto.expert_loader.caches)
    assert "all 4 experts per layer resident" in caplog.text
    with pytest.raises(ConfigError, match="or 'auto'"):
        OptimizedMoEModel(path, device_map="cpu", max_experts_in_memory="lots")
    half = OptimizedMoEModel(path, device_map="cpu", max_experts_in_memory=1, prefetch_strategy="none")
    out = half.generate([[5, 6, 7], [8]], max_new_tokens=6, temperature=0)
    full = auto.generate([[5, 6, 7], [8]], max_new_tokens=6, temperature=0)
    assert torch.equal(out, full)  # one expert slot per layer: same tokens, experts swapped in and out
    st = half.stats()
    assert st["misses"] > 0 and st["engine"]["finished"] == 2 and st["engine"]["cuda_graph"] is False
    runner = CliRunner()
    args = ["generate", str(path), "--prompt", "ab", "--max-new-tokens", "3", "--temperature", "0"]
    res = runner.invoke(app, args + ["--show-stats"])
    assert res.exit_code == 0 and "experts resident per MoE layer: 4/4 (auto)" in res.output, res.output
    res = runner.invoke(app, args + ["--max-experts-in-memory", "0"])
    assert res.exit_code == 2 and "positive integer or auto" in res.output


def test_complete_and_stream_with_the_engine_loop_on_a_thread(tiny_ckpt):
    """What a server does: the engine steps on a background thread, requests come from others."""
    path, _ = tiny_ckpt
    model = OptimizedMoEModel(path, device_map="cpu", max_experts_in_memory=4)
    reqs = [CompletionRequest("12 + 5 =", max_tokens=6, temperature=0), CompletionRequest("ab", max_tokens=4, temperature=0)]
    want = model.complete(reqs)
    model.engine.start()
    try:
        got = model.complete(reqs)
        chunks = list(model.stream(reqs[0]))
        events = []
        r = model.submit(reqs[1], on_event=events.append)
        assert r.done.wait(30)
    finally:
        model.engine.shutdown()
    assert [c.text for c in got] == [c.text for c in want]
    assert "".join(c.text for c in chunks) == want[0].text and chunks[-1].finish_reason == "length"
    assert model.completion(r).text == want[1].text and events[-1].finished


# ---- overlapped offload through OptimizedMoEModel; device_map ---------------------------------


def _cpu_map():
    return {"embed_tokens": "cpu", "layers.0": "cpu", "layers.1": "cpu", "norm": "cpu", "lm_head": "cpu"}


def test_offload_prediction_reported_and_device_map_dict(tiny_ckpt):
    path, _ = tiny_ckpt
    ids = torch.tensor([[5, 17, 200, 3]])
    resident = OptimizedMoEModel(path, device_map="cpu", max_experts_in_memory=4)
    want = resident.generate(ids, max_new_tokens=16, temperature=0)
    model = OptimizedMoEModel(path, device_map=_cpu_map(), max_experts_in_memory=2)
    assert model.placement["layers.1"] == torch.device("cpu") and model.placement["rotary"] == torch.device("cpu")
    model.expert_loader.reset_stats()
    assert torch.equal(model.generate(ids, max_new_tokens=16, temperature=0), want)
    st = model.stats()
    assert st["hits"] + st["misses"] == st["experts_needed"] > 0
    assert st["prefetch_hits"] > 0 and st["hit_rate"] > 0  # the one-layer-ahead prediction is used


@pytest.mark.parametrize(
    "device_map, match",
    [
        ({**_cpu_map(), "layerz.0": "cpu"}, "unknown module prefix 'layerz.0'"),
        ({**_cpu_map(), "layers.1": "tpu:0"}, "device_map\\['layers.1'\\] must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu:0'"),
        ({k: v for k, v in _cpu_map().items() if k != "lm_head"}, "covers no device for modules \\['lm_head'\\]"),
        ("gpu", "device_map must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        ({}, "device_map is an empty dict"),
    ],
)
def test_device_map_rejects_bad_values(tiny_ckpt, device_map, match):
    path, _ = tiny_ckpt
    with pytest.raises(ConfigError, match=match):
        OptimizedMoEModel(path, device_map=device_map)


def test_plan_device_map_fits_splits_offloads():
    from moe_lab.inference.placement import ModelSizes, plan_device_map

    # 4 layers of 10 dense + 8 experts x 5 bytes = 50 each; embeddings 20, head 20: 240 in all
    sizes = ModelSizes(embed_bytes=20, head_bytes=20, layer_bytes=[10] * 4, expert_bytes=[5] * 4, num_experts=8)
    assert sizes.total() == 240
    assert plan_device_map(sizes, {}).device_map == {"": "cpu"}
    one = plan_device_map(sizes, {"cuda:0": 300, "cuda:1": 300}, headroom=1.0)
    assert one.device_map == {"": "cuda:0"} and one.experts_in_memory == 8
    # does not fit on one GPU: layers split in order, embeddings first, head last, every expert resident
    split = plan_device_map(sizes, {"cuda:0": 130, "cuda:1": 130}, headroom=1.0)
    assert split.experts_in_memory == 8
    assert [split.device_map[f"layers.{i}"] for i in range(4)] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert split.device_map["embed_tokens"] == "cuda:0" and split.device_map["lm_head"] == "cuda:1"
    assert split.bytes_per_device == {"cuda:0": 120, "cuda:1": 120}
    tied = plan_device_map(ModelSizes(40, 0, [10] * 4, [5] * 4, 8), {"cuda:0": 130, "cuda:1": 130}, 1.0, tied=True)
    assert tied.device_map["lm_head"] == tied.device_map["embed_tokens"] == "cuda:0"  # the shared matrix stays put
    assert tied.device_map["layers.3"] == "cuda:1"
    # not even split: fewer experts per layer on the GPUs (the rest behind the expert cache)
    small = plan_device_map(sizes, {"cuda:0": 70, "cuda:1": 70}, headroom=1.0)
    assert small.experts_in_memory == 3  # 20 + 2 x (10 + 3 x 5) = 70 per GPU
    assert sum(small.bytes_per_device.values()) == sizes.total(3)
    with pytest.raises(ConfigError, match="does not fit the devices"):
        plan_device_map(sizes, {"cuda:0": 30}, headroom=1.0)
