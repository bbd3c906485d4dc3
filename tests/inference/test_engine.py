"""The inference engine on CPU: greedy parity with the full forward, continuous batching,
chunked prefill, seeded sampling independent of the batch, EOS/stop trimming, cancellation."""


import pytest
import torch
from helpers import tiny_config

from moe_lab import InputError, MoEModel
from moe_lab.data import ByteTokenizer
from moe_lab.inference import InferenceEngine, SamplingParams, generate, pad_batch
from moe_lab.inference.engine import gumbel_noise, sample_tokens, supports_graph_decode


def _model(**kw):
    torch.manual_seed(0)
    m = MoEModel.from_config(tiny_config(max_position_embeddings=64, **kw)).eval()
    with torch.no_grad():  # larger router weights so tokens really spread over the experts
        for moe in m.moe_layers:
            moe.router.gate.weight.mul_(20)
    return m


def _argmax_reference(model, prompt, steps):
    """Step-by-step argmax of the full forward (no cache): the new tokens."""
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt):].tolist()


@pytest.mark.parametrize("kw", [{}, {"num_shared_experts": 1}, {"qk_norm": True, "num_key_value_heads": 2}])
def test_greedy_equals_step_by_step_argmax_of_full_forward(kw):
    m = _model(**kw)
    ids = torch.randint(0, 97, (1, 6))
    out = generate(m, ids, max_new_tokens=10, temperature=0)
    assert out[0, 6:].tolist() == _argmax_reference(m, ids[0].tolist(), 10)


def test_mixed_lengths_join_mid_run_with_chunked_prefill():
    m = _model()
    prompts = [[5, 6, 7], list(range(1, 20)), [9], list(range(40, 56))]
    new = [12, 5, 9, 7]
    eng = InferenceEngine(m, max_batch_size=2, max_seq_len=40, prefill_chunk_size=4)
    reqs = [eng.submit(prompts[0], SamplingParams(new[0], temperature=0)),
            eng.submit(prompts[1], SamplingParams(new[1], temperature=0))]
    for _ in range(3):
        eng.step()
    assert not reqs[0].finished and reqs[0].token_ids  # request 0 is decoding ...
    assert reqs[1].prefilled < len(prompts[1])  # ... while request 1's 19-token prompt is still being prefilled
    reqs += [eng.submit(p, SamplingParams(n, temperature=0)) for p, n in zip(prompts[2:], new[2:])]
    idle_rows_decoded = 0  # a slot still prefilling sits below a decoding one: its row is computed, ignored
    while eng.has_work():
        eng.step()
        running = [r.slot for r in eng._running]
        idle_rows_decoded += any(r.slot < max(running, default=-1) for r in eng._prefilling)
    assert idle_rows_decoded
    for r, p, n in zip(reqs, prompts, new):
        assert r.finished and r.finish_reason == "length"
        assert r.token_ids == _argmax_reference(m, p, n), p
    st = eng.stats()
    assert st["mean_batch"] > 1.2 and st["finished"] == 4 and st["running"] == 0
    assert all(s is None for s in eng._slots)  # every slot freed


def test_generate_padded_batch_and_streaming():
    m = _model()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7], [9]]
    ids, mask = pad_batch(prompts)
    out = generate(m, ids, mask, max_new_tokens=8, temperature=0)
    assert out.shape == (3, 15) and torch.equal(out[:, :7], ids)
    for i, p in enumerate(prompts):
        assert out[i, 7:].tolist() == _argmax_reference(m, p, 8)
    steps = list(generate(m, ids, mask, max_new_tokens=8, temperature=0, streaming=True))
    assert torch.equal(torch.stack(steps, dim=1), out[:, 7:])


def test_seeded_sampling_is_independent_of_batch_composition():
    m = _model()
    p = SamplingParams(12, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    alone = InferenceEngine(m, max_batch_size=4, max_seq_len=40).generate([[3, 4, 5]], p)[0].token_ids
    eng = InferenceEngine(m, max_batch_size=4, max_seq_len=40, prefill_chunk_size=2)
    others = [eng.submit([1, 2, 3, 4, 5, 6], SamplingParams(12, temperature=1.0, seed=s)) for s in (1, 2)]
    eng.step()
    target = eng.submit([3, 4, 5], p)  # joins later, in another slot, next to other sampled rows
    eng.run_until_done()
    assert target.token_ids == alone
    assert others[0].token_ids != others[1].token_ids  # different seeds, different draws
    again = InferenceEngine(m, max_batch_size=4, max_seq_len=40).generate([[3, 4, 5]], SamplingParams(12, 1.0, 0.9, 20, 8))
    assert again[0].token_ids != alone


def test_device_sampler_matches_the_distribution_and_filters():
    torch.manual_seed(0)
    v = 6
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    vocab = torch.arange(v)
    n = 4000

    def draws(top_p, top_k, seed):  # n rows of the same logits, token indices 0..n-1
        return sample_tokens(logits.repeat(n, 1), torch.ones(n), torch.full((n,), top_p),
                             torch.full((n,), top_k), torch.full((n,), seed), torch.arange(n), vocab)

    freq = torch.bincount(draws(1.0, 0, 11), minlength=v).float() / n
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.03)  # Gumbel-max = softmax sampling
    assert set(draws(1.0, 2, 5).tolist()) == {0, 1}
    assert set(draws(0.5, 0, 5).tolist()) == {0}  # p(token 0) = 0.56 >= 0.5: the nucleus is one token
    assert set(draws(0.6, 0, 5).tolist()) == {0, 1}
    greedy = sample_tokens(logits.repeat(2, 1), torch.tensor([0.0, 0.0]), torch.ones(2), torch.zeros(2, dtype=torch.long),
                           torch.tensor([1, 2]), torch.tensor([0, 9]), vocab)
    assert greedy.tolist() == [0, 0]
    g = gumbel_noise(torch.tensor([3, 3, 4]), torch.tensor([0, 1, 0]), torch.arange(50000))
    assert torch.isfinite(g).all() and abs(g.mean().item() - 0.5772) < 0.02  # Gumbel mean = Euler's constant
    assert not torch.equal(g[0], g[1]) and not torch.equal(g[0], g[2])


