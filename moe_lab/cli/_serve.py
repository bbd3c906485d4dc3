"""``moe-lab serve``: the OpenAI-compatible completions server on Ray Serve.

    moe-lab serve outputs/demo/model                          # http://127.0.0.1:8000/v1, Ctrl-C stops it
    moe-lab serve outputs/demo/model --port 8100 --replicas 2 --api-key-env MOE_LAB_API_KEY
    moe-lab serve --config jobs/serve.yaml --set max_batch_size=16 --set request_timeout_s=30

The server's settings are :class:`~moe_lab.serving.ServeArgs`: ``--config FILE`` is a YAML
mapping of its fields (``jobs/serve.yaml`` lists them all), the common ones have flags, and
any field can be set with ``--set key=value``. Flags and ``--set`` override the file (one
field given by both a flag and ``--set`` is an error). A Ray Serve config file (one with
``applications:``, such as the ``serveConfigV2`` in ``cluster/rayservice.yaml``) is for
Ray's own ``serve run`` / ``serve deploy`` and KubeRay, not for ``--config``.

Everything is validated before Ray starts, so a typo costs no cluster start-up: errors name
the file, flag or key and exit with code 2. The checkpoint too is opened here as the
replicas will open it, without reading tensor data
(:func:`~moe_lab.serving.preflight.check_servable_checkpoint`): truncated weights, a corrupt
safetensors header, weights that do not match ``config.json``, an invalid or non-JSON
``config.json`` or tokenizer files that do not load give one line and exit code 2, as
``moe-lab evaluate`` does. A replica that fails at start-up anyway (no such device, out of
memory) is reported by its root cause, on one line, with exit code 2.

The command blocks until Ctrl-C (SIGINT) or SIGTERM, then deletes the app, stops Serve and
the local Ray cluster, and exits 0.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..errors import ConfigError
from ..serving.args import load_serve_args, resolve_checkpoint, serve_args_help
from ._app import app, user_errors


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); pick another port") from None


_EPILOG = "ServeArgs fields (for --config FILE and --set key=value):\n\n" + serve_args_help()


@app.command(epilog=_EPILOG)
@user_errors
def serve(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint directory to serve (default: `checkpoint:` in --config).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of ServeArgs fields, e.g. jobs/serve.yaml (not a Ray Serve config file).")] = None,
    set_: Annotated[Optional[List[str]], typer.Option("--set", help="Set a ServeArgs field: key=value (repeatable), e.g. --set max_batch_size=16.")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 exposes the server to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    replicas: Annotated[Optional[int], typer.Option(help="Model replicas (num_replicas; default 1).")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(help="Env var holding the API key; requests then need 'Authorization: Bearer <key>'.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N (default auto).")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="The model id clients send (default moe-lab).")] = None,
    address: Annotated[Optional[str], typer.Option(help="Join this Ray cluster instead of starting a local one.")] = None,
) -> None:
    """Serve a checkpoint with an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models, /v1/stats, /metrics, /healthz).

    SIGTERM drains (requests in flight finish, new ones get 503), then stops; Ctrl-C stops at once.

    Settings (ServeArgs, listed below): the defaults, then --config FILE (a YAML mapping of fields, like jobs/serve.yaml), then the flags and --set key=value.

    A Ray Serve config file (with applications:) is for Ray's `serve run` / `serve deploy`, not for --config.
    """
    if checkpoint is None and config is None:
        raise ConfigError("give a CHECKPOINT directory (or a --config FILE that sets checkpoint)")
    flags = {
        "checkpoint": ("CHECKPOINT", None if checkpoint is None else str(checkpoint)),
        "num_replicas": ("--replicas", replicas),
        "api_key_env": ("--api-key-env", api_key_env),
        "device": ("--device", device),
        "model_name": ("--model-name", model_name),
    }
    args = resolve_checkpoint(load_serve_args(config, flags, set_ or []))  # the checkpoint too: no Ray yet
    if args.api_key_env and not os.environ.get(args.api_key_env):
        where = "--api-key-env" if api_key_env else "api_key_env"
        raise ConfigError(f"{where} {args.api_key_env}: the environment variable {args.api_key_env} is not set")
    _check_port_free(host, port)

    from ..orchestration import serve as srv  # Ray from here on

    try:
        url = srv.start_server(args, host=host, port=port, address=address)
        typer.echo(srv.startup_residency())
        typer.echo(f"serving at {url}/v1 (completions, chat/completions, models, stats; metrics at {url}/metrics, "
                   f"health at {url}/healthz). Ctrl-C stops; SIGTERM drains first.")
        sig = srv.block_until_signal()
        if sig == "SIGTERM":  # let the requests in flight finish; new ones get 503
            typer.echo("SIGTERM: draining (new requests get 503) ...")
            typer.echo(f"drained in {srv.drain_server(args):.1f}s")
        typer.echo(f"{sig}: shutting down ...")
    finally:
        srv.shutdown_server()
    typer.echo("stopped")
