"""Session fixtures: a real S3 API (moto's server on 127.0.0.1), a local Ray cluster and Prefect's test harness.

Each costs seconds to start, so each is started once per session and only by the tests that ask for it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from waiting import CEILING_S


# Every process the tests start (Ray's raylet and workers, `ray start` nodes, flow subprocesses) inherits these,
# so Ray's auth mode and the AWS client settings are the same everywhere.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback; every s3fs/boto3 client in this process (and its children) talks to it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket per test, so tests never see each other's objects."""
    import boto3

    name = f"fp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A real single-node Ray instance with 2 CPUs; tests connect actors to it through actors.cluster."""
    from flashportrait.actors.cluster import RayClusterSettings, connect, shutdown

    info = connect(RayClusterSettings(num_cpus=2, object_store_memory=100 << 20))
    yield info.address
    shutdown()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's own harness: a temporary database and API server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=int(CEILING_S)):  # a loaded CI machine starts it slowly
        yield
