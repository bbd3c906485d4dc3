"""Expert tensor parallelism (``ParallelDims(expert_tp=True)``, the plan's
``ExpertTensorParallel``) is exact: TP 2 on 2 gloo ranks (GLU experts on the grouped path,
FFN experts on the eager one) and TP 2 x EP 2 on 4 train three AdamW steps with the losses,
gradient norms and final weights of one process (relative error <= 1e-5), while every rank
holds only half of each expert's FFN; the full state saved there (and, with EP, the DCP
sharded checkpoint) loads in one process, and a resume from the full state (weights and
optimizer state) after step 2 continues exactly.
The layout is validated at the boundary with errors naming the values."""

import pytest
import torch
from helpers import tiny_config
from parallel.layouts_harness import assert_matches, make_optimizer, reference, run_ranks, steps, tp_step, train

from moe_lab import DistributedError, MoEModel
from moe_lab.parallel import ParallelDims
from moe_lab.parallel.runtime import parallel_runtime

INTER = 48  #: tiny_config's expert_hidden_size: every TP rank holds INTER / 2 of it


def _cfg(**kw):
    # layer 0 dense, layer 1 MoE (4 experts)
    return tiny_config(vocab_size=96, moe_layer_frequency=2, router_jitter_noise=0.0, **kw).to_dict()


