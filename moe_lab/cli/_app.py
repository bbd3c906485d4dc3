"""The Typer app of ``moe-lab``, its error handling and shared options.

Each area's module (``_train``, ...) registers its commands on :data:`app`;
:mod:`moe_lab.cli` imports them all.

Commands are thin: they parse options and hand off to plain functions. User mistakes
(a bad job spec, a missing file, a bad value) print one clear message and exit with code 2,
never a traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Annotated, Any, Callable, List, Optional

import typer

from ..errors import MoEError
from ..version import __version__

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


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user mistakes (MoEError, missing files) into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MoEError as exc:
            raise fail(str(exc)) from None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise fail(str(exc)) from None

    return wrapper


SetOption = Annotated[
    Optional[List[str]],
    typer.Option("--set", help="Override a job field: section.key=value (repeatable), e.g. --set training.max_steps=50"),
]
