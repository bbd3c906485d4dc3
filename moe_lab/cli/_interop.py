"""``moe-lab export`` (to a transformers Mixtral, Qwen2-MoE or Qwen3-MoE directory) and
``moe-lab upcycle`` (dense -> MoE)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import app, fail, user_errors


@app.command()
@user_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="moe_lab checkpoint directory (or a job output directory with model/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    format: Annotated[str, typer.Option("--format", "-f", help="Target format: hf-mixtral, hf-qwen2-moe (shared expert + gate) or hf-qwen3-moe (QK-norm).")] = "hf-mixtral",
    dtype: Annotated[Optional[str], typer.Option(help="Weights dtype: float32, bfloat16 or float16 (default: as saved).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")] = False,
) -> None:
    """Export a checkpoint for transformers (MixtralForCausalLM, Qwen2MoeForCausalLM or Qwen3MoeForCausalLM), with its tokenizer.

    A model the format cannot express (expert-choice or switch routing, capacity dropping, sigmoid or group-limited routing, FFN experts, router bias; for Mixtral also dense layers, unnormalised top-k weights, shared experts, QK-norm) is refused, listing why.
    """
    from ..interop._formats import EXPORTERS, FORMATS

    if format not in EXPORTERS:
        raise fail(f"unknown --format {format!r}; supported formats: {', '.join(FORMATS)}")
    path = EXPORTERS[format](checkpoint, out, dtype=dtype, overwrite=overwrite)
    typer.echo(f"wrote {format} checkpoint to {path}")
    typer.echo(f"load it with: transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})")


@app.command()
@user_errors
def upcycle(
    source: Annotated[Path, typer.Argument(help="Dense model: a moe_lab checkpoint with dense layers, or a transformers Llama/Mistral directory.")],
    num_experts: Annotated[int, typer.Option("--num-experts", help="Experts per MoE layer.")],
    experts_per_token: Annotated[int, typer.Option("--experts-per-token", help="Top-k experts per token.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="moe_lab checkpoint directory to write.")],
    router_init_std: Annotated[Optional[float], typer.Option(help="Std of the new routers' init (default: initializer_range).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the router init.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")] = False,
) -> None:
    """Turn a dense model into an MoE whose experts start as copies of the dense MLP (same outputs)."""
    from ..checkpoint import load_pretrained_moe
    from ..interop.upcycle import upcycle_checkpoint

    path = upcycle_checkpoint(source, out, num_experts, experts_per_token, router_init_std=router_init_std,
                              seed=seed, overwrite=overwrite)
    model = load_pretrained_moe(path)
    typer.echo(
        f"wrote an MoE checkpoint to {path}: {model.config.num_layers} MoE layers x {num_experts} experts "
        f"(top-{experts_per_token}), {model.num_parameters():,} parameters "
        f"({model.num_parameters(active_only=True):,} active)"
    )
