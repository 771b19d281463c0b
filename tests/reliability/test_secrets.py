"""Canary secrets in the environment and in manifest URLs appear in no output, log, report, sidecar or Ray log."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import pytest
from waiting import CEILING_S


pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SECRET_KEY = "canary-aws-secret-7f3a9c"
URL_PASSWORD = "canary-url-password-51be"
SIGNATURE = "canarysignature0d4e2b"


@pytest.fixture
def ray_tmp():
    path = Path(tempfile.mkdtemp(prefix="fpray", dir="/tmp"))  # Ray's socket paths must stay under 107 chars
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_canaries_never_leak(s3_bucket, tmp_path, ray_tmp):
    s3 = boto3.client("s3")
    for name in ("reference.png", "driving_short.mp4"):
        s3.upload_file(str(EXAMPLES / name), s3_bucket, f"in/{name}")
    rows = [
        {"id": "ok", "reference": "reference.png", "driving": "driving_short.mp4"},
        {
            "id": "creds",
            "reference": f"s3://user:{URL_PASSWORD}@{s3_bucket}/in/reference.png",
            "driving": "driving_short.mp4",
        },
        {
            "id": "signed",
            "reference": "reference.png",
            "driving": f"s3://{s3_bucket}/in/missing.mp4?X-Amz-Signature={SIGNATURE}&X-Amz-Expires=60",
        },
    ]
    s3.put_object(Bucket=s3_bucket, Key="in/m.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    prefect_home = tmp_path / "prefect"
    env = {
        **os.environ,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "FLASHPORTRAIT_LOG_LEVEL": "DEBUG",
        "RAY_TMPDIR": str(ray_tmp),
    }
    cli = Path(sys.executable).parent / "flashportrait"
    proc = subprocess.run(
        [
            str(cli),
            "batch",
            f"s3://{s3_bucket}/in/m.jsonl",
            "--out",
            f"s3://{s3_bucket}/out",
            "--workers",
            "2",
            "--steps",
            "1",
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]  # two rows fail, one renders
    assert "[      done] ok" in proc.stdout
    haystacks = {"stdout": proc.stdout, "stderr": proc.stderr}
    for obj in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]:
        haystacks[obj["Key"]] = s3.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read().decode("latin-1")
    files = [p for p in glob.glob(str(prefect_home / "**" / "*"), recursive=True) if os.path.isfile(p)]
    files += [p for p in glob.glob(str(ray_tmp / "**" / "*"), recursive=True) if os.path.isfile(p)]
    assert any("prefect.db" in f for f in files)  # the Prefect database (flow/task logs, parameters) is searched
    for path in files:
        try:
            haystacks[path] = Path(path).read_bytes().decode("latin-1")
        except OSError:
            continue
    assert any("ray" in name and "session" in name for name in haystacks)  # and Ray's session logs
    for name, text in haystacks.items():
        for canary in (SECRET_KEY, URL_PASSWORD, SIGNATURE):
            assert canary not in text, f"{canary} leaked into {name}"
