"""The ``moe-lab`` command line (Typer).

The app and its error handling live in :mod:`._app`; each area registers its commands from
its own module (``_train``, ...), imported here.

Commands are thin: they parse options and hand off to plain functions. User mistakes
(a bad job spec, a missing file, a bad value) print one clear message and exit with code 2,
never a traceback.
"""

from __future__ import annotations

import sys

import typer

from ..errors import MoEError

# command modules register themselves on `app`
from . import _analyze, _distributed, _interop, _serve, _sweep, _train  # noqa: F401,E402
from ._app import SetOption, app, fail, user_errors  # noqa: F401,E402


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
