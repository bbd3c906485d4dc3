"""``moe-lab serve``: the OpenAI-compatible completions server on Ray Serve.

    moe-lab serve outputs/demo/model                          # http://127.0.0.1:8000/v1, Ctrl-C stops it
    moe-lab serve outputs/demo/model --port 8100 --replicas 2 --api-key-env MOE_LAB_API_KEY
    moe-lab serve --config jobs/serve.yaml                    # a Serve config file (host set in the file)

Everything is validated before Ray starts, so a typo costs no cluster start-up. The command
blocks until Ctrl-C (SIGINT) or SIGTERM, then deletes the app, stops Serve and the local
Ray cluster, and exits 0.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ConfigError
from . import app, user_errors

#: ServeArgs field -> the CLI flag that sets it (where the names differ)
_FLAGS = {"num_replicas": "replicas", "num_cpus_per_replica": "num-cpus", "checkpoint": "checkpoint"}


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); pick another port") from None


@app.command()
@user_errors
def serve(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint directory to serve (omit with --config).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="A Serve config file (sets host, port and apps).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 exposes the server to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    replicas: Annotated[int, typer.Option(help="Model replicas.")] = 1,
    api_key_env: Annotated[Optional[str], typer.Option(help="Env var holding the API key; requests then need 'Authorization: Bearer <key>'.")] = None,
    model_name: Annotated[str, typer.Option(help="The model id clients send.")] = "moe-lab",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    max_experts_in_memory: Annotated[int, typer.Option(help="Experts per MoE layer on the device.")] = 4,
    expert_cache_size: Annotated[int, typer.Option(help="Host copies of experts per MoE layer.")] = 8,
    max_batch_size: Annotated[int, typer.Option(help="Requests batched into one decode.")] = 8,
    batch_wait_timeout_s: Annotated[float, typer.Option(help="How long a batch waits to fill (0: batch what queued meanwhile).")] = 0.0,
    max_ongoing_requests: Annotated[int, typer.Option(help="Requests in flight per replica.")] = 64,
    max_queued_requests: Annotated[int, typer.Option(help="Requests waiting beyond that before 503s (-1: unbounded).")] = 128,
    request_timeout_s: Annotated[float, typer.Option(help="Per-request timeout; then 504.")] = 60.0,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 256,
    num_cpus: Annotated[float, typer.Option(help="Ray CPUs per replica.")] = 1.0,
    address: Annotated[Optional[str], typer.Option(help="Join this Ray cluster instead of starting a local one.")] = None,
) -> None:
    """Serve a checkpoint with an OpenAI-compatible API (/v1/completions, /v1/models, /v1/stats, /healthz)."""
    from ..orchestration import serve as srv

    if (checkpoint is None) == (config is None):
        raise ConfigError("give either a CHECKPOINT directory or --config FILE (not both)")
    if config is not None:
        cfg = srv.load_serve_config(config)  # validated before Ray starts
        _check_port_free(cfg.http_options.host, cfg.http_options.port)
        start = lambda: srv.start_from_config(config, address=address)  # noqa: E731
    else:
        try:
            args = srv.ServeArgs(
                checkpoint=str(checkpoint), model_name=model_name, device=device,
                max_experts_in_memory=max_experts_in_memory, expert_cache_size=expert_cache_size,
                max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s, max_ongoing_requests=max_ongoing_requests,
                max_queued_requests=max_queued_requests, request_timeout_s=request_timeout_s,
                max_tokens_limit=max_tokens_limit, api_key_env=api_key_env, num_replicas=replicas,
                num_cpus_per_replica=num_cpus,
            )
        except srv.ValidationError as exc:
            field, msg = srv._validation_message(exc)
            flag = _FLAGS.get(field or "", (field or "args").replace("_", "-"))
            raise ConfigError(f"--{flag}: {msg.split(': ', 1)[-1]}") from None
        srv.app_builder(args)  # checks the checkpoint directory
        if api_key_env and not os.environ.get(api_key_env):
            raise ConfigError(f"--api-key-env {api_key_env}: the environment variable {api_key_env} is not set")
        _check_port_free(host, port)
        start = lambda: srv.start_server(args, host=host, port=port, address=address)  # noqa: E731

    try:
        url = start()
        typer.echo(f"serving at {url}/v1 (completions, models, stats; health at {url}/healthz). Ctrl-C stops.")
        sig = srv.block_until_signal()
        typer.echo(f"{sig}: shutting down ...")
    finally:
        srv.shutdown_server()
    typer.echo("stopped")
