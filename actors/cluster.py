"""Connect to a Ray cluster, or start a local one: the only place this project calls ``ray.init``.

Without an address (no ``--ray-address``, no ``RAY_ADDRESS``) a **private** local cluster is started with
``ray.init(address="local")``: a plain ``ray.init()`` first looks for the last cluster ``ray start`` left in Ray's
temp folder (``ray_current_cluster``), and a head killed without ``ray stop`` leaves that file behind, so the run
tried to join a dead cluster ("When connecting to an existing cluster, object_store_memory must not be provided").

Ray ≥ 2.59 turns token authentication on for clusters started by ``ray.init()`` unless ``RAY_AUTH_MODE`` says
otherwise, and a node or driver whose auth mode differs from the head's fails to join after a long timeout. So a
local cluster started here exports one explicit mode (``disabled`` on loopback unless the user set one) before
Ray starts, and every process Ray spawns inherits it.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import ray


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayClusterSettings:
    address: str | None = None  # None: start a local cluster; "auto" or "host:port": connect to a running one
    num_cpus: int | None = None  # local cluster only
    num_gpus: int | None = None  # local cluster only
    object_store_memory: int | None = 200 << 20  # local cluster only; Ray's minimum is 75 MiB
    namespace: str = "flashportrait"
    # ray.init(address=…) to a dead head retries for minutes; a plain TCP connect answers in this bound instead.
    connect_timeout_s: float = 10.0


@dataclass(frozen=True)
class ClusterInfo:
    address: str
    started_here: bool
    cpus: float
    gpus: float
    nodes: int


def connect(settings: RayClusterSettings) -> ClusterInfo:
    """Join ``settings.address`` (or ``RAY_ADDRESS``), else start a local single-node cluster."""
    address = settings.address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        if address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(
                address="local",  # never the cluster a stale ray_current_cluster file names
                num_cpus=settings.num_cpus,
                num_gpus=settings.num_gpus,
                object_store_memory=settings.object_store_memory,
                include_dashboard=False,
                namespace=settings.namespace,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            _check_reachable(address, settings.connect_timeout_s)
            try:
                ray.init(address=address, namespace=settings.namespace, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError) as exc:
                raise ConnectionError(
                    f"cannot connect to the Ray cluster at {address!r}: {exc}. Check the address (ray status on the "
                    "head node prints it) and that RAY_AUTH_MODE matches the cluster's"
                ) from exc
    context = ray.get_runtime_context()
    resources = ray.cluster_resources()
    info = ClusterInfo(
        address=context.gcs_address,
        started_here=address is None,
        cpus=float(resources.get("CPU", 0.0)),
        gpus=float(resources.get("GPU", 0.0)),
        nodes=len([n for n in ray.nodes() if n.get("Alive")]),
    )
    how = "started a private local cluster" if info.started_here else f"joined the cluster at {address}"
    logger.info("Ray: %s (%s): %d node(s), %.0f CPU, %.0f GPU", how, info.address, info.nodes, info.cpus, info.gpus)
    return info


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast (ConnectionError → exit 2) when the Ray head's GCS port does not accept connections."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except OSError as exc:
        raise ConnectionError(
            f"the Ray head at {address} is unreachable within {timeout_s:g} s ({exc}); start it with "
            "`ray start --head --port PORT` or fix --ray-address / RAY_ADDRESS"
        ) from exc


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
