"""Idempotent re-runs, resume after a killed batch, and concurrent publishes of one key (moto S3, real Prefect)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import boto3
import pytest
from waiting import CEILING_S, wait_for

from flashportrait.flows.manifest import Job
from flashportrait.flows.publishing import JobOutputs, PublishConflict, job_hash, publish_outputs
from flashportrait.flows.render import is_manifest_rendered, render_manifest
from flashportrait.flows.settings import RenderSettings
from flashportrait.infra import storage


pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def upload(bucket: str, rows: list[dict]) -> str:
    s3 = boto3.client("s3")
    for name in ("reference.png", "driving_short.mp4"):
        s3.upload_file(str(EXAMPLES / name), bucket, f"in/{name}")
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    s3.put_object(Bucket=bucket, Key="in/manifest.jsonl", Body=body)
    return f"s3://{bucket}/in/manifest.jsonl"


def rows(n: int) -> list[dict]:
    return [
        {"id": f"job-{i}", "reference": "reference.png", "driving": "driving_short.mp4", "seed": i} for i in range(n)
    ]


def last_modified(bucket: str) -> dict[str, object]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])
    return {
        o["Key"]: o["LastModified"] for o in listing if o["Key"].endswith((".mp4", ".json")) and "/_" not in o["Key"]
    }


def check_outputs_decode(bucket: str, ids: list[str]) -> None:
    s3 = boto3.client("s3")
    for job_id in ids:
        sidecar = json.loads(s3.get_object(Bucket=bucket, Key=f"out/{job_id}.json")["Body"].read())
        data = s3.get_object(Bucket=bucket, Key=f"out/{job_id}.mp4")["Body"].read()
        import io

        with av.open(io.BytesIO(data)) as container:
            frames = sum(1 for _ in container.decode(container.streams.video[0]))
        assert frames == sidecar["result"]["frames"]
        head = s3.head_object(Bucket=bucket, Key=f"out/{job_id}.mp4")
        assert head["Metadata"]["flashportrait-job-hash"] == sidecar["job_hash"]
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_rerun_skips_everything_and_force_rerenders(s3_bucket, prefect_harness):
    manifest = upload(s3_bucket, rows(2))
    out = f"s3://{s3_bucket}/out"
    first = render_manifest(manifest, out, RenderSettings(workers=0, steps=1))
    assert (first.done, first.skipped) == (2, 0) and is_manifest_rendered(manifest, out)
    stamps = last_modified(s3_bucket)
    time.sleep(1.1)  # S3 timestamps have 1-second resolution
    second = render_manifest(manifest, out, RenderSettings(workers=0, steps=1))
    assert (second.done, second.skipped) == (0, 2)
    assert all(r["reason"] == "already published with the same job hash" for r in second.results)
    assert last_modified(s3_bucket) == stamps
    forced = render_manifest(manifest, out, RenderSettings(workers=0, steps=1, force=True))
    assert forced.done == 2
    assert all(last_modified(s3_bucket)[k] > stamps[k] for k in stamps)
    check_outputs_decode(s3_bucket, ["job-0", "job-1"])


def test_changed_parameters_refuse_to_overwrite(s3_bucket, prefect_harness):
    manifest = upload(s3_bucket, rows(1))
    out = f"s3://{s3_bucket}/out"
    assert render_manifest(manifest, out, RenderSettings(workers=0, steps=1)).done == 1
    changed = render_manifest(
        manifest, out, RenderSettings(workers=0, steps=2)
    )  # another step count → another job hash
    (row,) = changed.results
    assert row["status"] == "failed" and "published from other inputs or parameters" in row["reason"]
    assert "--force" in row["reason"]
    assert not is_manifest_rendered(manifest, out) or changed.failed == 1


def test_killed_batch_resumes_only_the_rest(s3_bucket, tmp_path):
    manifest = upload(s3_bucket, rows(4))
    out = f"s3://{s3_bucket}/out"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(tmp_path / "prefect")}
    cli = Path(sys.executable).parent / "flashportrait"
    proc = subprocess.Popen(
        [str(cli), "batch", manifest, "--out", out, "--workers", "0", "--steps", "2", "--quiet"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: storage.exists(f"{out}/job-0.json"), "first published job", proc, poll_s=0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    done_before = {k for k in last_modified(s3_bucket) if k.endswith(".json")}
    assert "out/job-0.json" in done_before and len(done_before) < 4
    stamps = last_modified(s3_bucket)

    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=int(CEILING_S)):
        resumed = render_manifest(manifest, out, RenderSettings(workers=0, steps=2))
    statuses = {r["id"]: r["status"] for r in resumed.results}
    assert {k for k, v in statuses.items() if v == "skipped"} == {k[4:-5] for k in done_before}
    assert all(v in ("done", "skipped") for v in statuses.values()) and len(statuses) == 4
    after = last_modified(s3_bucket)
    assert all(after[k] == stamps[k] for k in stamps if k.endswith(".json"))  # finished rows untouched
    check_outputs_decode(s3_bucket, [f"job-{i}" for i in range(4)])


def test_concurrent_publishes_of_one_key_one_wins(s3_bucket, tmp_path):
    video = tmp_path / "video.mp4"
    video.write_bytes(os.urandom(7 << 20))  # > one 5 MiB part: the conditional create is on the multipart complete
    job = Job(id="race", reference="r", driving="d", line=1)
    expected = job_hash(job, {"preset": "tiny"}, {"reference": "etag:1", "driving": "etag:2"})
    outputs = JobOutputs.under(f"s3://{s3_bucket}/out", "race")
    outcomes, errors = [], []
    barrier = threading.Barrier(2)

    def publish(delay: float):
        barrier.wait()
        # moto checks If-None-Match and stores the object non-atomically: two completes within a few ms both
        # succeeded here (real S3 answers the later one 409 ConditionalRequestConflict, handled in publishing).
        # So the two uploads overlap, but the second completes half a second after the first.
        time.sleep(delay)
        try:
            outcomes.append(publish_outputs(video, {"job_hash": expected}, outputs, expected, force=False))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(delay,)) for delay in (0.0, 0.5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert sorted(o.video_written for o in outcomes) == [False, True]  # exactly one create of the video won
    assert sorted(o.sidecar_written for o in outcomes) == [False, True]
    s3 = boto3.client("s3")
    assert s3.get_object(Bucket=s3_bucket, Key="out/race.mp4")["Body"].read() == video.read_bytes()
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []

    other = "0" * 64
    with pytest.raises(PublishConflict, match="already holds output of job hash"):
        publish_outputs(video, {"job_hash": other}, outputs, other, force=False)
