"""An unreachable Ray head stops the run at once with exit code 2, naming the address."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with-block ends


def test_unreachable_head_exits_2_quickly(tmp_path):
    port = closed_port()
    cli = Path(sys.executable).parent / "flashportrait"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(tmp_path / "prefect")}
    started = time.monotonic()
    proc = subprocess.run(
        [
            str(cli),
            "render",
            "--reference",
            "examples/reference.png",
            "--driving",
            "examples/driving_short.mp4",
            "--out",
            str(tmp_path / "x.mp4"),
            "--workers",
            "2",
            "--ray-address",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert f"the Ray head at 127.0.0.1:{port} is unreachable" in proc.stderr
    assert elapsed < 60  # ray.init alone would retry for minutes
    assert not (tmp_path / "x.mp4").exists()


def test_stale_cluster_file_does_not_capture_a_local_run(tmp_path):
    """A head killed without `ray stop` leaves `ray_current_cluster` in Ray's temp folder; a plain ray.init() would
    try to join that dead cluster. Without --ray-address / RAY_ADDRESS the run starts its own private cluster."""
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        Path(ray_tmp, "ray").mkdir()  # Ray's folder under RAY_TMPDIR, where `ray start` records its cluster
        Path(ray_tmp, "ray", "ray_current_cluster").write_text(f"127.0.0.1:{closed_port()}\n")
        cli = Path(sys.executable).parent / "flashportrait"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=ray_tmp, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        proc = subprocess.run(
            [
                str(cli), "render", "--reference", "examples/reference.png", "--driving", "examples/driving_short.mp4",
                "--out", str(tmp_path / "x.mp4"), "--workers", "1", "--preset", "tiny", "--steps", "1",
            ],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / "x.mp4").stat().st_size > 0
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
