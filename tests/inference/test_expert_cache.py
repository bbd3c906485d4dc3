"""DynamicExpertLoader: in-place management, equivalence, the residency bound, policies, stats."""

import copy

import pytest
import torch

from moe_lab import ConfigError, MoEModel
from moe_lab.inference import CachedExperts, DynamicExpertLoader, KVCache, generate
from moe_lab.model.experts import GroupedExperts


def _model(**overrides):
    torch.manual_seed(0)
    kw = dict(vocab_size=61, hidden_size=32, num_layers=3, num_attention_heads=4, num_experts=6,
              experts_per_token=2, expert_hidden_size=24, max_position_embeddings=64, dropout=0.0)
    kw.update(overrides)
    return MoEModel(**kw).eval()


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 61, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("cache_size", [1, 2, 3, 6])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("strategy", ["none", "usage_based"])
def test_outputs_equal_fully_resident_model(cache_size, policy, strategy):
    ref = _model()
    managed = copy.deepcopy(ref)
    loader = DynamicExpertLoader(managed, cache_size=cache_size, eviction_policy=policy, prefetch_strategy=strategy)
    assert all(isinstance(layer.experts, CachedExperts) for layer in managed.moe_layers)  # in place
    ids, mask = _batch()
    with torch.no_grad():
        want, want_info = ref(ids, attention_mask=mask, return_routing_info=True)
        for _ in range(2):  # cold, then warm cache
            got, got_info = managed(ids, attention_mask=mask, return_routing_info=True)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            assert torch.equal(got_info["expert_counts"], want_info["expert_counts"])
    st = loader.stats()
    assert st["misses"] + st["prefetches"] > 0 and st["hits"] > 0


@pytest.mark.parametrize("expert_type, activation", [("ffn", "relu"), ("glu", "geglu")])
def test_equivalence_other_expert_shapes_and_decode(expert_type, activation):
    ref = _model(expert_type=expert_type, activation=activation, num_layers=2, moe_layer_frequency=1)
    managed = copy.deepcopy(ref)
    DynamicExpertLoader(managed, cache_size=2)
    ids = torch.randint(0, 61, (2, 6))
    a = generate(ref, ids, max_new_tokens=10, temperature=0)
    b = generate(managed, ids, max_new_tokens=10, temperature=0)
    assert torch.equal(a, b)


def test_residency_bound_holds_with_rounds():
    """A prefill that needs all 6 experts with 2 slots runs in rounds; never more than 2 resident."""
    ref = _model()
    managed = copy.deepcopy(ref)
    loader = DynamicExpertLoader(managed, cache_size=2, prefetch_strategy="usage_based")
    seen_max = {}

    def spy(cache, expert, slot):
        resident = cache.resident()
        seen_max[cache.layer_idx] = max(seen_max.get(cache.layer_idx, 0), len(resident))
        assert len(resident) <= 2 and cache.slot_expert[slot] == expert
        # device memory holds exactly 2 experts' weights per layer
        assert cache.slots.w_in.shape[0] == 2

    for c in loader.caches:
        c.load_listeners.append(spy)
    ids = torch.randint(0, 61, (2, 32))
    with torch.no_grad():
        out, info = managed(ids, return_routing_info=True)
        torch.testing.assert_close(out, ref(ids), rtol=0, atol=1e-6)
    assert all((info["expert_counts"] > 0).sum(-1) > 2)  # more experts needed than slots ...
    st = loader.stats()
    assert st["rounds"] > len(loader.caches)  # ... so at least one layer ran several rounds
    assert seen_max and max(seen_max.values()) == 2
    assert all(len(r) <= 2 for r in st["resident"].values())
    # the experts' full weights are no longer on the model (only the slots are)
    n_expert_rows = sum(p.shape[0] for n, p in managed.named_parameters() if ".experts." in n and p.dim() == 3)
    assert n_expert_rows == 2 * 2 * len(loader.caches)


