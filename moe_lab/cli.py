"""The ``moe-lab`` command line (Typer).

Commands are thin: they parse options and hand off to plain functions. User mistakes
(a bad job spec, a missing file, a bad value) print one clear message and exit with code 2,
never a traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from .errors import MoEError
from .version import __version__

app = typer.Typer(
    name="moe-lab",
    help="Open MoE Trainer Lab: train, sweep, analyse and serve Mixture-of-Experts language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"moe-lab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Open MoE Trainer Lab."""


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print a user-facing error and return the Exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def main() -> None:
    """Console-script entry point: MoEError and bad files become a message and exit code 2."""
    try:
        app(standalone_mode=True)
    except MoEError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
