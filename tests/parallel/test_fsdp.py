"""FSDP2 (``fully_shard`` per decoder layer, experts over their own expert-data-parallel mesh)
is exact: FSDP 2 and FSDP 2 × EP 2 on 2 gloo ranks train three AdamW steps with the losses and
final weights of one process (relative error <= 1e-5); parameters really are sharded; bf16
mixed precision computes in bf16 and stays close."""

import pytest
import torch
from helpers import tiny_config
from parallel.layouts_harness import assert_matches, reference, rel_err, run_ranks, steps, train

from moe_lab import MoEModel
from moe_lab.parallel import ParallelDims
from moe_lab.parallel.layout import ParallelOptions
from moe_lab.parallel.runtime import parallel_runtime

WORLD = 2
LAYOUTS = {
    "fsdp2": ParallelDims(dp_shard=2),
    "fsdp2xep2": ParallelDims(dp_shard=2, ep=2),
}


def _cfg():
    # layer 0 dense, layer 1 MoE: both kinds of FSDP unit
    return tiny_config(vocab_size=96, moe_layer_frequency=2, router_jitter_noise=0.0).to_dict()


def _body(rank, world, cfg, ref, bf16_ref_losses):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for name, dims in LAYOUTS.items():
        torch.manual_seed(0)
        model = MoEModel.from_config(cfg)
        full_numel = sum(p.numel() for p in model.parameters())
        runtime = parallel_runtime(model, dims=dims)
        assert all(isinstance(layer, FSDPModule) for layer in model.layers), name
        assert all(isinstance(p, DTensor) for p in model.parameters()), name
        local = sum(p.to_local().numel() for p in model.parameters())
        assert local <= full_numel / world + 64, f"{name}: rank holds {local} of {full_numel} elements"
        losses = train(model, steps(), runtime)
        assert_matches(name, losses, runtime.full_state_dict(model), ref)
    # bf16 compute, fp32 reduce: the master weights stay fp32, the losses are close but not equal
    torch.manual_seed(0)
    model = MoEModel.from_config(cfg)
    runtime = parallel_runtime(model, dims=ParallelDims(dp_shard=2, ep=2),
                               options=ParallelOptions(fsdp_mixed_precision=True, fsdp_reshard_after_forward=False))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    losses = train(model, steps(), runtime)
    err = rel_err(torch.tensor(losses), torch.tensor(ref["losses"]))
    assert 0 < err < 2e-2, f"bf16 losses {losses} vs fp32 {ref['losses']} ({err:.1e})"
    bf16 = torch.tensor(bf16_ref_losses)
    assert rel_err(torch.tensor(losses), bf16) < 2e-2


@pytest.mark.slow
def test_fsdp_and_fsdp_ep_match_one_process():
    cfg = _cfg()
    ref = reference(cfg, steps())
    # a one-process bf16 run for scale: FSDP's bf16 run must be as close to it as to fp32
    torch.manual_seed(0)
    model = MoEModel.from_config(cfg).to(torch.bfloat16)
    bf16_losses = train(model, steps())
    run_ranks(_body, WORLD, cfg, ref, bf16_losses)
