"""Run-level faults stop `flashportrait batch` up front with exit 2: a missing output bucket, no credentials."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest


pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "flashportrait"


def batch(manifest: str, out: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLI), "batch", manifest, "--out", out, "--workers", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_missing_output_bucket_exits_2_before_any_work(s3_bucket, tmp_path):
    boto3.client("s3").upload_file(str(ROOT / "examples/manifest.jsonl"), s3_bucket, "in/m.jsonl")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "p"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = batch(f"s3://{s3_bucket}/in/m.jsonl", "s3://no-such-output-bucket/out", env)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "no-such-output-bucket" in proc.stderr


def test_no_credentials_exits_2(s3_endpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=s3_endpoint,
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_CONFIG_FILE="/dev/null",
        HOME=str(tmp_path),
        PREFECT_HOME=str(tmp_path / "p"),
    )
    proc = batch("s3://any-bucket/m.jsonl", "s3://any-bucket/out", env)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "no AWS credentials found" in proc.stderr