def _check_split(name, model, dims):
    """Each rank's expert weights are DTensors over TP holding half the intermediate dim of
    its EP share of the experts (a silently ignored option fails here)."""
    from torch.distributed.tensor import DTensor

    experts = model.layers[1].mlp.experts
    glu = experts.expert_type.value == "glu"
    w_in, w_out = experts.w_in, experts.w_out
    assert isinstance(w_in, DTensor) and isinstance(w_out, DTensor), name
    e = 4 // dims.ep
    assert tuple(w_in.to_local().shape) == (e, (2 if glu else 1) * INTER // 2, 32), (name, w_in.to_local().shape)
    assert tuple(w_out.to_local().shape) == (e, 32, INTER // 2), (name, w_out.to_local().shape)
    if glu:  # rank r holds the gate rows and the up rows of the same half of I
        full, t = w_in.full_tensor(), w_in.device_mesh.get_local_rank()
        want = torch.cat([full[:, t * 24:(t + 1) * 24], full[:, INTER + t * 24:INTER + (t + 1) * 24]], dim=1)
        assert torch.equal(w_in.to_local(), want), name


def _body(rank, world, cases, root, sharded=False):
    from moe_lab.checkpoint import load_optimizer_state, write_checkpoint
    from moe_lab.checkpoint.sharded import save_sharded

    for name, (cfg, dims, ref) in cases.items():
        torch.manual_seed(0)
        model = MoEModel.from_config(cfg)
        model.runtime = runtime = parallel_runtime(model, dims=dims)
        _check_split(name, model, dims)
        opt = make_optimizer(model)
        first = train(model, steps()[:2], runtime, opt, step_fn=tp_step)  # [loss1, loss2, norm1, norm2]
        weights, (opt_t, opt_m) = runtime.full_state_dict(model), runtime.full_optimizer_state(model, opt)
        last = train(model, steps()[2:], runtime, opt, step_fn=tp_step)
        state = runtime.full_state_dict(model)
        assert_matches(name, first[:2] + last[:1] + first[2:] + last[1:], state, ref)
        if rank == 0:
            write_checkpoint(f"{root}/{name}", model.config, state)
        if sharded:  # DCP, every rank its pieces
            save_sharded(model, opt, f"{root}/{name}-sharded")
        # resume at this layout from the full state after step 2 (the trainer's path): step 3 is exact
        torch.manual_seed(1)
        model = MoEModel.from_config(cfg)
        model.load_state_dict(weights)
        model.runtime = runtime = parallel_runtime(model, dims=dims)
        opt = make_optimizer(model)
        load_optimizer_state(model, opt, opt_t, opt_m, runtime.expert_slices(model))
        losses = train(model, steps()[2:], runtime, opt, step_fn=tp_step)
        step3 = {"losses": [ref["losses"][2], ref["losses"][5]], "state": ref["state"]}
        assert_matches(f"{name} resumed after step 2", losses, runtime.full_state_dict(model), step3)


def _check_saved(root, cases, sharded=False):
    from moe_lab import load_pretrained_moe
    from moe_lab.checkpoint.sharded import load_sharded

    for name, (cfg, _, ref) in cases.items():
        full = load_pretrained_moe(f"{root}/{name}").state_dict()
        assert_matches(f"{name} full checkpoint in one process", ref["losses"], full, ref)
        if sharded:
            torch.manual_seed(1)  # other initial weights: the load must overwrite them all
            model = MoEModel.from_config(cfg)
            load_sharded(model, None, f"{root}/{name}-sharded")
            assert_matches(f"{name} sharded checkpoint in one process", ref["losses"], model.state_dict(), ref)


@pytest.mark.slow
def test_expert_tp2_matches_one_process_and_saves_full_experts(tmp_path):
    cases = {}
    for name, kw in {"etp2 glu grouped": {}, "etp2 ffn eager": dict(expert_type="ffn", activation="gelu",
                                                                    moe_backend="eager")}.items():
        cfg = _cfg(**kw)
        cases[name] = (cfg, ParallelDims(tp=2, expert_tp=True), reference(cfg, steps()))
    run_ranks(_body, 2, cases, str(tmp_path))
    _check_saved(tmp_path, cases)


@pytest.mark.slow
def test_expert_tp2_with_ep2_on_4_ranks_matches_one_process(tmp_path):
    cfg = _cfg()
    cases = {"etp2xep2": (cfg, ParallelDims(tp=2, ep=2, expert_tp=True), reference(cfg, steps()))}
    run_ranks(_body, 4, cases, str(tmp_path), True)
    _check_saved(tmp_path, cases, sharded=True)


def test_expert_tp_plan_names_every_moe_layers_experts():
    from moe_lab.parallel.tensor_parallel import ExpertTensorParallel, tp_plan

    config = tiny_config(num_layers=4, moe_layer_frequency=2)  # MoE layers 1 and 3
    plan = tp_plan(config, expert_tp=True)
    assert {k for k, v in plan.items() if isinstance(v, ExpertTensorParallel)} == {"layers.1.mlp.experts",
                                                                                  "layers.3.mlp.experts"}
    assert not any(isinstance(v, ExpertTensorParallel) for v in tp_plan(config).values())  # off by default


def test_expert_tp_layout_is_validated_naming_the_values():
    from moe_lab.dims import model_problems

    with pytest.raises(DistributedError, match=r"expert_tp needs tp > 1 \(got tp 1\)"):
        ParallelDims(expert_tp=True).resolve(2)
    with pytest.raises(DistributedError, match=r"expert_tp with dp_shard \(2\) > 1 is not supported"):
        ParallelDims(dp_shard=2, tp=2, expert_tp=True).resolve(4)
    with pytest.raises(DistributedError, match=r"expert_tp must be true or false, got 'yes'"):
        ParallelDims(tp=2, expert_tp="yes").resolve(2)
    assert ParallelDims(tp=2, ep=2, expert_tp=True).resolve(4).expert_tp
    config = tiny_config(expert_hidden_size=50, vocab_size=96)
    assert model_problems(ParallelDims(tp=4, expert_tp=True), config) == [
        "dense_ffn_size (50) must be divisible by tp (4)",
        "expert_hidden_size (50) must be divisible by tp (4) with expert_tp: each TP rank holds 1/4 of every expert's FFN"]
    assert model_problems(ParallelDims(tp=4), config) == ["dense_ffn_size (50) must be divisible by tp (4)"]


def test_job_spec_scaling_expert_tp_is_validated_and_reaches_the_layout():
    from moe_lab.jobs import JobSpec

    base = {"model": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_experts": 4,
                      "expert_hidden_size": 48, "vocab_size": 96}}
    spec = JobSpec.model_validate({**base, "scaling": {"num_workers": 4, "tp": 2, "ep": 2, "expert_tp": True}})
    assert spec.scaling.parallel_dims() == ParallelDims(dp_replicate=2, tp=2, ep=2, expert_tp=True)
    tp_only = {**base, "scaling": {"num_workers": 2, "tp": 2, "expert_tp": True}}
    with pytest.raises(ValueError, match=r"scaling.expert_tp with scaling.ep 1 and GLU experts needs "
                                         r"training.checkpoint_format 'full' \(got 'auto'\)"):
        JobSpec.model_validate(tp_only)
    spec = JobSpec.model_validate({**tp_only, "training": {"checkpoint_format": "full"}})
    assert spec.scaling.parallel_dims().expert_tp
    with pytest.raises(ValueError, match=r"scaling.expert_tp needs scaling.tp > 1 \(got scaling.tp 1\)"):
        JobSpec.model_validate({**base, "scaling": {"num_workers": 2, "expert_tp": True}})
    bad = {**base, "model": {**base["model"], "expert_hidden_size": 50, "dense_intermediate_size": 64}}
    with pytest.raises(ValueError, match=r"model.expert_hidden_size \(50\) must be divisible by scaling.tp \(4\) "
                                         r"with scaling.expert_tp"):
        JobSpec.model_validate({**bad, "scaling": {"num_workers": 4, "tp": 4, "expert_tp": True}})
