"""``moe-lab train``, ``evaluate`` and ``generate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ._app import SetOption, app, user_errors


@app.command()
@user_errors
def train(
    job: Annotated[Optional[Path], typer.Argument(help="Job spec YAML (default: the built-in tiny job on the built-in corpus).")] = None,
    set_: SetOption = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Where outputs go (default: training.output_dir).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Resume the job recorded in the output directory (its job.yaml) from its newest checkpoint; --set may change only logging, eval, checkpoint cadence, max_steps and scaling.")] = False,
    address: Annotated[Optional[str], typer.Option("--address", help="Join this Ray cluster (e.g. auto, ray://host:10001); default: an embedded local cluster.")] = None,
) -> None:
    """Train a job on Ray Train workers. With no JOB, train the built-in default job (the main job of `make demo`).

    The job's `scaling` section sets the workers and the layout: --set scaling.num_workers=2 --set scaling.ep=2
    (expert parallelism), --set scaling.dp_shard=2 (FSDP2), --set scaling.tp=2 (tensor parallelism; see
    jobs/train_tp.yaml and jobs/train_fsdp_ep.yaml).
    """
    from ..jobs import load_job, resume_job
    from ..orchestration.cluster import shutdown_ray
    from ..orchestration.train import run_job_ray
    from ..runner import format_summary

    if resume:  # the job recorded in the output directory; only RESUME_ALLOWED fields may change
        out = output_dir or Path(load_job(job).training.output_dir)
        spec = resume_job(out, set_ or [], job)
        output_dir = out
    else:
        spec = load_job(job, set_ or [])
    try:
        summary = run_job_ray(spec, str(output_dir) if output_dir else None, resume=resume, address=address)
    finally:
        shutdown_ray()
    typer.echo(format_summary(summary))


def _load_checkpoint_and_tokenizer(path: Path):
    """The model (checked against its files before anything is allocated) and its tokenizer."""
    from ..checkpoint import Checkpoint

    ckpt = Checkpoint.open(path, dropout=0.0)
    return ckpt.build_model(), ckpt.tokenizer()


@app.command()
@user_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (config.json + model.safetensors).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Text/jsonl/parquet/csv file; default: the built-in corpus's eval split.")] = None,
    text_column: Annotated[str, typer.Option(help="Text column of --data.")] = "text",
    max_length: Annotated[int, typer.Option(help="Block length in tokens.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 16,
    num_samples: Annotated[Optional[int], typer.Option(help="Evaluate on the first N blocks only.")] = None,
) -> None:
    """Evaluate a checkpoint: loss, perplexity and routing statistics (JSON on stdout)."""
    from ..data import (
        build_corpus,
        load_text_dataset,
        prepare_moe_dataset,
        train_eval_split,
    )
    from ..training import MoETrainer

    model, tok = _load_checkpoint_and_tokenizer(checkpoint)
    if data is None:
        _, raw = train_eval_split(build_corpus(), eval_fraction=0.05, seed=0)
    else:
        raw = load_text_dataset(str(data), text_column=text_column)
    ds = prepare_moe_dataset(raw, tok, max_length=min(max_length, model.config.max_position_embeddings),
                             text_column=text_column)
    trainer = MoETrainer(model, tokenizer=tok, mixed_precision=False, progress_bar=False)
    result = trainer.evaluate(ds, batch_size=batch_size, num_samples=num_samples)
    typer.echo(json.dumps(result.to_dict(), indent=2))


@app.command()
@user_errors
def generate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = 0.9,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the k most likely tokens.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[Optional[List[str]], typer.Option("--stop", help="Stop before this text (repeatable).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cpu, cuda or cuda:N.")] = "auto",
    max_experts_in_memory: Annotated[str, typer.Option(
        help="Experts per MoE layer kept on the device: a number, or auto (all of them when the model fits in "
             "device memory; the residency chosen is logged).")] = "auto",
    expert_cache_size: Annotated[int, typer.Option(help="Host copies of experts per MoE layer.")] = 8,
    show_stats: Annotated[bool, typer.Option("--show-stats", help="Print the expert residency to stderr at start and "
                                             "expert-cache statistics at the end.")] = False,
) -> None:
    """Generate a continuation of --prompt with OptimizedMoEModel (KV cache + expert cache), streaming to the terminal."""
    from ..errors import InputError
    from ..inference import CompletionRequest, OptimizedMoEModel
    from ..inference.generate import validate_sampling

    validate_sampling(temperature, top_p, top_k, max_new_tokens)  # before loading anything
    if not prompt:
        raise InputError("--prompt is empty")
    resident = max_experts_in_memory.strip().lower()
    if resident != "auto":
        try:
            resident = int(resident)
        except ValueError:
            raise InputError(f"--max-experts-in-memory must be a positive integer or auto, got {max_experts_in_memory!r}") from None
        if resident < 1:
            raise InputError(f"--max-experts-in-memory must be a positive integer or auto, got {max_experts_in_memory!r}")
    model = OptimizedMoEModel(checkpoint, device_map=device, max_experts_in_memory=resident,
                              expert_cache_size=expert_cache_size)
    if show_stats:  # the residency is also logged (moe_lab.inference.optimized, INFO) when chosen by auto
        cache = model.expert_loader.caches[0]
        typer.echo(f"experts resident per MoE layer: {cache.cache_size}/{cache.num_experts}"
                   f"{' (auto)' if resident == 'auto' else ''}; device {model.device}", err=True)
    request = CompletionRequest(prompt, max_new_tokens, temperature, top_p, top_k, list(stop or []), seed)
    typer.echo(prompt, nl=False)
    for chunk in model.stream(request):
        typer.echo(chunk.text, nl=chunk.finish_reason is not None)
    if show_stats:
        st = model.stats()
        typer.echo(
            f"expert cache: hit rate {st['hit_rate']:.3f} ({st['hits']} hits, {st['misses']} misses, "
            f"{st['prefetches']} prefetches), {st['bytes_loaded'] / 2**20:.1f} MiB loaded",
            err=True,
        )