def test_eos_and_stop_strings_are_trimmed_when_read_late():
    m = _model()
    prompt = [5, 17, 33, 2]
    ref = _argmax_reference(m, prompt, 12)
    eos = ref[4]
    for lag in (0, 3):
        eng = InferenceEngine(m, max_batch_size=2, max_seq_len=40, stream_lag=lag)
        r = eng.generate([prompt], SamplingParams(12, temperature=0), eos_token_id=eos)[0]
        assert r.token_ids == ref[: ref.index(eos) + 1] and r.finish_reason == "stop"
        assert r.output_ids == ref[: ref.index(eos)]
        if lag:
            assert r.issued > len(r.token_ids)  # tokens past the EOS were sampled, then dropped
    tok = ByteTokenizer()
    m2 = _model(vocab_size=len(tok))
    ids = tok.encode("ab")
    free = InferenceEngine(m2, max_seq_len=40, tokenizer=tok).generate([ids], SamplingParams(16, temperature=0))[0]
    stop = free.text[3:5]
    assert len(stop) == 2, free.text
    for lag in (0, 4):
        eng = InferenceEngine(m2, max_seq_len=40, tokenizer=tok, stream_lag=lag)
        r = eng.submit(ids, SamplingParams(16, temperature=0), stop=[stop])
        events = list(eng.stream(r))
        assert r.finish_reason == "stop" and r.text == free.text[: free.text.index(stop)]
        assert "".join(e.text for e in events) == r.text and events[-1].finished


def test_cancel_frees_the_slot_and_bad_requests_raise():
    m = _model()
    eng = InferenceEngine(m, max_batch_size=1, max_seq_len=32)
    a = eng.submit([1, 2, 3], SamplingParams(20, temperature=0))
    b = eng.submit([4, 5], SamplingParams(4, temperature=0))
    for _ in range(3):
        eng.step()
    assert b.slot == -1 and not b.finished  # waiting: the only slot is taken
    eng.cancel(a)
    eng.run_until_done()
    assert a.finish_reason == "cancelled" and len(a.token_ids) < 20
    assert b.token_ids == _argmax_reference(m, [4, 5], 4)
    with pytest.raises(InputError, match="max_seq_len"):
        eng.submit([1] * 30, SamplingParams(8))
    with pytest.raises(InputError, match="vocabulary"):
        eng.submit([1000])
    with pytest.raises(InputError, match="tokenizer"):
        eng.submit([1], stop=["x"])
    with pytest.raises(InputError, match="temperature"):
        eng.submit([1], SamplingParams(4, temperature=-1))
    with pytest.raises(InputError, match="use_cuda_graph"):
        InferenceEngine(m, use_cuda_graph=True)  # CPU: no graphs


def test_background_loop_serves_concurrent_consumers():
    m = _model()
    eng = InferenceEngine(m, max_batch_size=4, max_seq_len=32)
    assert not eng.loop_alive
    eng.start()
    try:
        assert eng.loop_alive  # what the Serve replica's health check reads
        reqs = [eng.submit([i + 1, i + 2], SamplingParams(6, temperature=0)) for i in range(6)]
        for i, r in enumerate(reqs):
            ids = [t for ev in r.events(timeout=30) for t in ev.token_ids]
            assert ids == _argmax_reference(m, [i + 1, i + 2], 6)
            assert r.done.is_set() and r.submitted_at <= r.first_token_at <= r.finished_at
        late = eng.submit([7, 8], SamplingParams(3, temperature=0))
        eng.run_until_done([late])  # waits for the loop thread instead of stepping itself
        assert late.token_ids == _argmax_reference(m, [7, 8], 3)
    finally:
        eng.shutdown()
    assert not eng.loop_alive


def test_graph_support_detection():
    assert supports_graph_decode(_model())
    assert not supports_graph_decode(_model(router_type="switch", experts_per_token=1))
    switch = _model(router_type="switch", experts_per_token=1)  # not graph-capable: still decodes eagerly
    out = generate(switch, torch.tensor([[1, 2, 3]]), max_new_tokens=5, temperature=0)
    assert out[0, 3:].tolist() == _argmax_reference(switch, [1, 2, 3], 5)
