"""The static-cache decoder (CUDA-graph step on GPU) against the reference generation, on CPU."""

import pytest
import torch
from helpers import tiny_config

from moe_lab import InputError, MoEModel
from moe_lab.inference import generate, pad_batch
from moe_lab.inference.static_decode import StaticDecoder, static_generate, supports_static_decode


def _model(**kw):
    torch.manual_seed(0)
    m = MoEModel.from_config(tiny_config(max_position_embeddings=64, **kw)).eval()
    with torch.no_grad():  # larger router weights so tokens really spread over the experts
        for moe in m.moe_layers:
            moe.router.gate.weight.mul_(20)
    return m


def test_greedy_equals_step_by_step_argmax_of_full_forward():
    m = _model()
    ids = torch.randint(0, 97, (1, 6))
    out = static_generate(m, ids.tolist(), max_new_tokens=10, temperature=0)
    ref = ids.clone()
    for _ in range(10):
        ref = torch.cat([ref, m(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_padded_batch_matches_reference_generate():
    m = _model()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7], [9]]
    ids, mask = pad_batch(prompts)
    ref = generate(m, ids, mask, max_new_tokens=8, temperature=0)
    dec = StaticDecoder(m, batch_size=3, max_length=ids.shape[1] + 8, use_cuda_graph=False)
    out = dec.generate(ids, mask, max_new_tokens=8, temperature=0)
    assert torch.equal(out, ref)
    # each row also equals the prompt decoded alone
    for i, p in enumerate(prompts):
        alone = static_generate(m, [p], max_new_tokens=8, temperature=0)
        assert out[i, -8:].tolist() == alone[0, -8:].tolist()


def test_sampling_is_seeded_and_eos_pads():
    m = _model()
    ids = torch.randint(0, 97, (2, 4))
    a = StaticDecoder(m, 2, 20, use_cuda_graph=False).generate(ids, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = StaticDecoder(m, 2, 20, use_cuda_graph=False).generate(ids, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert torch.equal(a, b)
    first = a[0, 4].item()
    c = StaticDecoder(m, 2, 20, use_cuda_graph=False).generate(ids, max_new_tokens=8, temperature=1.0, top_p=0.9,
                                                               seed=3, eos_token_id=first, pad_token_id=0)
    assert c[0, 5:].eq(0).all()


def test_unsupported_models_and_bad_sizes():
    assert not supports_static_decode(_model(router_type="switch", experts_per_token=1))
    with pytest.raises(InputError, match="static decoding"):
        StaticDecoder(_model(router_type="switch", experts_per_token=1), 1, 16)
    dec = StaticDecoder(_model(), 1, 8, use_cuda_graph=False)
    with pytest.raises(InputError, match="exceeds max_length"):
        dec.generate(torch.zeros(1, 5, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(InputError, match="built for batch 1"):
        dec.prefill(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))


def test_optimized_model_static_path_equals_eager_path(tmp_path):
    from moe_lab.inference import OptimizedMoEModel
    from moe_lab.training import save_moe_checkpoint

    m = _model()
    save_moe_checkpoint(m, None, None, tmp_path / "ckpt")
    opt = OptimizedMoEModel(tmp_path / "ckpt", device_map="cpu", max_experts_in_memory=4, dtype="float32")
    assert opt.static_decode is False  # CPU: eager KV-cache decoding by default
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5]]
    eager = opt.generate(prompts, max_new_tokens=6, temperature=0, pad_token_id=0)
    opt.static_decode = True  # every expert resident: the static (CUDA-graph on GPU) path applies
    static = opt.generate(prompts, max_new_tokens=6, temperature=0, pad_token_id=0)
    assert torch.equal(static, eager)
    streamed = torch.stack(list(opt.generate(prompts, max_new_tokens=6, temperature=0, streaming=True, pad_token_id=0)), dim=1)
    assert torch.equal(streamed, eager[:, -6:])
    half = OptimizedMoEModel(tmp_path / "ckpt", device_map="cpu", max_experts_in_memory=2, dtype="float32")
    assert not supports_static_decode(half.model)  # half the experts resident: the expert cache path
