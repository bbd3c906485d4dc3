"""Serving without Ray: the OpenAI-style protocol, the server's settings and its metrics.

- :mod:`.protocol`: request parsing and validation, response objects, SSE framing and
  OpenAI-style errors for ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``
  and ``/v1/stats``;
- :mod:`.args`: :class:`ServeArgs`, the server's settings, and :func:`load_serve_args`
  (a YAML file, flags and ``--set key=value``, as ``moe-lab serve`` takes them);
- :mod:`.metrics`: :class:`ServeMetrics`, a replica's Prometheus metrics (``/metrics``);
- :mod:`.preflight`: the driver's check of a checkpoint before Ray starts;
- :mod:`.proxy_guard`: what Serve's HTTP proxy checks before routing (the key on
  ``/-/routes``, a declared body over ``max_body_bytes``).

The Ray Serve deployment that puts them together is :mod:`moe_lab.orchestration.serve`.
"""

from .args import ServeArgs, load_serve_args, resolve_checkpoint, serve_args_from
from .protocol import APIError, ChatBody, CompletionBody, parse_completion_request

__all__ = [
    "APIError",
    "ChatBody",
    "CompletionBody",
    "ServeArgs",
    "load_serve_args",
    "parse_completion_request",
    "resolve_checkpoint",
    "serve_args_from",
]
