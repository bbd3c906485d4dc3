"""One job runner: every training setting reaches the trainer through one TrainingConfig,
whatever the launcher (no kwargs whitelists to forget a field in)."""

import pytest
import torch
from helpers import tiny_config

from moe_lab import MoEModel, TrainingConfig
from moe_lab.jobs import load_job
from moe_lab.runner import PreparedData, job_task
from moe_lab.training import MoETrainer


def _every_field_changed() -> TrainingConfig:
    """A TrainingConfig whose every field differs from its default."""
    changed = dict(
        output_dir="/tmp/x", num_epochs=2, batch_size=4, learning_rate=2e-3, warmup_steps=3, mixed_precision=False,
        gradient_accumulation_steps=2, max_grad_norm=0.5, weight_decay=0.2, adam_beta1=0.8, adam_beta2=0.9,
        adam_eps=1e-7, min_lr_ratio=0.3, max_steps=7, eval_steps=5, save_steps=6, logging_steps=2, eval_samples=9,
        seed=3, device="cpu", save_total_limit=4, progress_bar=False, fast_paths=False, tensorboard=False,
        mlflow_tracking_uri=None, mlflow_experiment="other", lm_loss="chunked",
        activation_checkpointing="selective", activation_checkpointing_every=3, checkpoint_format="sharded",
    )
    defaults = TrainingConfig()
    # cuda_graphs=True needs fast_paths and a CUDA device (changed here): test_job_task_carries_cuda_graphs
    missing = sorted(set(TrainingConfig.model_fields) - set(changed) - {"cuda_graphs"})
    assert not missing, f"add the new TrainingConfig fields {missing} to this test"
    same = [k for k, v in changed.items() if getattr(defaults, k) == v and v is not None]
    assert not same, same
    return TrainingConfig(**changed)


def test_from_config_keeps_every_field():
    cfg = _every_field_changed()
    trainer = MoETrainer.from_config(MoEModel.from_config(tiny_config()), cfg)
    assert trainer.args == cfg


def test_train_kwargs_are_training_config_fields():
    """train() takes any TrainingConfig field, so a new field needs no new plumbing."""
    trainer = MoETrainer(MoEModel.from_config(tiny_config()), progress_bar=False, tensorboard=False)
    rows = [{"input_ids": list(range(10))} for _ in range(8)]
    trainer.train(rows, batch_size=4, max_steps=1, min_lr_ratio=0.25, adam_eps=1e-6, output_dir="/tmp/moe-lab-runner")
    assert trainer.args.min_lr_ratio == 0.25 and trainer.args.adam_eps == 1e-6
    with pytest.raises(Exception, match="unknown train\\(\\) option"):
        trainer.train(rows, batch_size=4, max_stepz=1)


def test_job_task_carries_the_whole_training_section(tmp_path):
    spec = load_job(None, ["training.adam_beta2=0.97", "training.min_lr_ratio=0.2", "training.fast_paths=false"])
    data = PreparedData(train=[{"input_ids": [1, 2, 3]}], eval=None, tokenizer=list(range(259)), stats={})
    task = job_task(spec, data, tmp_path)
    assert task.training == spec.training.replace(output_dir=str(tmp_path))


def test_job_task_carries_cuda_graphs(tmp_path):
    spec = load_job(None, ["training.cuda_graphs=true", "scaling.use_gpu=true", "scaling.ep=1"])
    data = PreparedData(train=[{"input_ids": [1, 2, 3]}], eval=None, tokenizer=list(range(259)), stats={})
    task = job_task(spec, data, tmp_path)
    assert task.training.cuda_graphs and task.training == spec.training.replace(output_dir=str(tmp_path))


def test_distributed_trainer_ships_the_whole_config(monkeypatch, tmp_path):
    """DistributedMoETrainer hands its workers one TrainTask whose training is trainer.args."""
    from moe_lab.orchestration import train as ray_train

    seen = {}

    def capture(task, scaling, optimizer=None):
        seen["task"], seen["scaling"] = task, scaling
        raise RuntimeError("captured")

    monkeypatch.setattr(ray_train, "fit_on_ray", capture)
    trainer = ray_train.DistributedMoETrainer(MoEModel.from_config(tiny_config()), world_size=2,
                                              expert_parallel_size=2, adam_beta1=0.7, logging_steps=3)
    rows = [{"input_ids": list(range(10))} for _ in range(8)]
    with pytest.raises(RuntimeError, match="captured"):
        trainer.train(rows, batch_size=4, max_steps=2, output_dir=str(tmp_path), warmup_steps=1, eval_samples=5)
    task = seen["task"]
    assert task.training == trainer.args.replace(output_dir=str(tmp_path.resolve()))
    assert task.training.adam_beta1 == 0.7 and task.training.eval_samples == 5 and task.expert_parallel_size == 2
    state = MoEModel.from_config(tiny_config()).state_dict()
    assert set(task.init_state) == set(state)
    assert all(torch.equal(task.init_state[k], v) for k, v in trainer.model.state_dict().items())
