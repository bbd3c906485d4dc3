"""torchrun, the launcher without Ray: two gloo ranks with EP 2 train the same job to the
same weights as one process (moe_lab.launch and moe_lab.runner.run_job share run_task)."""

import os

import torch
import torch.multiprocessing as mp
from helpers import free_port

from moe_lab import load_pretrained_moe
from moe_lab.jobs import load_job
from moe_lab.runner import run_job

JOB = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2", "model.expert_hidden_size=32",
    "model.num_experts=4", "model.max_position_embeddings=32", "data.corpus_size_bytes=20000", "data.max_length=32",
    "data.num_proc=1", "training.max_steps=3", "training.batch_size=4", "training.eval_steps=100",
    "training.save_steps=2", "training.logging_steps=1", "training.eval_samples=8", "training.progress_bar=false",
    "training.tensorboard=false", "training.mixed_precision=false", "analyze=false",
]


def _rank(rank, port, out, errors):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        from moe_lab.launch import main

        assert main([*sum((["--set", s] for s in JOB + ["scaling.expert_parallel_size=2"]), []), "-o", out]) == 0
    except Exception:  # pragma: no cover - reported to the parent
        import traceback

        errors.put(traceback.format_exc())
        raise


def test_torchrun_ep2_equals_one_process(tmp_path):
    port = free_port()
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(port, str(tmp_path / "ep2"), errors), nprocs=2, join=True, start_method="spawn")
    assert errors.empty(), errors.get()
    summary = run_job(load_job(None, JOB), output_dir=str(tmp_path / "one"))
    assert summary["global_step"] == 3
    a, b = load_pretrained_moe(tmp_path / "ep2" / "model"), load_pretrained_moe(tmp_path / "one" / "model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        rel = float((x - y).norm() / y.norm().clamp(min=1e-30))
        assert rel <= 1e-5, f"{name}: relative error {rel:.1e}"
    assert (tmp_path / "ep2" / "summary.json").is_file() and (tmp_path / "ep2" / "checkpoints" / "step-000002").is_dir()
