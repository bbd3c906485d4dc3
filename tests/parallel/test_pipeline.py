"""Pipeline parallelism (``torch.distributed.pipelining``, stages cut at decoder layers) is
exact: PP 2 (1F1B with uneven stages, interleaved 1F1B with two stages per rank, GPipe) on 2
gloo ranks, and PP 2 × EP 2 on 4, train three AdamW steps with the losses, gradient norms,
routing statistics (aux-loss shares, expert counts) and final weights of one process (relative
error <= 1e-5); a PP run's full state dict and optimizer state are the one-process ones and
load in one process; a one-process checkpoint loads into PP and continues exactly; the
layout is validated at the boundary with messages naming the values."""

import pytest
import torch
import torch.distributed as dist
from helpers import tiny_config
from parallel.layouts_harness import ROWS, TOL, assert_matches, make_optimizer, rel_err, run_ranks, steps, train

from moe_lab import MoEModel
from moe_lab.checkpoint import optimizer_state_by_name
from moe_lab.checkpoint.training_state import load_optimizer_state
from moe_lab.errors import DistributedError
from moe_lab.parallel import ParallelDims
from moe_lab.parallel.pipeline import OnOtherStage, stage_layers
from moe_lab.parallel.runtime import parallel_runtime
from moe_lab.training.step import StepSettings, train_step


def _cfg(**kw):
    return tiny_config(vocab_size=96, router_jitter_noise=0.0, **kw).to_dict()


#: name -> (model config, layout): every layer MoE on 3 layers (uneven stages [0, 1] | [2]);
#: MoE every other layer on 4 (interleaved: rank 0 runs stages 0 and 2, dense layers only)
CASES = {
    "pp2 1f1b": (_cfg(num_layers=3), ParallelDims(pp=2)),
    "pp2 interleaved": (_cfg(num_layers=4, moe_layer_frequency=2), ParallelDims(pp=2, pp_schedule="interleaved_1f1b")),
    "pp2 gpipe": (_cfg(num_layers=3, load_balancing_scope="sequence"), ParallelDims(pp=2, pp_schedule="gpipe")),
}
CASES_EP = {
    "pp2xep2 1f1b": (_cfg(num_layers=3), ParallelDims(pp=2, ep=2)),
    "pp2xep2 interleaved": (_cfg(num_layers=4), ParallelDims(pp=2, ep=2, pp_schedule="interleaved_1f1b")),
}


def _recording_step(record):
    """``train_step`` that keeps each step's routing statistics (this rank's shares)."""

    def step(model, optimizer, micro):
        stats = train_step(model, optimizer, micro, getattr(model, "runtime", None), settings=StepSettings(max_grad_norm=1.0))
        record.append((stats.layer_stats_3L, stats.expert_counts_LE))
        return stats

    return step