def _drive(cache: CachedExperts, experts):
    """One forward of ``cache`` in which exactly ``experts`` receive a token each."""
    counts = torch.zeros(cache.num_experts, dtype=torch.long)
    counts[list(experts)] = 1
    x = torch.randn(int(counts.sum()), cache.hidden_size)
    cache(x, counts)


@pytest.mark.parametrize("policy, evicted", [("lru", 0), ("lfu", 1)])
def test_eviction_policies(policy, evicted):
    model = _model(num_layers=1)
    loader = DynamicExpertLoader(model, cache_size=2, eviction_policy=policy, prefetch_strategy="none")
    cache = loader.caches[0]
    for step in ([0], [0], [0], [1]):
        _drive(cache, step)
    assert cache.resident() == [0, 1]
    _drive(cache, [2])  # LRU drops 0 (used longest ago), LFU drops 1 (used once)
    assert evicted not in cache.resident() and 2 in cache.resident()
    st = loader.stats()
    assert (st["hits"], st["misses"], st["evictions"]) == (2, 3, 1)
    per_expert = cache.params_per_expert() * 4
    assert st["bytes_loaded"] == 3 * per_expert
    assert st["hit_rate"] == pytest.approx(2 / 5)


def test_stats_keys_and_reset():
    model = _model(num_layers=2)
    loader = DynamicExpertLoader(model, cache_size=6, prefetch_strategy="none")
    ids = torch.randint(0, 61, (1, 8))
    with torch.no_grad():
        model(ids)
        first = loader.stats()
        model(ids)
        second = loader.stats()
    for key in ("hits", "misses", "hit_rate", "evictions", "prefetches", "bytes_loaded", "resident"):
        assert key in first
    assert first["hits"] == 0 and first["evictions"] == 0 and first["prefetches"] == 0
    assert second["misses"] == first["misses"] and second["hits"] == first["misses"]  # all fit: 2nd pass all hits
    loader.reset_stats()
    assert loader.stats()["hits"] == 0 and loader.stats()["resident"] == second["resident"]


def test_usage_based_warm_start_and_hot_experts(tiny_ckpt):
    path, ref = tiny_ckpt
    model = copy.deepcopy(ref)
    loader = DynamicExpertLoader(model, cache_size=2, eviction_policy="lru", prefetch_strategy="usage_based",
                                 routing_stats=path)
    # warm start: the two most used experts of each layer (from routing_stats.json)
    assert loader.resident() == {0: [1, 3], 1: [0, 2]}
    assert loader.stats()["prefetches"] == 4
    cache = loader.caches[0]
    assert cache.hot_experts() == frozenset({3})  # cache_size // 2 hottest experts are evicted last
    _drive(cache, [0])  # must evict 1 (not hot), although 3 is less recently used
    assert cache.resident() == [0, 3]
    _drive(cache, [2])
    assert cache.resident() == [2, 3]


