"""One batch mixing every bad kind with two good rows (moto S3, real Prefect): the good rows render, each bad row
fails alone with a reason naming its field, and nothing else appears under the output prefix."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import boto3
import pytest
from PIL import Image

from flashportrait.flows.render import render_manifest
from flashportrait.flows.settings import RenderSettings

from . import media_factory as mf


pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_bad_rows_fail_alone(s3_bucket, prefect_harness, tmp_path):
    s3 = boto3.client("s3")
    for name in ("reference.png", "driving_short.mp4"):
        s3.upload_file(str(EXAMPLES / name), s3_bucket, f"in/{name}")
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    s3.upload_file(str(tmp_path / "bomb.png"), s3_bucket, "in/bomb.png")
    s3.upload_file(str(mf.audio_only(tmp_path / "audio.m4a")), s3_bucket, "in/audio.mp4")
    s3.put_object(Bucket=s3_bucket, Key="in/notvideo.mp4", Body=b"definitely not a video")
    good = {"reference": "reference.png", "driving": "driving_short.mp4"}
    rows = [
        json.dumps({"id": "good-1", **good, "seed": 1}),
        json.dumps({"id": "../evil", **good}),
        json.dumps({"id": "ssrf", "reference": "reference.png", "driving": "http://169.254.169.254/latest"}),
        json.dumps({"id": "missing", "reference": "reference.png", "driving": "nope.mp4"}),
        json.dumps({"id": "notvideo", "reference": "reference.png", "driving": "notvideo.mp4"}),
        json.dumps({"id": "audio", "reference": "reference.png", "driving": "audio.mp4"}),
        json.dumps({"id": "bomb", "reference": "bomb.png", "driving": "driving_short.mp4"}),
        json.dumps({"id": "steps", **good, "steps": 0}),
        "{broken json",
        json.dumps({"id": "good-1", **good}),
        json.dumps({"id": "localfile", "reference": "/etc/passwd", "driving": "driving_short.mp4"}),
        json.dumps({"id": "good-2", **good, "seed": 2}),
    ]
    s3.put_object(Bucket=s3_bucket, Key="in/m.jsonl", Body=("\n".join(rows) + "\n").encode())
    out = f"s3://{s3_bucket}/out"
    summary = render_manifest(f"s3://{s3_bucket}/in/m.jsonl", out, RenderSettings(workers=0, steps=1))

    by_line = {r["line"]: r for r in summary.results}
    assert len(by_line) == len(rows)  # every row has exactly one terminal status
    assert {r["id"] for r in summary.results if r["status"] == "done"} == {"good-1", "good-2"}
    expected = {
        2: "id '../evil' is not a safe object name",
        3: "driving: scheme 'http'",
        4: "nope.mp4",
        5: "driving: not a readable video",
        6: "driving: no video stream (it has only audio)",
        7: "reference: 20000x20000 exceeds max_image_pixels (50.0 Mpx)",
        8: "steps must be between 1 and 1000, got 0",
        9: "line 9",
        10: "duplicate id 'good-1'",
        11: "local file /etc/passwd in a remote manifest",
    }
    for line, fragment in expected.items():
        assert by_line[line]["status"] == "failed", by_line[line]
        assert fragment in by_line[line]["reason"], by_line[line]["reason"]

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]}
    assert keys == {
        "out/good-1.mp4",
        "out/good-1.json",
        "out/good-2.mp4",
        "out/good-2.json",
        "out/report.parquet",
        "out/report.html",
        "out/_manifest.json",
    }
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    for job_id in ("good-1", "good-2"):
        sidecar = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"out/{job_id}.json")["Body"].read())
        with av.open(io.BytesIO(s3.get_object(Bucket=s3_bucket, Key=f"out/{job_id}.mp4")["Body"].read())) as c:
            assert sum(1 for _ in c.decode(c.streams.video[0])) == sidecar["result"]["frames"] == 16

    again = render_manifest(f"s3://{s3_bucket}/in/m.jsonl", out, RenderSettings(workers=0, steps=1))
    statuses = {r["line"]: r["status"] for r in again.results}
    assert statuses[1] == statuses[12] == "skipped"  # a re-run renders exactly what is not done
    assert all(statuses[line] == "failed" for line in expected)


def test_row_timeout_fails_the_row_not_the_batch(tmp_path, prefect_harness):
    for name in ("reference.png", "driving_short.mp4"):
        (tmp_path / name).write_bytes((EXAMPLES / name).read_bytes())
    rows = [{"id": "slow", "reference": "reference.png", "driving": "driving_short.mp4", "steps": 50}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    settings = RenderSettings(workers=0, limits={"row_timeout_s": 0.01})
    summary = render_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "out"), settings=settings)
    (row,) = summary.results
    assert row["status"] == "failed" and "exceeded row_timeout_s (0.01 s) after step 1 of 50" in row["reason"]
    assert not (tmp_path / "out" / "slow.mp4").exists()


def test_truncated_driving_video_fails_closed_unless_lenient(tmp_path, prefect_harness):
    data = (EXAMPLES / "driving_talk.mp4").read_bytes()  # faststart: the index survives, the media is cut
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    (tmp_path / "reference.png").write_bytes((EXAMPLES / "reference.png").read_bytes())
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"id": "cut", "reference": "reference.png", "driving": "cut.mp4"}) + "\n"
    )

    strict = render_manifest(
        str(tmp_path / "m.jsonl"), str(tmp_path / "strict"), settings=RenderSettings(workers=0, steps=1)
    )
    (row,) = strict.results
    assert row["status"] == "failed" and "truncated or damaged" in row["reason"]
    lenient = render_manifest(
        str(tmp_path / "m.jsonl"),
        str(tmp_path / "lenient"),
        settings=RenderSettings(workers=0, steps=1, lenient_decode=True),
    )
    (row,) = lenient.results
    assert row["status"] == "done", row["reason"]
    damaged = json.loads((tmp_path / "lenient" / "cut.json").read_text())["result"]["extra"]["driving_damaged"]
    assert damaged["frames_dropped"] > 0 and damaged["frames_kept"] >= 5


def test_inputs_as_users_send_them(tmp_path, prefect_harness):
    """A phone photo and a 240 fps slow-motion clip render; a reference without a face and a driving video with
    corrupt packets fail with their reason; the manifest is a spreadsheet's UTF-16 export (with a BOM)."""
    mf.phone_photo(tmp_path / "phone.jpg", (4000, 3000))  # 12 Mpx
    (tmp_path / "reference.png").write_bytes((EXAMPLES / "reference.png").read_bytes())
    (tmp_path / "driving.mp4").write_bytes((EXAMPLES / "driving_short.mp4").read_bytes())
    mf.test_clip(tmp_path / "slowmo.mp4", frames=68, fps=240)  # ≈ 0.28 s → 34 frames at 120 fps
    Image.new("RGB", (256, 256), (40, 90, 160)).save(tmp_path / "wall.png")
    mf.corrupt_packets(EXAMPLES / "driving_talk.mp4", tmp_path / "damaged.mp4")
    rows = [
        {"id": "phone", "reference": "phone.jpg", "driving": "driving.mp4"},
        {"id": "slowmo", "reference": "reference.png", "driving": "slowmo.mp4"},
        {"id": "faceless", "reference": "wall.png", "driving": "driving.mp4"},
        {"id": "damaged", "reference": "reference.png", "driving": "damaged.mp4"},
    ]
    (tmp_path / "m.jsonl").write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode("utf-16"))

    settings = RenderSettings(workers=0, steps=1, preset="tiny", extractor="pixel")
    summary = render_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "out"), settings=settings)
    by_id = {r["id"]: r for r in summary.results}
    assert by_id["phone"]["status"] == by_id["slowmo"]["status"] == "done", summary.results
    phone = json.loads((tmp_path / "out" / "phone.json").read_text())
    assert "downscaled from 4000x3000" in json.dumps(phone)
    assert json.loads((tmp_path / "out" / "slowmo.json").read_text())["result"]["fps"] == 120.0
    assert by_id["faceless"]["status"] == "failed" and "no face found" in by_id["faceless"]["reason"]
    assert by_id["damaged"]["status"] == "failed" and "decoder reported" in by_id["damaged"]["reason"]

    allowed = RenderSettings(
        workers=0, steps=1, preset="tiny", extractor="pixel", allow_faceless_reference=True, lenient_decode=True
    )
    again = render_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "allowed"), settings=allowed)
    assert all(r["status"] == "done" for r in again.results), again.results
    damaged = json.loads((tmp_path / "allowed" / "damaged.json").read_text())
    assert "decoder_errors" in json.dumps(damaged)
