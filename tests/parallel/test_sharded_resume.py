"""Resuming at sharded layouts (FSDP2, TP, with EP) through the trainer's own path
(:func:`moe_lab.runner.run_task`): a run saved after 2 of 4 steps and resumed ends with the
losses and weights of the uninterrupted run (relative error <= 1e-5), at the same layout and
at another (FSDP 2 x EP 2 -> TP 2 and -> one process, TP 2 -> FSDP 2).

``training.checkpoint_format`` "auto" writes these layouts' step checkpoints sharded
(torch.distributed.checkpoint: every rank its own pieces, nothing gathered; they load with
DCP after sharding, at the new layout); "full" still writes config.json + model.safetensors
(the full weights then load before sharding, the optimizer state is cut to each rank's
pieces). The final ``model/`` is the full format either way. Two gloo ranks on loopback run
every distributed case in one spawned group."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import tiny_config
from parallel.layouts_harness import rel_err, run_ranks

from moe_lab import load_pretrained_moe
from moe_lab.checkpoint import is_sharded_checkpoint
from moe_lab.config import TrainingConfig
from moe_lab.parallel import ParallelDims
from moe_lab.runner import TrainTask, run_task
from moe_lab.training.results import RESULT_FILE

STEPS = 4
TOL = 1e-5
FSDP_EP = ParallelDims(dp_shard=2, ep=2)
TP = ParallelDims(tp=2)
FSDP = ParallelDims(dp_shard=2)
#: run name -> (layout, the run whose step-2 checkpoint it resumes from (None: from scratch),
#: training.checkpoint_format)
RUNS = {
    "fsdp2xep2": (FSDP_EP, None, "auto"),
    "fsdp2xep2 -> fsdp2xep2": (FSDP_EP, "fsdp2xep2", "auto"),
    "fsdp2xep2 -> tp2": (TP, "fsdp2xep2", "auto"),
    "tp2": (TP, None, "auto"),
    "tp2 -> tp2": (TP, "tp2", "auto"),
    "tp2 -> fsdp2": (FSDP, "tp2", "auto"),
    "fsdp2xep2 full": (FSDP_EP, None, "full"),
    "fsdp2xep2 full -> tp2": (TP, "fsdp2xep2 full", "auto"),
}
#: the runs whose step checkpoint is the full format
FULL = {"fsdp2xep2 full"}


def _cfg():
    # layer 0 dense (GLU), layer 1 MoE; 96 tokens and 4 heads split over TP 2
    return tiny_config(vocab_size=96, moe_layer_frequency=2, router_jitter_noise=0.0).to_dict()


def _data():
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 96, (6 + i % 7,), generator=g).tolist()} for i in range(48)]
    return Dataset.from_list(rows)  # ragged: padding and token-count normalisation matter


def _dir(root: str, name: str) -> Path:
    return Path(root) / name.replace(" -> ", "_from_")


def _run(cfg, data, out: Path, dims=None, resume=None, fmt="auto"):
    """One training run through run_task (what every launcher calls); ``dims`` None: one process."""
    from moe_lab.parallel.runtime import parallel_runtime

    training = TrainingConfig(output_dir=str(out), batch_size=8, learning_rate=1e-2, warmup_steps=1,
                              max_steps=STEPS, save_steps=2, eval_steps=1000, logging_steps=1, seed=0,
                              mixed_precision=False, progress_bar=False, tensorboard=False, device="cpu",
                              checkpoint_format=fmt)
    task = TrainTask(model_config=cfg, training=training, train_data=data, resume_from=resume,
                     expert_parallel_size=dims.ep if dims else 1, dims=dims)
    make_runtime = (lambda model, t: parallel_runtime(model, dims=t.dims)) if dims is not None else None
    return run_task(task, make_runtime)


def _checkpoint(root: str, name: str) -> str:
    return str(_dir(root, name) / "checkpoints" / "step-000002")


def _body(rank, world, cfg, data, root):
    from moe_lab.parallel.runtime import DistributedRuntime

    gathers = []  # every full gather of the model (its state dict) on this rank: the run's name
    full_state_dict = DistributedRuntime.full_state_dict

    def counted(self, model):
        gathers.append(name)
        return full_state_dict(self, model)

    DistributedRuntime.full_state_dict = counted
    for name, (dims, source, fmt) in RUNS.items():
        _run(cfg, data, _dir(root, name), dims, _checkpoint(root, source) if source else None, fmt)
        # the final model/ is always gathered; a step checkpoint only in the full format
        want = 2 if name in FULL else 1
        assert gathers.count(name) == want, f"{name}: {gathers.count(name)} full gathers on rank {rank}, expected {want}"


def _history(out: Path):
    return json.loads((out / "model" / RESULT_FILE).read_text())["history"]


def _assert_continues(name: str, out: Path, want: Path) -> None:
    """The resumed run at ``out`` logged steps 3 and 4 with the losses and gradient norms of
    the uninterrupted run at ``want``, and ended with its weights."""
    got_h, want_h = _history(out), _history(want)
    assert got_h["step"] == [3, 4], f"{name}: steps {got_h['step']}"
    for key in ("loss", "grad_norm"):
        err = rel_err(torch.tensor(got_h[key]), torch.tensor(want_h[key][2:]))
        assert err <= TOL, f"{name}: {key} {got_h[key]} vs {want_h[key][2:]} ({err:.1e})"
    got = load_pretrained_moe(str(out / "model")).state_dict()
    ref = load_pretrained_moe(str(want / "model")).state_dict()
    assert got.keys() == ref.keys()
    for key, w in ref.items():
        err = rel_err(got[key], w)
        assert err <= TOL, f"{name}: {key} relative error {err:.1e}"


@pytest.mark.slow
def test_resume_at_fsdp_tp_and_ep_continues_exactly_at_any_layout(tmp_path):
    cfg, data, root = _cfg(), _data(), str(tmp_path)
    run_ranks(_body, 2, cfg, data, root)
    _run(cfg, data, _dir(root, "one process"))
    _run(cfg, data, _dir(root, "fsdp2xep2 -> one process"), resume=_checkpoint(root, "fsdp2xep2"))
    # the uninterrupted sharded runs are one process's run
    for name in ("fsdp2xep2", "tp2"):
        h, ref = _history(_dir(root, name)), _history(_dir(root, "one process"))
        assert rel_err(torch.tensor(h["loss"]), torch.tensor(ref["loss"])) <= TOL, (name, h["loss"], ref["loss"])
    # the step checkpoints: sharded (DCP files, no full weights) unless the format was "full";
    # the final model/ is the full format
    for name, (_, source, _) in RUNS.items():
        model_dir = _dir(root, name) / "model"
        assert (model_dir / "model.safetensors").is_file() and not is_sharded_checkpoint(model_dir), name
        if source is None:
            step = Path(_checkpoint(root, name))
            files = {p.name for p in step.iterdir()}
            if name in FULL:
                assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json"} <= files, (name, files)
                assert not is_sharded_checkpoint(step), name
            else:
                assert is_sharded_checkpoint(step) and {"trainer_state.json", "scheduler.json", "config.json"} <= files
                assert not files & {"model.safetensors", "optimizer.safetensors"}, (name, files)
                shards = {p.name for p in (step / "dcp").iterdir()}
                assert ".metadata" in shards and len([f for f in shards if f.endswith(".distcp")]) == 2, shards
            assert not list(step.parent.glob(".tmp-*")), name
    # every resumed run continues its source exactly
    for name, (_, source, _) in RUNS.items():
        if source is not None:
            _assert_continues(name, _dir(root, name), _dir(root, source))
    _assert_continues("fsdp2xep2 -> one process", _dir(root, "fsdp2xep2 -> one process"), _dir(root, "fsdp2xep2"))
    # a sharded step checkpoint reads as the full format (consolidated transparently): the
    # weights of the same run's full step checkpoint
    sharded = load_pretrained_moe(_checkpoint(root, "fsdp2xep2")).state_dict()
    full = load_pretrained_moe(_checkpoint(root, "fsdp2xep2 full")).state_dict()
    assert sharded.keys() == full.keys()
    for key, w in full.items():
        assert rel_err(sharded[key], w) <= TOL, key


@pytest.mark.slow
def test_sharded_step_checkpoints_rotate_and_resume_latest_in_one_process(tmp_path):
    """checkpoint_format "sharded" in one process: step checkpoints are DCP directories,
    save_total_limit keeps the newest two, and resume_from="latest" finds the newest one and
    ends with the uninterrupted run's weights."""
    from moe_lab.checkpoint import Checkpoint, list_checkpoints

    cfg, data, out = _cfg(), _data(), tmp_path / "run"
    training = TrainingConfig(output_dir=str(out), batch_size=8, learning_rate=1e-2, warmup_steps=1, max_steps=4,
                              save_steps=1, save_total_limit=2, eval_steps=1000, logging_steps=1, seed=0,
                              mixed_precision=False, progress_bar=False, tensorboard=False, device="cpu",
                              checkpoint_format="sharded")
    run_task(TrainTask(model_config=cfg, training=training, train_data=data))
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000002", "step-000003"], ckpts
    assert all(Checkpoint.open(p).is_sharded for p in ckpts)
    want = load_pretrained_moe(str(out / "model")).state_dict()
    (out / "model").rename(tmp_path / "uninterrupted")
    res = run_task(TrainTask(model_config=cfg, training=training, train_data=data, resume_from="latest"))
    assert res.steps_run == 1 and res.global_step == 4
    got = load_pretrained_moe(str(out / "model")).state_dict()
    for key, w in want.items():
        assert rel_err(got[key], w) <= TOL, key
