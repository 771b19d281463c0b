"""Manifest, id and parameter validation: each bad kind fails alone, with a reason naming the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flashportrait.flows.manifest import ManifestError, check_manifest_shape, parse_jobs
from flashportrait.infra.limits import Limits
from flashportrait.infra.tables import read_manifest_records


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def parse(tmp_path: Path, name: str, data: bytes | str, limits: Limits | None = None):
    url = write(tmp_path, name, data)
    records = read_manifest_records(url)
    check_manifest_shape(records, url, limits or Limits())
    return parse_jobs(records, url, None, limits)


GOOD = {"reference": "ref.png", "driving": "drv.mp4"}


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def reasons(failures) -> dict[int, str]:
    return {f.line: f.reason for f in failures}


def test_unparseable_and_non_object_lines_fail_with_their_line(tmp_path):
    jobs, failures = parse(
        tmp_path, "m.jsonl", jsonl({"id": "a", **GOOD}, "{not json", "[1, 2]", '"text"', {"id": "b", **GOOD})
    )
    assert [j.id for j in jobs] == ["a", "b"]
    got = reasons(failures)
    assert set(got) == {2, 3, 4}
    assert all(f"line {n}" in got[n] for n in got)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"id": "a", "reference": "ref.png"}, "driving: Field required"),
        ({"id": "a", **GOOD, "seed": True}, "seed must be an integer, got a boolean"),
        ({"id": "a", **GOOD, "steps": float("nan")}, "steps must be an integer, got nan"),
        ({"id": "a", **GOOD, "width": "wide"}, "width must be an integer, got 'wide'"),
        ({"id": "a", **GOOD, "prompt": 5}, "prompt: Input should be a valid string"),
        ({"id": 7, **GOOD}, "id: Input should be a valid string"),
    ],
)
def test_missing_and_wrong_typed_fields(tmp_path, row, expected):
    body = json.dumps(row, allow_nan=True) + "\n" + json.dumps({"id": "ok", **GOOD}) + "\n"
    jobs, failures = parse(tmp_path, "m.jsonl", body)
    assert [j.id for j in jobs] == ["ok"]
    assert expected in failures[0].reason and failures[0].reason.startswith("line 1: ")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("steps", 0, "steps must be between 1 and 1000, got 0"),
        ("steps", -3, "steps must be between 1 and 1000, got -3"),
        ("steps", 10**9, "steps must be between 1 and 1000"),
        ("seed", -1, "seed must be in [0, 2^63)"),
        ("seed", 2**70, "seed must be in [0, 2^63)"),
        ("seed", 1.5, "seed must be an integer, got 1.5"),
        ("width", 100, "width must be a multiple of 16"),
        ("height", 0, "height must be a multiple of 16 between 16 and 4096, got 0"),
        ("height", 65536, "height must be a multiple of 16 between 16 and 4096"),
        ("fps", 0, "fps must be in (0, 240]"),
        ("fps", -25, "fps must be in (0, 240]"),
        ("fps", 1e9, "fps must be in (0, 240]"),
        ("fps", "abc", "fps must be a number, got 'abc'"),
    ],
)
def test_parameters_out_of_range(tmp_path, field, value, expected):
    jobs, failures = parse(tmp_path, "m.jsonl", jsonl({"id": "a", **GOOD, field: value}))
    assert jobs == [] and expected in failures[0].reason and field in failures[0].reason


@pytest.mark.parametrize(
    "bad_id",
    ["../escape", "/abs/path", "a/b", "with space", "tab\tid", "nul\x00id", "", ".hidden", "x" * 129, "é"],
)
def test_unsafe_ids_are_refused(tmp_path, bad_id):
    jobs, failures = parse(tmp_path, "m.jsonl", jsonl({"id": bad_id, **GOOD}, {"id": "fine", **GOOD}))
    assert [j.id for j in jobs] == ["fine"]
    assert "id" in failures[0].reason and "line 1" in failures[0].reason


def test_duplicate_ids(tmp_path):
    jobs, failures = parse(tmp_path, "m.jsonl", jsonl({"id": "a", **GOOD}, {"id": "a", **GOOD}))
    assert len(jobs) == 1 and "duplicate id 'a' (first on line 1)" in failures[0].reason


@pytest.mark.parametrize("body", ["", "\n\n", "   \n\t\n"])
def test_empty_manifests_stop_the_run(tmp_path, body):
    with pytest.raises(ManifestError, match="has no rows"):
        parse(tmp_path, "m.jsonl", body)


def test_missing_required_column_stops_the_run(tmp_path):
    with pytest.raises(ManifestError, match="has no driving column"):
        parse(tmp_path, "m.csv", "id,reference\na,ref.png\n")


def test_too_many_rows_stop_the_run(tmp_path):
    rows = [{"id": f"r{i}", **GOOD} for i in range(6)]
    with pytest.raises(ManifestError, match="6 rows, more than max_manifest_rows \\(5\\)"):
        parse(tmp_path, "m.jsonl", jsonl(*rows), Limits(max_manifest_rows=5))


def test_utf8_bom_and_crlf_are_fine_but_other_encodings_are_not(tmp_path):
    body = "\ufeff" + "id,reference,driving,prompt\r\n" + 'a,ref.png,drv.mp4,"say ""hi"", then\r\nsmile"\r\n'
    jobs, failures = parse(tmp_path, "m.csv", body.encode("utf-8"))
    assert failures == [] and jobs[0].prompt == 'say "hi", then\r\nsmile'
    latin1 = (json.dumps({"id": "a", **GOOD, "prompt": "café"}, ensure_ascii=False) + "\n").encode("latin-1")
    jobs, failures = parse(tmp_path, "l.jsonl", latin1)
    assert jobs == [] and "line 1" in failures[0].reason and "UTF-8" in failures[0].reason


def test_unknown_fields_warn_and_oversized_fields_fail(tmp_path):
    limits = Limits(max_field_bytes=64, max_prompt_bytes=32)
    rows = [
        {"id": "a", **GOOD, "colour": "red"},
        {"id": "b", **GOOD, "prompt": "p" * 33},
        {"id": "c", "reference": "r" * 65, "driving": "drv.mp4"},
    ]
    jobs, failures = parse(tmp_path, "m.jsonl", jsonl(*rows), limits)
    assert [j.id for j in jobs] == ["a"] and jobs[0].warnings == ("unknown field 'colour' ignored",)
    got = reasons(failures)
    assert "prompt: 33 bytes exceeds the limit of 32" in got[2] and "--max-prompt-bytes" in got[2]
    assert "reference: 65 bytes exceeds the limit of 64" in got[3]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_unicode_text_exports_with_a_byte_order_mark_are_read(tmp_path, encoding):
    """A spreadsheet's "Unicode text" export: UTF-16 LE with a BOM, tab-separated, CRLF; renamed .csv."""
    body = "\ufeff" + "id\treference\tdriving\tprompt\r\n" + 'a\tref.png\tdrv.mp4\t"café, ""smile"""\r\n'
    body += "b\tref.png\tdrv.mp4\tnaïve 😀\r\n"
    jobs, failures = parse(tmp_path, "export.csv", body.encode(encoding))
    assert failures == [] and [(j.id, j.prompt, j.line) for j in jobs] == [
        ("a", 'café, "smile"', 2),
        ("b", "naïve 😀", 3),
    ]
    rows = jsonl({"id": "a", **GOOD, "prompt": "café"}, "{broken", {"id": "b", **GOOD})
    jobs, failures = parse(tmp_path, "m.jsonl", ("\ufeff" + rows).encode(encoding))
    assert [j.id for j in jobs] == ["a", "b"] and jobs[0].prompt == "café"
    assert list(reasons(failures)) == [2]  # line numbers still point into the user's file


@pytest.mark.parametrize(("name", "encoding"), [("m.csv", "utf-16-le"), ("m.jsonl", "utf-16-be")])
def test_utf16_without_a_byte_order_mark_refuses_the_manifest_naming_the_encoding(tmp_path, name, encoding):
    body = "id,reference,driving\na,ref.png,drv.mp4\n" if name.endswith(".csv") else jsonl({"id": "a", **GOOD})
    with pytest.raises(ValueError, match="looks like UTF-16 or UTF-32 text without a byte-order mark; save it as"):
        parse(tmp_path, name, body.encode(encoding))


def test_a_byte_order_mark_over_invalid_text_refuses_the_manifest(tmp_path):
    with pytest.raises(ValueError, match="starts with a UTF-16-LE byte-order mark but is not valid UTF-16-LE"):
        parse(tmp_path, "m.jsonl", b"\xff\xfe" + '{"id": "a"}\n'.encode("utf-16-le") + b"\x00\xdc")


def test_tab_separated_csv_in_utf8(tmp_path):
    jobs, failures = parse(tmp_path, "m.csv", "id\treference\tdriving\na\tref.png\tdrv.mp4\n")
    assert failures == [] and jobs[0].id == "a"