def _reference(cfg, more):
    """One process: 3 steps (losses, routing statistics, weights, optimizer state), then
    ``more`` steps from there (the weights a resumed run must reach)."""
    torch.manual_seed(0)
    model = MoEModel.from_config(cfg)
    optimizer = make_optimizer(model)
    record = []
    losses = train(model, steps(), optimizer=optimizer, step_fn=_recording_step(record))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt_t, opt_m = optimizer_state_by_name(model, optimizer, lambda _name, t: t.detach().clone())
    cont = train(model, more, optimizer=optimizer)
    return {"losses": losses, "state": state, "routing": record, "opt": (opt_t, opt_m),
            "cont_losses": cont, "cont_state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _summed(runtime, t):
    return runtime.all_reduce_sum(t.double())


def _body(rank, world, cases, more, out_dir):
    for name, (cfg, dims, ref) in cases.items():
        torch.manual_seed(0)
        model = MoEModel.from_config(cfg)
        full = {k for k, _ in model.named_parameters()}
        runtime = parallel_runtime(model, dims=dims)
        model.runtime = runtime
        pipe = runtime.pipeline
        # this rank holds only its stages' parameters, under their one-process names
        mine = {k for k, _ in model.named_parameters()}
        assert mine < full and any(isinstance(layer, OnOtherStage) for layer in model.layers), name
        assert (model.embed_tokens is not None) == (pipe.pp_rank == 0), name
        optimizer = make_optimizer(model)
        record = []
        losses = train(model, steps(), runtime, optimizer=optimizer, step_fn=_recording_step(record))
        state = runtime.full_state_dict(model)
        assert_matches(name, losses, state, ref)
        # routing statistics: every pp rank's equal one process's (summed over the data-parallel ranks)
        for step, ((ls, counts), (ref_ls, ref_counts)) in enumerate(zip(record, ref["routing"])):
            assert torch.equal(_summed(runtime, counts), ref_counts.double()), (name, step, counts, ref_counts)
            err = rel_err(_summed(runtime, ls), ref_ls)
            assert err <= TOL, f"{name} step {step}: layer stats {ls} vs {ref_ls} ({err:.1e})"
        # the optimizer state gathered over the stages is the one-process state
        opt_t, opt_m = runtime.full_optimizer_state(model, optimizer)
        ref_t, ref_m = ref["opt"]
        assert list(opt_t) == list(ref_t), f"{name}: optimizer keys {set(opt_t) ^ set(ref_t)}"
        for k, want in ref_t.items():
            ok = rel_err(opt_t[k].float(), want.float()) <= TOL if want.dim() else float(opt_t[k]) == float(want)
            assert ok, (name, k)
        assert [sorted(g["params"]) for g in opt_m["param_groups"]] == [sorted(g["params"]) for g in ref_m["param_groups"]]
        if rank == 0:
            from safetensors.torch import save_file

            save_file(state, f"{out_dir}/{name.replace(' ', '_')}.safetensors")
        # a one-process checkpoint (weights + optimizer state at step 3) loads into PP and continues exactly
        model = MoEModel.from_config(cfg)
        model.load_state_dict(ref["state"])  # full weights load before the cut (as runner.build_task_model)
        runtime = parallel_runtime(model, dims=dims)
        optimizer = make_optimizer(model)
        # (copies: the optimizer updates its state in place, and spawned ranks share the reference's memory)
        load_optimizer_state(model, optimizer, {k: v.clone() for k, v in ref_t.items()}, ref_m, runtime.expert_slices(model))
        cont = train(model, more, runtime, optimizer=optimizer)
        assert_matches(f"{name} resumed", cont, runtime.full_state_dict(model),
                       {"losses": ref["cont_losses"], "state": ref["cont_state"]})
        # evaluation through the stages gives one process's logits and expert counts
        batch = steps()[0][0]
        dp = slice(runtime.dp_rank * ROWS // runtime.dp_size, (runtime.dp_rank + 1) * ROWS // runtime.dp_size)
        model.eval()
        logits, info = runtime.pipeline.forward(model, batch["input_ids"][dp], batch["attention_mask"][dp],
                                                StepSettings())
        ref_model = MoEModel.from_config(cfg)
        ref_model.load_state_dict(ref["cont_state"])
        ref_model.eval()
        with torch.no_grad():
            want, want_info = ref_model(batch["input_ids"][dp], attention_mask=batch["attention_mask"][dp],
                                        return_routing_info=True)
        assert rel_err(logits, want) <= TOL, name
        assert torch.equal(info["expert_counts"], want_info["expert_counts"]), name
        dist.barrier()


def _run(cases, world, tmp_path):
    more = steps(1, seed=11)
    full = {name: (cfg, dims, _reference(cfg, more)) for name, (cfg, dims) in cases.items()}
    run_ranks(_body, world, full, more, str(tmp_path))
    from safetensors.torch import load_file

    for name, (cfg, _, ref) in full.items():  # the PP run's saved full state loads in one process
        model = MoEModel.from_config(cfg)
        model.load_state_dict(load_file(str(tmp_path / f"{name.replace(' ', '_')}.safetensors")), strict=True)
        for k, v in model.state_dict().items():
            assert rel_err(v, ref["state"][k]) <= TOL, (name, k)


@pytest.mark.slow
def test_pp2_schedules_match_one_process(tmp_path):
    _run(CASES, 2, tmp_path)


@pytest.mark.slow
def test_pp2_with_ep2_on_4_ranks_matches_one_process(tmp_path):
    _run(CASES_EP, 4, tmp_path)


def test_stages_are_balanced_consecutive_layers():
    assert stage_layers(3, 2) == [range(0, 2), range(2, 3)]
    assert stage_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    with pytest.raises(DistributedError, match=r"num_layers \(2\) must be at least the number of pipeline stages \(4\)"):
        stage_layers(2, 4)


@pytest.mark.parametrize("dims, world, cfg, message", [
    (ParallelDims(pp=2, dp_shard=2), 4, {}, r"pp \(2\) > 1 with dp_shard \(2\) or tp \(1\) > 1 is not supported yet"),
    (ParallelDims(pp=2, pp_schedule="zero_bubble"), 2, {}, r"pp_schedule \('zero_bubble'\) must be one of"),
    (ParallelDims(pp=2, pp_schedule="interleaved_1f1b"), 2, dict(num_layers=3),
     r"num_layers \(3\) must be at least pp \(2\) × 2 stages per rank of interleaved_1f1b = 4"),
    (ParallelDims(pp=2), 2, dict(tie_word_embeddings=True), r"tie_word_embeddings is not supported with pp \(2\) > 1"),
    (ParallelDims(pp=2), 2, dict(load_balancing_scope="global_batch"),
     r"load_balancing_scope 'global_batch' is not supported with pp \(2\) > 1"),
])
def test_bad_pipeline_layouts_name_the_values(dims, world, cfg, message):
    with pytest.raises(DistributedError, match=message):
        dims.resolve(world).check_model(tiny_config(**cfg))


def test_pipeline_dims_resolve():
    dims = ParallelDims(pp=2, ep=2).resolve(4)
    assert (dims.dp_replicate, dims.dp, dims.pp_stages, dims.mesh_shape) == (2, 2, 2, (2, 1, 1, 2, 1))
    assert ParallelDims(pp=2, pp_schedule="interleaved_1f1b").pp_stages == 4
    ParallelDims(pp=2).resolve(2).check_model(tiny_config(num_layers=2))


def test_pp_job_spec_and_reference_trainer_validate_the_layout():
    from pathlib import Path

    from moe_lab.errors import ConfigError
    from moe_lab.jobs import load_job
    from moe_lab.orchestration.train import DistributedMoETrainer

    job = Path(__file__).resolve().parents[2] / "jobs" / "train_pp.yaml"
    dims = load_job(job).scaling.parallel_dims()
    assert (dims.pp, dims.ep, dims.dp, dims.pp_schedule) == (2, 2, 2, "1f1b")
    assert load_job(job, ["scaling.pp_schedule=gpipe"]).scaling.parallel_dims().pp_schedule == "gpipe"
    assert load_job(job).parallel_problems(259) == []
    for overrides, match in [
        (["scaling.pp_schedule=zero_bubble"], r"scaling\.pp_schedule \('zero_bubble'\) must be one of"),
        (["training.gradient_accumulation_steps=1"],
         r"scaling\.pp_schedule '1f1b' needs training\.gradient_accumulation_steps \(1\) >= scaling\.pp \(2\)"),
        (["scaling.pp_schedule=interleaved_1f1b", "model.num_layers=3"],
         r"model\.num_layers \(3\) must be at least scaling\.pp \(2\) × 2 stages per rank"),
        (["scaling.dp_shard=2", "scaling.ep=1", "scaling.num_workers=4"],
         r"scaling\.pp \(2\) > 1 with scaling\.dp_shard \(2\) or scaling\.tp \(1\) > 1 is not supported yet"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_job(job, overrides)
    model = MoEModel.from_config(tiny_config(num_layers=4))
    trainer = DistributedMoETrainer(model, world_size=4, expert_parallel_size=2, pipeline_parallel_size=2,
                                    pp_schedule="interleaved_1f1b")
    assert (trainer.dims.pp, trainer.dims.ep, trainer.dims.pp_schedule) == (2, 2, "interleaved_1f1b")
    with pytest.raises(DistributedError, match=r"needs gradient_accumulation_steps \(1\) >= pipeline_parallel_size \(2\)"):
        DistributedMoETrainer(model, world_size=2, pipeline_parallel_size=2)
    with pytest.raises(DistributedError, match=r"num_layers \(2\) must be at least pipeline_parallel_size \(4\)"):
        DistributedMoETrainer(MoEModel.from_config(tiny_config()), world_size=4, pipeline_parallel_size=4,
                              pp_schedule="gpipe")
