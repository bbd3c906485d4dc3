"""``moe-lab analyze``: the routing report of a checkpoint (PNGs + one self-contained HTML)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import app, user_errors


@app.command()
@user_errors
def analyze(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (config.json + model.safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.html, report.json and the PNGs.")],
    data: Annotated[
        Optional[Path],
        typer.Option("--data", help="Text/jsonl/parquet/csv file or directory with a label column; "
                                    "default: the built-in corpus's eval split."),
    ] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="Sequences to route (evenly spaced).")] = 512,
    label_column: Annotated[str, typer.Option("--label-column", help="Column with each row's label.")] = "domain",
    text_column: Annotated[str, typer.Option("--text-column", help="Text column of --data.")] = "text",
    max_length: Annotated[Optional[int], typer.Option("--max-length", min=1, help="Tokens per sequence (default 128).")] = None,
    metrics: Annotated[
        Optional[Path], typer.Option("--metrics", help="metrics.jsonl for the training curves (default: found next to CHECKPOINT).")
    ] = None,
) -> None:
    """Analyse how a checkpoint routes tokens: which experts handle which domains, load per expert
    and layer, dead or overloaded experts, and training curves. Writes OUT/report.html."""
    from ..analytics.report import write_report

    if metrics is not None and not metrics.is_file():
        raise FileNotFoundError(f"--metrics file not found: {metrics}")
    path = write_report(
        checkpoint, out, data=data, num_samples=num_samples, metrics_path=metrics,
        label_column=label_column, text_column=text_column, max_length=max_length,
    )
    typer.echo(f"report written to {path}")
