"""Ray Train with expert parallelism on one local Ray cluster (gloo, CPU).

The central check: 2 workers with EP 2 compute exactly what one process computes on the
same global batch (per-step losses and final weights, fp32, dropout 0, rel. err <= 1e-5).
"""

import os
import signal
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import tiny_config

from moe_lab import DistributedError, MoEModel
from moe_lab.orchestration.cluster import init_ray, shutdown_ray
from moe_lab.orchestration.train import DistributedMoETrainer
from moe_lab.training import MoETrainer, load_pretrained_moe

STEPS = 4
TRAIN = dict(batch_size=8, learning_rate=1e-2, warmup_steps=1, eval_steps=1000, save_steps=2, max_steps=STEPS)
OPTS = dict(mixed_precision=False, progress_bar=False, tensorboard=False, seed=0, logging_steps=1)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    init_ray(num_cpus=4, object_store_memory=300 * 1024**2, log_to_driver=False)
    yield
    shutdown_ray()


def _model(**kw):
    torch.manual_seed(0)
    return MoEModel.from_config(tiny_config(**kw))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 97, (6 + i % 7,), generator=g).tolist()} for i in range(64)]
    return Dataset.from_list(rows)  # ragged: token-count normalisation matters


def _assert_close_models(a, b, rtol=1e-5):
    """Relative error per tensor, ||a - b|| / ||b|| (Adam turns fp32 summation-order noise in
    near-zero gradients into single-element differences, so elementwise rtol is too strict)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for n in sa:
        rel = float((sa[n].double() - sb[n].double()).norm() / sb[n].double().norm().clamp(min=1e-30))
        assert rel <= rtol, f"{n}: relative error {rel:.2e} > {rtol:.0e}"


def _assert_close_losses(a, b, rtol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=rtol)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    model = _model()
    res = MoETrainer(model, **OPTS).train(data, output_dir=str(out), **TRAIN)
    return model, res, out


@pytest.fixture(scope="module")
def ep2(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep2")
    trainer = DistributedMoETrainer(_model(), world_size=2, expert_parallel_size=2, **OPTS)
    res = trainer.train(data, output_dir=str(out), **TRAIN)
    return trainer.model, res, out


def test_ep2_equals_single_process(reference, ep2):
    ref_model, ref, _ = reference
    model, res, out = ep2
    assert res.global_step == ref.global_step == STEPS
    _assert_close_losses(res.history["loss"], ref.history["loss"])
    _assert_close_models(model, ref_model)
    # the checkpoint on disk is the full model
    assert (out / "model" / "model.safetensors").exists()
    loaded = load_pretrained_moe(out / "model")
    _assert_close_models(loaded, ref_model)


def test_checkpoint_saved_at_ep2_resumes_at_ep1(data, ep2, tmp_path):
    _, res, out = ep2
    model = _model()
    resumed = MoETrainer(model, **OPTS).train(data, output_dir=str(tmp_path),
                                               resume_from=str(out / "checkpoints" / "step-000002"), **TRAIN)
    assert resumed.history["step"] == [3, 4]
    _assert_close_losses(resumed.history["loss"], res.history["loss"][2:])
    _assert_close_models(model, ep2[0])


def test_checkpoint_saved_at_ep1_resumes_at_ep2(data, reference, tmp_path):
    ref_model, ref, out = reference
    trainer = DistributedMoETrainer(_model(), world_size=2, expert_parallel_size=2, **OPTS)
    res = trainer.train(data, output_dir=str(tmp_path), resume_from=str(out / "checkpoints" / "step-000002"), **TRAIN)
    assert res.history["step"] == [3, 4]
    _assert_close_losses(res.history["loss"], ref.history["loss"][2:])
    _assert_close_models(trainer.model, ref_model)


def test_killed_worker_resumes_from_latest_checkpoint(data, reference, tmp_path):
    marker = tmp_path / "killed"

    class KillRank1Once:
        """SIGKILL the rank-1 worker process at step 3, the first time only."""

        def __init__(self, marker_path):
            self.marker = str(marker_path)

        def __call__(self, record):
            import ray.train

            if record["step"] == 3 and ray.train.get_context().get_world_rank() == 1 and not os.path.exists(self.marker):
                Path(self.marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

    ref_model, ref, _ = reference
    trainer = DistributedMoETrainer(_model(), world_size=2, expert_parallel_size=2, max_failures=1,
                                    callbacks=[KillRank1Once(marker)], **OPTS)
    res = trainer.train(data, output_dir=str(tmp_path / "run"), **TRAIN)
    assert marker.exists(), "the worker was never killed"
    assert res.global_step == STEPS
    _assert_close_losses(res.history["loss"][-2:], ref.history["loss"][-2:])
    _assert_close_models(trainer.model, ref_model)
    ckpts = tmp_path / "run" / "checkpoints"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")], "half-written checkpoint left behind"
    load_pretrained_moe(ckpts / "step-000002")


@pytest.mark.slow
def test_ep2_dp2_four_workers_equals_single_process(data, reference, tmp_path):
    ref_model, ref, _ = reference
    trainer = DistributedMoETrainer(_model(), world_size=4, expert_parallel_size=2,
                                    resources_per_worker={"CPU": 0.5}, **OPTS)
    res = trainer.train(data, output_dir=str(tmp_path), **TRAIN)
    _assert_close_losses(res.history["loss"], ref.history["loss"])
    _assert_close_models(trainer.model, ref_model)


def test_streaming_with_ray_data(tmp_path):
    from moe_lab.data import ByteTokenizer, save_tokenizer
    from moe_lab.jobs import load_job
    from moe_lab.orchestration.data import streaming_dataset

    spec = load_job(None, ["data.corpus_size_bytes=80000", "data.max_length=32"])
    save_tokenizer(ByteTokenizer(), tmp_path / "tok")
    ds = streaming_dataset(spec, str(tmp_path / "tok"))
    model = _model(vocab_size=259)
    trainer = DistributedMoETrainer(model, world_size=2, tokenizer=ByteTokenizer(), **OPTS)
    res = trainer.train(ds, output_dir=str(tmp_path / "out"), batch_size=8, learning_rate=1e-2, warmup_steps=1,
                        max_steps=3, save_steps=100)
    assert res.global_step == 3 and all(x == x for x in res.history["loss"])
    assert res.tokens_per_second > 0


def test_unsupported_parallel_sizes_fail_clearly(data, tmp_path):
    with pytest.raises(DistributedError, match=r"model_parallel_size \(2\) > 1 is not supported yet"):
        DistributedMoETrainer(_model(), world_size=2, model_parallel_size=2)
    with pytest.raises(DistributedError, match=r"pipeline_parallel_size \(2\) > 1 is not supported yet"):
        DistributedMoETrainer(_model(), world_size=2, pipeline_parallel_size=2)
    with pytest.raises(DistributedError, match=r"world_size \(3\) must be divisible by expert_parallel_size \(2\)"):
        DistributedMoETrainer(_model(), world_size=3, expert_parallel_size=2)
    with pytest.raises(DistributedError, match=r"num_experts \(4\) must be divisible by expert_parallel_size \(8\)"):
        DistributedMoETrainer(_model(), world_size=8, expert_parallel_size=8)
    with pytest.raises(DistributedError, match=r"batch_size \(5\) must be divisible"):
        DistributedMoETrainer(_model(), world_size=2, **OPTS).train(data, output_dir=str(tmp_path), batch_size=5)
