import math

import datasets
import pytest
import torch
from helpers import tiny_config

from moe_lab import InputError, MoEModel, RouterAnalyzer, RoutingAnalysis
from moe_lab.data import ByteTokenizer


def _model(**kw):
    torch.manual_seed(0)
    return MoEModel.from_config(tiny_config(**kw)).eval()


@pytest.mark.parametrize("router_type,k", [("top_k", 2), ("switch", 1), ("expert_choice", 1)])
def test_counts_agree_with_routing_info(router_type, k):
    kw = {"capacity_factor": 1.0} if router_type == "switch" else {}
    model = _model(router_type=router_type, experts_per_token=k, **kw)
    ids = torch.randint(0, 97, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        _, info = model(ids, attention_mask=mask, return_routing_info=True)
    analysis = RouterAnalyzer(model).analyze_routing(ids, attention_mask=mask, return_heatmap=True)
    assert isinstance(analysis, RoutingAnalysis)
    assert torch.equal(analysis.expert_counts, info["expert_counts"].cpu())
    assert analysis.num_tokens == 10 + 7 + 4
    assert analysis.moe_layer_indices == model.moe_layer_indices
    assert analysis.heatmap.shape == (len(model.moe_layer_indices), 4)
    assert torch.allclose(analysis.heatmap.sum(-1), torch.ones(2))
    for lay, counts in zip(analysis.layers, info["expert_counts"]):
        c = counts.double()
        assert lay.load_imbalance == pytest.approx(float(c.max() / c.mean()))
        assert lay.load_cv == pytest.approx(float(c.std(unbiased=False) / c.mean()))
        assert lay.dead_experts == [e for e in range(4) if counts[e] == 0]
        assert 0 < lay.router_entropy <= math.log(4) + 1e-9 and 0.25 <= lay.mean_top1_prob <= 1


def test_dict_batch_and_texts_sum_over_batches():
    model = _model(vocab_size=259)
    tok = ByteTokenizer()
    texts = ["hello world", "a", "routing is fun " * 3, "x+y=z"]
    analyzer = RouterAnalyzer(model, batch_size=3, max_length=16)
    expected = torch.zeros(2, 4, dtype=torch.long)
    with torch.no_grad():
        for t in texts:
            ids = tok.encode(t)
            for i in range(0, len(ids), 16):  # long texts are cut into max_length chunks
                _, info = model(torch.tensor([ids[i : i + 16]]), return_routing_info=True)
                expected += info["expert_counts"]
    a = RouterAnalyzer(model, batch_size=1, max_length=16).analyze_routing(texts)
    assert torch.equal(a.expert_counts, expected)
    assert a.num_tokens == sum(len(tok.encode(t)) for t in texts) and a.num_sequences == 6
    b = analyzer.analyze_routing(texts)  # padded batches of 3 route the same tokens
    assert b.num_tokens == a.num_tokens and int(b.expert_counts.sum()) == 2 * 2 * a.num_tokens
    padded = [{"input_ids": tok.encode(t)[:16] + [256] * (16 - len(tok.encode(t)[:16])),
               "attention_mask": [1] * len(tok.encode(t)[:16]) + [0] * (16 - len(tok.encode(t)[:16]))} for t in texts]
    p = RouterAnalyzer(model, batch_size=1, max_length=16).analyze_routing(padded)  # padding is not routed
    assert p.num_tokens == sum(min(16, len(tok.encode(t))) for t in texts) and p.num_sequences == 4
    with pytest.raises(InputError, match="num_samples"):
        analyzer.analyze_routing(texts, num_samples=0)
    batch = {"input_ids": torch.tensor([tok.encode("abcd"), tok.encode("efgh")])}
    c = analyzer.analyze_routing(batch)
    assert c.num_tokens == 8 and c.heatmap is None
    d = c.to_dict()
    assert d["layers"][0]["expert_counts"] == c.layers[0].expert_counts and d["heatmap"] is None


def test_uniform_router_entropy_and_top1():
    model = _model()
    for layer in model.moe_layers:
        layer.router.gate.weight.data.zero_()
    a = RouterAnalyzer(model).analyze_routing(torch.randint(0, 97, (2, 8)))
    for lay in a.layers:
        assert lay.router_entropy == pytest.approx(math.log(4))
        assert lay.mean_top1_prob == pytest.approx(0.25)


def test_analyzer_restores_training_mode_and_plots(tmp_path):
    model = _model()
    model.train()
    a = RouterAnalyzer(model).analyze_routing(torch.randint(0, 97, (2, 8)))
    assert model.training
    path = a.plot(tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(path).endswith("routing.png")


def test_specialization_finds_rigged_domains(rigged):
    model = rigged.model(experts_per_token=1)
    texts, labels = rigged.rows()
    analyzer = RouterAnalyzer(model)
    spec = analyzer.compute_expert_specialization(datasets.Dataset.from_dict({"text": texts, "domain": labels}))
    assert spec[0] == {"arithmetic": 1.0, "dna": 0.0}
    assert spec[1] == {"arithmetic": 0.0, "dna": 1.0}
    assert spec[2] == {} and spec[3] == {}  # no tokens: empty dict
    # the same from input_ids + label column, and from a list of texts with labels
    tok = ByteTokenizer()
    ids_ds = datasets.Dataset.from_dict({"input_ids": [tok.encode(t) for t in texts], "kind": labels})
    assert analyzer.compute_expert_specialization(ids_ds, label_column="kind") == spec
    assert analyzer.compute_expert_specialization(texts, labels=labels) == spec
    per_layer = analyzer.compute_layer_specialization(texts, labels=labels)
    assert per_layer == {0: spec}
    top = analyzer.top_tokens_per_expert(texts, k=3)
    assert {t for t, _ in top[0][1]} <= set("acgt") and len(top[0][1]) == 3
    assert {t for t, _ in top[0][0]} <= set("0123456789+=")


def test_specialization_top2_sums_to_one_and_pools_layers(rigged):
    model = rigged.model(experts_per_token=2, num_layers=2)
    texts, labels = rigged.rows()
    analysis = RouterAnalyzer(model).analyze_specialization(texts, labels=labels)
    by_expert = analysis.by_expert()
    for shares in by_expert.values():
        if shares:
            assert sum(shares.values()) == pytest.approx(1.0)
    assert by_expert[0]["arithmetic"] == 1.0 and by_expert[1]["dna"] == 1.0
    assert analysis.label_counts.shape == (2, 4, 2)
    # pooled = sum over layers of the per-layer counts
    pooled = analysis.label_counts.sum(0)
    assert by_expert[2] == ({} if pooled[2].sum() == 0 else {l: float(c) / float(pooled[2].sum())
                                                             for l, c in zip(analysis.labels, pooled[2])})
    assert int(analysis.label_counts.sum()) == 2 * 2 * analysis.num_tokens
    base = analysis.label_shares()
    assert sum(base.values()) == pytest.approx(1.0)
    d = analysis.to_dict()
    assert d["by_expert"]["0"]["arithmetic"] == 1.0 and set(d["top_tokens"]) == {"0", "1"}


def test_num_samples_limits_sequences(rigged):
    model = rigged.model()
    texts, labels = rigged.rows(20)
    a = RouterAnalyzer(model).analyze_specialization(texts, labels=labels, num_samples=6)
    assert a.num_sequences == 6 and set(a.labels) == {"arithmetic", "dna"}  # evenly spaced: both domains


def test_bad_inputs(rigged):
    model = rigged.model()
    analyzer = RouterAnalyzer(model)
    no_label = datasets.Dataset.from_dict({"text": ["12+3", "acg"], "source": ["a", "b"]})
    with pytest.raises(InputError, match=r"no label column 'domain'.*\['text', 'source'\]"):
        analyzer.compute_expert_specialization(no_label)
    empty = datasets.Dataset.from_dict({"text": [], "domain": []})
    with pytest.raises(InputError, match="empty"):
        analyzer.compute_expert_specialization(empty)
    with pytest.raises(InputError, match="labels="):
        analyzer.compute_expert_specialization(["12+3", "acgt"])
    with pytest.raises(InputError, match="no tokens"):
        analyzer.compute_expert_specialization({"text": ["", "  "], "domain": ["a", "b"]})
    with pytest.raises(InputError, match=r"\[batch, seq\]"):
        analyzer.analyze_routing(torch.tensor([1, 2, 3]))
    with pytest.raises(InputError, match="out of range"):
        analyzer.analyze_routing(torch.tensor([[1, 999]]))
    with pytest.raises(InputError, match="inputs must be"):
        analyzer.analyze_routing(3.5)
    with pytest.raises(InputError, match="max_length"):
        RouterAnalyzer(model, max_length=1000)
    with pytest.raises(InputError, match="no MoE layers"):
        RouterAnalyzer(torch.nn.Linear(2, 2))
