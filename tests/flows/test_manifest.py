"""Manifest rows → jobs: validation reasons name the line and the field."""

from __future__ import annotations

import pytest

from flashportrait.flows.manifest import Job, parse_jobs
from flashportrait.infra.tables import ManifestRecord


def rec(line: int, **values) -> ManifestRecord:
    return ManifestRecord(line=line, values=values, error=None)


def test_valid_rows_resolve_relative_urls_against_the_manifest():
    jobs, failures = parse_jobs(
        [rec(1, id="a", reference="in/ref.png", driving="s3://other/d.mp4", seed="7", steps=3, fps="12.5")],
        "s3://bucket/manifests/m.jsonl",
    )
    assert failures == []
    (job,) = jobs
    assert job.reference == "s3://bucket/manifests/in/ref.png"
    assert job.driving == "s3://other/d.mp4"
    assert (job.seed, job.steps, job.fps, job.line) == (7, 3, 12.5, 1)


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (dict(id="../etc", reference="r", driving="d"), "id '../etc' is not a safe object name"),
        (dict(id="a", reference="r"), "driving: Field required"),
        (dict(id="a", reference="r", driving="d", seed=True), "seed must be an integer, got a boolean"),
        (dict(id="a", reference="r", driving="d", seed=1.5), "seed must be an integer, got 1.5"),
        (dict(id="a", reference="r", driving="d", steps=0), "steps must be between 1 and 1000, got 0"),
        (dict(id="a", reference="r", driving="d", width=70), "width must be a multiple of 16"),
        (dict(id="a", reference="r", driving="d", fps="fast"), "fps must be a number, got 'fast'"),
        (dict(id="a", reference="r", driving="d", fps=0.0), r"fps must be in \(0, 240\]"),
    ],
)
def test_bad_rows_fail_with_the_field_and_line(values, reason):
    jobs, failures = parse_jobs([rec(4, **values)], "/data/m.jsonl")
    assert jobs == []
    (failure,) = failures
    assert failure.line == 4
    assert failure.reason.startswith("line 4: ")
    import re

    assert re.search(reason, failure.reason), failure.reason


def test_duplicate_ids_fail_the_later_row_only():
    rows = [rec(1, id="a", reference="r", driving="d"), rec(2, id="a", reference="r2", driving="d2")]
    jobs, failures = parse_jobs(rows, "/m.jsonl")
    assert [j.line for j in jobs] == [1]
    assert "duplicate id 'a' (first on line 1)" in failures[0].reason


def test_unparseable_record_keeps_its_reason():
    jobs, failures = parse_jobs([ManifestRecord(line=3, values=None, error="line 3: not JSON")], "/m.jsonl")
    assert jobs == [] and failures[0].reason == "line 3: not JSON"


def test_job_refuses_unknown_direct_fields():
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        Job(id="a", reference="r", driving="d", colour="red")