def test_usage_based_lookahead_prefetches_and_matches(tiny_ckpt):
    path, ref = tiny_ckpt
    model = copy.deepcopy(ref)
    loader = DynamicExpertLoader(model, cache_size=2, prefetch_strategy="usage_based", routing_stats=path)
    loader.reset_stats()
    ids = torch.randint(0, 259, (1, 6))
    want = generate(ref, ids, max_new_tokens=12, temperature=0)
    got = generate(model, ids, max_new_tokens=12, temperature=0)
    assert torch.equal(got, want)
    st = loader.stats()
    assert st["prefetches"] > 0 and 0 < st["useful_prefetches"] <= st["prefetches"]
    assert st["bytes_loaded"] == (st["misses"] + st["prefetches"]) * ref.moe_layers[0].experts.params_per_expert() * 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eviction_policy="fifo"), "unknown eviction_policy 'fifo'; expected one of \\['lru', 'lfu'\\]"),
        (dict(prefetch_strategy="magic"), "expected one of \\['usage_based', 'none'\\]"),
        (dict(cache_size=0), "cache_size must be an int >= 1, got 0"),
        (dict(cache_size=2.5), "cache_size must be an int >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DynamicExpertLoader(_model(num_layers=1), **kwargs)


def test_refuses_twice_and_dense_models():
    model = _model(num_layers=1)
    DynamicExpertLoader(model, cache_size=2)
    with pytest.raises(ConfigError, match="already managed"):
        DynamicExpertLoader(model, cache_size=2)
    dense_only = _model(num_layers=1, moe_layer_frequency=2)  # layer 0 is dense
    with pytest.raises(ConfigError, match="MoE layers"):
        DynamicExpertLoader(dense_only)


def test_mixed_dense_and_moe_layers():
    ref = _model(num_layers=4, moe_layer_frequency=2)  # layers 1 and 3 are MoE
    managed = copy.deepcopy(ref)
    loader = DynamicExpertLoader(managed, cache_size=2)
    assert sorted(loader.resident()) == [1, 3]
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(managed(ids, attention_mask=mask), ref(ids, attention_mask=mask), rtol=0, atol=1e-6)


def test_flat_weights_still_available():
    ref = _model(num_layers=1)
    managed = copy.deepcopy(ref)
    DynamicExpertLoader(managed, cache_size=1)
    assert isinstance(ref.moe_layers[0].experts, GroupedExperts)
    torch.testing.assert_close(managed.get_expert_weights(0)[3], ref.get_expert_weights(0)[3])
    assert managed.num_parameters() == ref.num_parameters()


def test_kv_cache_decode_with_tiny_cache():
    ref = _model()
    managed = copy.deepcopy(ref)
    DynamicExpertLoader(managed, cache_size=1, eviction_policy="lfu")
    ids = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        c1, c2 = KVCache.for_model(ref, 2, 8), KVCache.for_model(managed, 2, 8)
        a, b = ref(ids, kv_cache=c1), managed(ids, kv_cache=c2)
        nxt = a[:, -1].argmax(-1, keepdim=True)
        torch.testing.assert_close(managed(nxt, kv_cache=c2), ref(nxt, kv_cache=c1), rtol=0, atol=1e-6)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)



# ---- overlapped offload: one-layer-ahead prediction, counters ---------------------------------


def _needed_per_forward(model):
    """Count, with hooks on the fully resident model, the experts each MoE forward needs."""
    seen = []

    def hook(module, args):
        seen.append(int((args[1] > 0).sum()))

    return seen, [m.experts.register_forward_pre_hook(hook) for m in model.moe_layers]


def test_lookahead_prefetch_is_exact_cuts_misses_and_counters_add_up():
    ref = _model(num_layers=4, num_experts=8)
    needed, hooks = _needed_per_forward(ref)
    ids = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(3))
    want = generate(ref, ids, max_new_tokens=12, temperature=0)
    for h in hooks:
        h.remove()
    misses = {}
    for lookahead in (True, False):
        managed = copy.deepcopy(ref)
        loader = DynamicExpertLoader(managed, cache_size=4, prefetch_strategy="usage_based", lookahead=lookahead)
        got = generate(managed, ids, max_new_tokens=12, temperature=0)
        assert torch.equal(got, want)  # greedy tokens of the fully resident model, whatever is resident
        st = loader.stats()
        assert st["hits"] + st["misses"] == st["experts_needed"] == sum(needed)
        assert st["prefetches"] == st["prefetch_hits"] + st["wasted_prefetches"] + st["pending_prefetches"]
        assert st["lookahead"] is lookahead
        misses[lookahead] = st["misses"]
        if lookahead:
            assert st["prefetches"] > 0 and st["prefetch_hits"] > 0 and st["hit_rate"] > 0
            assert st["prefetch_hits"] > st["wasted_prefetches"]  # the prediction is mostly right
        else:
            assert st["prefetches"] == 0
    assert misses[True] < misses[False]  # prefetching that silently does nothing fails here


