"""tables.py: manifests (JSONL, CSV, Parquet; local and S3) in, reports (Parquet + HTML; local and S3) out."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flashportrait.infra import storage
from flashportrait.infra.tables import ManifestRecord, read_manifest_records, write_report


def test_jsonl_bad_line_becomes_one_error_record(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        '{"job_id": "a", "seed": 1}\n'
        '{"job_id": "b", "seed": \n'  # line 2: truncated JSON
        "\n"  # blank lines are skipped but still counted
        '{"job_id": "c", "extra": {"k": [1, 2]}}\n'
    )
    records = read_manifest_records(str(manifest))
    assert [r.line for r in records] == [1, 2, 4]
    assert records[0] == ManifestRecord(1, {"job_id": "a", "seed": 1}, None)
    assert records[1].values is None and records[1].error is not None
    assert records[1].error.startswith("line 2: invalid JSON")
    assert records[2].values == {"job_id": "c", "extra": {"k": [1, 2]}}


def test_jsonl_non_object_and_non_utf8_lines_are_errors(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.ndjson"
    manifest.write_bytes(b'\xef\xbb\xbf{"job_id": "a"}\n[1, 2]\n{"job_id": "\xff"}\n')
    records = read_manifest_records(str(manifest))
    assert records[0].values == {"job_id": "a"}  # the BOM is not part of the first object
    assert records[1].error == "line 2: expected a JSON object {...}, found a list"
    assert records[2].error is not None and records[2].error.startswith("line 3: not valid UTF-8")


def test_csv_with_bom_crlf_and_quoted_commas_and_newlines(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(
        b"\xef\xbb\xbfjob_id,prompt,seed\r\n"  # line 1: header with a BOM
        b'a,"smile, then nod\r\nslowly",7\r\n'  # lines 2-3: one row, quoted comma and newline
        b"b,,\r\n"  # line 4: empty cells are absent keys
        b"c,only two\r\n"  # line 5: wrong field count
        b'd,"bad"quote,1\r\n'  # line 6: malformed quoting
        b"e,fine,2\r\n"  # line 7: still read
    )
    records = read_manifest_records(str(manifest))
    assert [r.line for r in records] == [2, 4, 5, 6, 7]
    assert records[0].values == {"job_id": "a", "prompt": "smile, then nod\r\nslowly", "seed": "7"}
    assert records[1].values == {"job_id": "b"}
    assert records[2].error == "line 5: 2 fields, but the header has 3 (job_id, prompt, seed)"
    assert records[3].error is not None and records[3].error.startswith("line 6: malformed CSV")
    assert records[4].values == {"job_id": "e", "prompt": "fine", "seed": "2"}


def test_csv_duplicate_header_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("job_id,job_id\n1,2\n")
    with pytest.raises(ValueError, match=r"manifest\.csv: the header row needs unique, non-empty column names"):
        read_manifest_records(str(manifest))


def test_parquet_round_trip(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"job_id": ["a", "b"], "seed": [1, None], "fps": [25.0, 16.0]}), manifest)
    records = read_manifest_records(str(manifest))
    assert records == [
        ManifestRecord(1, {"job_id": "a", "seed": 1, "fps": 25.0}, None),
        ManifestRecord(2, {"job_id": "b", "fps": 16.0}, None),  # null = not given
    ]


def test_unknown_extension_names_url_and_formats(tmp_path: Path) -> None:
    url = str(tmp_path / "manifest.xlsx")
    with pytest.raises(ValueError, match=r"manifest\.xlsx has an unsupported extension '\.xlsx'; use one of \.jsonl"):
        read_manifest_records(url)


def test_missing_manifest_names_the_url(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/nope.jsonl"
    with pytest.raises(FileNotFoundError, match=f"Manifest {url} does not exist"):
        read_manifest_records(url)


@pytest.mark.parametrize("extension", [".jsonl", ".csv", ".parquet"])
def test_s3_manifests(s3_bucket: str, extension: str) -> None:
    url = f"s3://{s3_bucket}/manifests/batch{extension}"
    if extension == ".jsonl":
        data = b'{"job_id": "a"}\nnot json\n{"job_id": "c"}\n'
    elif extension == ".csv":
        data = b'job_id\na\n"b\nb"\nc\n'
    else:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"job_id": ["a", "b", "c"]}), sink)
        data = sink.getvalue().to_pybytes()
    storage.write_bytes_atomic(url, data)
    records = read_manifest_records(url)
    assert len(records) == 3
    assert records[0].values == {"job_id": "a"}


REPORT_ROWS = [
    {"job_id": "a", "status": "done", "frames": 81, "timings": {"denoise_s": 1.5}},
    {"job_id": "b", "status": "failed", "error": "<script>alert('x')</script> in prompt"},
    {"job_id": "c", "status": "done", "frames": "n/a"},  # mixed types: the column becomes text
]


def _check_report(parquet_url: str, html_url: str) -> None:
    fs, path = storage.filesystem_for(parquet_url)
    table = pq.read_table(path, filesystem=fs)
    assert table.column_names == ["job_id", "status", "frames", "timings", "error"]
    assert table.column("frames").to_pylist() == ["81", None, "n/a"]
    assert json.loads(table.column("timings")[0].as_py()) == {"denoise_s": 1.5}
    page = storage.read_bytes(html_url).decode("utf-8")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; in prompt" in page
    assert "<script>" not in page
    assert "3 rows (done: 2, failed: 1)" in page
    assert "<title>Nightly &amp; co</title>" in page


def test_write_report_local(tmp_path: Path) -> None:
    prefix = tmp_path / "run-1"
    parquet_url, html_url = write_report(REPORT_ROWS, str(prefix), title="Nightly & co")
    assert (parquet_url, html_url) == (str(prefix / "report.parquet"), str(prefix / "report.html"))
    _check_report(parquet_url, html_url)


def test_write_report_s3(s3_bucket: str) -> None:
    parquet_url, html_url = write_report(REPORT_ROWS, f"s3://{s3_bucket}/runs/1/", title="Nightly & co")
    assert parquet_url == f"s3://{s3_bucket}/runs/1/report.parquet"
    _check_report(parquet_url, html_url)


def test_write_report_with_no_rows(tmp_path: Path) -> None:
    parquet_url, html_url = write_report([], str(tmp_path))
    assert pq.read_table(parquet_url).num_rows == 0
    assert "0 rows" in Path(html_url).read_text()
