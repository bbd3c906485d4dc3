"""Starting or joining a Ray cluster, sized for small machines.

    init_ray()                       # an embedded local cluster: dashboard on 127.0.0.1,
                                     # usage stats off, quiet logs, object store sized for RAM
    init_ray(address="auto")         # join a running cluster (or ray://host:10001)

Local clusters declare at least 4 logical CPUs so that Ray Train workers at fractional CPUs
and Ray Data tasks can run side by side on a 2-core laptop without starving each other.

Loopback: an embedded cluster's dashboard and Jobs API listen on 127.0.0.1, and none of
Ray's unauthenticated Prometheus ``/metrics`` servers listens anywhere: the metrics export
of the dashboard agent is off (``RAY_enable_metrics_collection=0``; set it to 1 to turn it
back on), and the dashboard's and autoscaler's own metrics servers, which Ray 2.60 binds on
every interface (it turns a 127.0.0.1 node address into the machine's address), find their
ports (``DASHBOARD_METRIC_PORT``, ``AUTOSCALER_METRIC_PORT``) held on 127.0.0.1 by this
process and do not start. Set those variables yourself to get them back. What Ray 2.60
still binds on every interface: the gRPC servers of the GCS, the raylet, the dashboard agent
and each worker, and the runtime-env agent on the machine's address. They speak gRPC only
and, with token authentication (``RAY_AUTH_MODE=token``, the default for local clusters),
refuse callers without the cluster's token; ``tests/orchestration/test_cluster_sockets.py``
lists them and checks that none of them answers HTTP.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Dict, List, Optional

from ..errors import DistributedError

logger = logging.getLogger(__name__)

#: logical CPUs a local cluster declares at least (Ray Data needs room next to the workers)
MIN_LOCAL_CPUS = 4


#: loopback sockets holding the ports of Ray's dashboard/autoscaler metrics servers (see above)
_HELD_METRICS_PORTS: List[socket.socket] = []


def _hold_metrics_ports() -> None:
    """Point Ray's dashboard and autoscaler metrics servers at ports this process holds on
    127.0.0.1, so that their bind to 0.0.0.0 fails and no unauthenticated /metrics listens."""
    for env in ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT"):
        if env in os.environ and not _HELD_METRICS_PORTS:
            continue  # the user chose a port: leave it
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        os.environ[env] = str(s.getsockname()[1])
        _HELD_METRICS_PORTS.append(s)


def _release_metrics_ports() -> None:
    while _HELD_METRICS_PORTS:
        _HELD_METRICS_PORTS.pop().close()


def local_cpu_count() -> int:
    return max(MIN_LOCAL_CPUS, os.cpu_count() or 1)


def quiet_ray_environment() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_enable_metrics_collection", "0")  # no unauthenticated /metrics on 0.0.0.0
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def init_ray(
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    num_gpus: Optional[int] = None,
    object_store_memory: Optional[int] = None,
    log_to_driver: bool = True,
    runtime_env: Optional[Dict[str, Any]] = None,
    dashboard_port: Optional[int] = None,
    include_dashboard: bool = True,
) -> Any:
    """Connect to ``address`` or start an embedded local cluster; a no-op if Ray is up.

    ``dashboard_port``: for a local cluster (default: Ray's 8265, or the next free port);
    ``include_dashboard=False`` starts a local cluster without the dashboard (tests).
    Returns the ``ray`` module.
    """
    quiet_ray_environment()
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        return ray
    kwargs: Dict[str, Any] = dict(log_to_driver=log_to_driver, logging_level=logging.WARNING)
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    address = address or os.environ.get("RAY_ADDRESS")  # set inside Ray Jobs: join that cluster
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise DistributedError(f"could not connect to the Ray cluster at {address!r}: {exc}") from None
    else:
        if not _HELD_METRICS_PORTS and os.environ.get("RAY_enable_metrics_collection") == "0":
            _hold_metrics_ports()
        if object_store_memory is None:
            try:
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                object_store_memory = int(min(2 * 1024**3, max(256 * 1024**2, total * 0.1)))
            except (ValueError, OSError):
                object_store_memory = 512 * 1024**2
        ray.init(
            "local",
            num_cpus=num_cpus or local_cpu_count(),
            num_gpus=num_gpus,
            object_store_memory=object_store_memory,
            include_dashboard=include_dashboard,
            dashboard_host="127.0.0.1",
            **({"dashboard_port": dashboard_port} if dashboard_port else {}),
            **kwargs,
        )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    return ray


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _release_metrics_ports()