def test_prediction_is_the_next_layers_router_on_the_current_hidden_state():
    ref = _model(num_layers=3)
    managed = copy.deepcopy(ref)
    loader = DynamicExpertLoader(managed, cache_size=2)
    stashed = {}
    orig = loader.caches[0].forward

    def spy(x, tpe, backend=None):  # what layer 0's forward finds stashed for layer 1
        stashed["look"] = loader.caches[0].lookahead
        return orig(x, tpe, backend)

    loader.caches[0].forward = spy
    x_in = {}
    managed.layers[0].post_attn_norm.register_forward_pre_hook(lambda m, a: x_in.setdefault("x", a[0]))
    with torch.no_grad():
        managed(torch.randint(0, 61, (2, 5)))
        nxt, votes = stashed["look"]
        assert nxt is loader.caches[1]
        layer1 = managed.layers[1]
        h = layer1.post_attn_norm(x_in["x"]).reshape(-1, 32)
        _, experts_TK = layer1.mlp.router.route(h)
        assert torch.equal(votes, torch.bincount(experts_TK.reshape(-1), minlength=6).float())


def test_forward_resident_with_permuted_slots_equals_grouped_experts():
    ref = _model(num_layers=1)
    managed = copy.deepcopy(ref)
    loader = DynamicExpertLoader(managed, cache_size=3, prefetch_strategy="none")
    cache = loader.caches[0]
    cache.prefetch([5, 2, 4])  # slot order != expert order
    assert sorted(cache.slot_expert) == [2, 4, 5] and cache.slot_expert != [2, 4, 5]
    tpe = torch.tensor([0, 0, 3, 0, 2, 4])
    x = torch.randn(9, 32)
    want = ref.moe_layers[0].experts(x, tpe)
    torch.testing.assert_close(cache.forward_resident(x, tpe), want, rtol=0, atol=0)


def _argmax_tokens(model, prompt, steps):
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt):].tolist()


@pytest.mark.parametrize("cache_size", [4, 2])  # 2: a batch step often needs more experts than slots (rounds)
def test_engine_offload_pieces_equal_argmax_and_count_like_the_eager_path(cache_size):
    """The engine's piecewise offload step (CUDA graphs on a GPU, plain calls here) decodes a
    mixed batch (idle rows included) exactly, and needs the same experts as the eager path."""
    from moe_lab.inference import InferenceEngine, SamplingParams

    ref = _model(num_layers=3, num_experts=8)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [30, 31, 32]]
    want = [_argmax_tokens(ref, p, 10) for p in prompts]
    needed = {}
    for pieces in (True, False):
        managed = copy.deepcopy(ref)
        loader = DynamicExpertLoader(managed, cache_size=cache_size)
        eng = InferenceEngine(managed, max_batch_size=4, offload_graphs=pieces)
        assert eng.use_offload_graphs is pieces
        outs = eng.generate(prompts, SamplingParams(10, temperature=0))
        assert [o.token_ids for o in outs] == want
        assert (eng.stats()["offload_steps"] > 0) is pieces
        st = loader.stats()
        assert st["hits"] + st["misses"] == st["experts_needed"]
        assert st["prefetches"] == st["prefetch_hits"] + st["wasted_prefetches"] + st["pending_prefetches"]
        assert st["prefetch_hits"] > 0
        needed[pieces] = st["experts_needed"]
    assert needed[True] == needed[False]  # idle rows' experts are not counted (nor loaded)


def test_offload_pieces_need_a_partly_resident_cache():
    from moe_lab import InputError
    from moe_lab.inference import InferenceEngine

    with pytest.raises(InputError, match="offload_graphs=True needs"):
        InferenceEngine(_model(num_layers=1), offload_graphs=True)  # no expert cache
    managed = _model(num_layers=1)
    DynamicExpertLoader(managed, cache_size=6)  # every expert resident
    with pytest.raises(InputError, match="partly resident"):
        InferenceEngine(managed, offload_graphs=True)
