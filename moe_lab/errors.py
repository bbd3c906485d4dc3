"""Exceptions raised by moe_lab.

Every error a user can cause is a subclass of :class:`MoEError`, and its message names the
bad value and what was expected. Configuration and input errors are also ``ValueError`` so
that generic callers can catch them the usual way.
"""

from __future__ import annotations


class MoEError(Exception):
    """Base class of every moe_lab error."""


class ConfigError(MoEError, ValueError):
    """A configuration value (model, training, job spec) is invalid."""


class InputError(MoEError, ValueError):
    """A tensor or dataset handed to moe_lab has the wrong shape, dtype or content."""


class RouterError(MoEError, ValueError):
    """A router was built or called with invalid arguments."""


class ExpertError(MoEError, ValueError):
    """An expert was built or called with invalid arguments."""


class DistributedError(MoEError):
    """Invalid parallel sizes, process groups or a failed distributed run."""


class CheckpointError(MoEError):
    """A checkpoint is missing, truncated or does not match the model."""
