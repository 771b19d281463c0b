"""End to end: a manifest on S3 (moto's server) → Prefect flow → 2 Ray workers → MP4s + report on S3."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import av
import boto3
import pyarrow.parquet as pq
import pytest

from flashportrait.flows.render import render_manifest
from flashportrait.flows.settings import RenderSettings
from flashportrait.infra import storage


pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def upload_inputs(bucket: str) -> str:
    s3 = boto3.client("s3")
    for name in ("reference.png", "driving_talk.mp4", "driving_short.mp4"):
        s3.upload_file(str(EXAMPLES / name), bucket, f"in/{name}")
    rows = [
        {"id": "talk", "reference": "reference.png", "driving": "driving_talk.mp4", "seed": 1, "prompt": "talking"},
        {"id": "missing", "reference": "reference.png", "driving": "nope.mp4", "sed": 3},
        {"id": "short", "reference": "reference.png", "driving": "driving_short.mp4", "seed": 2},
        {"id": "bad-seed", "reference": "reference.png", "driving": "driving_short.mp4", "seed": "x"},
    ]
    body = "".join(json.dumps(r) + "\n" for r in rows)
    s3.put_object(Bucket=bucket, Key="in/manifest.jsonl", Body=body.encode())
    return f"s3://{bucket}/in/manifest.jsonl"


def decode(bucket: str, key: str) -> tuple[int, int, int, float]:
    data = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.codec_context.width, stream.codec_context.height, float(stream.average_rate)


def test_flow_renders_s3_manifest_to_s3(s3_bucket, ray_cluster, prefect_harness):
    manifest = upload_inputs(s3_bucket)
    summary = render_manifest(manifest, f"s3://{s3_bucket}/out", RenderSettings(workers=2, steps=2, preset="tiny"))
    assert (summary.done, summary.failed) == (2, 2)

    # The MP4s decode with an independent reader: 61 driving frames (4·15+1) → 60 output frames; 17 → 16.
    assert decode(s3_bucket, "out/talk.mp4") == (60, 64, 64, 12.0)
    assert decode(s3_bucket, "out/short.mp4") == (16, 64, 64, 12.0)

    sidecar = json.loads(storage.read_bytes(f"s3://{s3_bucket}/out/talk.json"))
    assert sidecar["parameters"]["seed"] == 1 and sidecar["model_preset"] == "tiny"
    assert sidecar["result"]["transformer_calls"] == 2 * 5 * 2  # steps × windows (16 latent frames) × streams
    assert 0 < sidecar["result"]["seconds_transformer"] < sidecar["result"]["seconds_denoising"] * 2  # ALP off too
    assert sidecar["result"]["extra"]["workers"] == 2

    with storage.filesystem_for(summary.report_parquet)[0].open(summary.report_parquet.removeprefix("s3://")) as f:
        report = {row["id"]: row for row in pq.read_table(f).to_pylist()}
    assert report["talk"]["status"] == "done" and report["short"]["status"] == "done"
    assert report["missing"]["status"] == "failed" and "nope.mp4" in report["missing"]["reason"]
    assert report["missing"]["warnings"] == "unknown field 'sed' ignored" and report["talk"]["warnings"] == ""
    assert report["bad-seed"]["status"] == "failed"
    assert "line 4" in report["bad-seed"]["reason"] and "seed must be an integer" in report["bad-seed"]["reason"]
    assert storage.exists(summary.report_html)
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]}
    assert "out/missing.mp4" not in keys and "out/missing.json" not in keys


class FailingWriter(io.RawIOBase):
    """Passes writes through until ``limit`` bytes, then fails as a dropped connection would."""

    def __init__(self, inner, limit: int):
        self.inner, self.limit, self.written = inner, limit, 0

    def write(self, data) -> int:
        if self.written + len(data) > self.limit:
            raise ConnectionResetError("injected: connection reset mid-upload")
        self.written += len(data)
        return self.inner.write(data)


def test_job_failing_mid_upload_leaves_nothing_at_its_key(s3_bucket, ray_cluster, prefect_harness, monkeypatch):
    manifest = upload_inputs(s3_bucket)
    real_atomic_write = storage.atomic_write

    @contextlib.contextmanager
    def flaky_atomic_write(url: str, **kwargs):
        with real_atomic_write(url, **kwargs) as f:
            yield FailingWriter(f, limit=1000) if url.endswith("/short.mp4") else f

    monkeypatch.setattr(storage, "atomic_write", flaky_atomic_write)
    summary = render_manifest(manifest, f"s3://{s3_bucket}/out", RenderSettings(workers=2, steps=1))
    rows = {r["id"]: r for r in summary.results}
    assert rows["short"]["status"] == "failed" and "connection reset mid-upload" in rows["short"]["reason"]
    assert rows["talk"]["status"] == "done"
    s3 = boto3.client("s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/").get("Contents", [])}
    assert "out/talk.mp4" in keys
    assert "out/short.mp4" not in keys and "out/short.json" not in keys
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
