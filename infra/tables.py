"""Manifests in (JSONL, CSV, Parquet; any storage URL) and run reports out (Parquet for machines, HTML for people).

Manifests are read record by record on purpose, not with ``pyarrow.json``/``pyarrow.csv``: those fail the whole file
on one malformed line, and a batch must report the bad row and render the others. Each record keeps its line number,
so an error can point the user at the exact line to fix.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from flashportrait.infra import storage


logger = logging.getLogger(__name__)

SUPPORTED_MANIFEST_FORMATS = (".jsonl", ".ndjson", ".csv", ".parquet")
_UTF8_BOM = b"\xef\xbb\xbf"
# UTF-32 first: its little-endian mark begins with UTF-16's.
_UNICODE_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)


@dataclass(frozen=True)
class ManifestRecord:
    """One data row of a manifest: its values, or (if it could not be parsed) an error naming the line and the problem.

    ``line`` is 1-based: the line in a JSONL file, the line where the row starts in a CSV file (the header is line
    1), the row index + 1 in a Parquet file.
    """

    line: int
    values: dict[str, Any] | None
    error: str | None


def read_manifest_records(url: str) -> list[ManifestRecord]:
    """Every data row of the manifest at ``url``, format chosen by extension; one bad row never hides the others."""
    fs, path = storage.filesystem_for(url)
    extension = posixpath.splitext(path)[1].lower()
    if extension not in SUPPORTED_MANIFEST_FORMATS:
        raise ValueError(
            f"Manifest {url} has an unsupported extension {extension or '(none)'!r}; "
            f"use one of {', '.join(SUPPORTED_MANIFEST_FORMATS)}."
        )
    try:
        file = fs.open(path, "rb")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"Manifest {url} does not exist; check the URL.") from error
    with file:
        if extension == ".parquet":
            records = list(_parquet_records(file, url))
        else:
            text = io.BytesIO(_as_utf8(file.read(), url))
            records = list(_csv_records(text, url) if extension == ".csv" else _jsonl_records(text))
    unparsable = sum(record.error is not None for record in records)
    logger.info("read %d records (%d unparsable) from %s", len(records), unparsable, url)
    return records


def _as_utf8(data: bytes, url: str) -> bytes:
    """The manifest's text as UTF-8: UTF-16 and UTF-32 with a byte-order mark (what a spreadsheet's "Unicode text"
    export writes) are converted; the same without a mark is refused as a whole, naming the encoding, since every
    row would otherwise fail on its own. Line breaks are kept, so line numbers still point into the user's file."""
    for bom, encoding in _UNICODE_BOMS:
        if data.startswith(bom):
            try:
                text = data[len(bom) :].decode(encoding)
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"Manifest {url} starts with a {encoding.upper()} byte-order mark but is not valid "
                    f"{encoding.upper()} ({error.reason} at byte {error.start + len(bom)}); save it as UTF-8."
                ) from None
            logger.info("manifest %s is %s text; read as such", url, encoding.upper())
            return text.encode("utf-8", "surrogatepass")
    if b"\x00" in data[:4096]:
        raise ValueError(
            f"Manifest {url} contains NUL bytes: it looks like UTF-16 or UTF-32 text without a byte-order mark; "
            'save it as UTF-8 (or as UTF-16 with a byte-order mark, as spreadsheets\' "Unicode text" does).'
        )
    return data


def _jsonl_records(file: IO[bytes]) -> Iterator[ManifestRecord]:
    """One JSON object per line, parsed line by line so that a bad line becomes one error record."""
    for number, raw in enumerate(file, start=1):
        if number == 1:
            raw = raw.removeprefix(_UTF8_BOM)
        if not raw.strip():
            continue
        yield _json_record(number, raw)


def _json_record(number: int, raw: bytes) -> ManifestRecord:
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        return ManifestRecord(number, None, f"line {number}: not valid UTF-8 ({error.reason} at byte {error.start})")
    except json.JSONDecodeError as error:
        return ManifestRecord(number, None, f"line {number}: invalid JSON ({error.msg} at column {error.colno})")
    if not isinstance(value, dict):
        found = type(value).__name__
        return ManifestRecord(number, None, f"line {number}: expected a JSON object {{...}}, found a {found}")
    return ManifestRecord(number, value, None)


def _csv_records(file: IO[bytes], url: str) -> Iterator[ManifestRecord]:
    """RFC 4180 CSV with a header row; empty cells are left out, so they read as "not given".

    A header with tabs and no commas makes it tab-separated (a spreadsheet's "Unicode text" / "Text (Tab
    delimited)" export, renamed .csv); quoting works the same.
    """
    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")  # newline="": quoted fields may hold CR/LF
    try:
        first = text.readline()
        text.seek(0)
        reader = csv.reader(text, strict=True, delimiter="\t" if "\t" in first and "," not in first else ",")
        header = next(reader, None)
        if header is None:
            return
        _check_header(header, url)
        previous_line = reader.line_num
        while True:
            start = previous_line + 1  # a quoted field can span lines: report where the row starts
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield ManifestRecord(start, None, f"line {start}: malformed CSV ({error})")
                previous_line = reader.line_num
                continue
            previous_line = reader.line_num
            if row:  # [] is a blank line
                yield _csv_record(start, header, row)
    except UnicodeDecodeError as error:
        raise ValueError(f"Manifest {url} is not UTF-8 text ({error.reason}); save it as UTF-8.") from error
    finally:
        text.detach()  # the caller owns (and closes) the binary file


def _check_header(header: list[str], url: str) -> None:
    duplicates = sorted(name for name, count in Counter(header).items() if count > 1)
    if duplicates or any(not name for name in header):
        raise ValueError(
            f"Manifest {url}: the header row needs unique, non-empty column names, got {header}; fix line 1."
        )


def _csv_record(start: int, header: list[str], row: list[str]) -> ManifestRecord:
    if len(row) != len(header):
        return ManifestRecord(
            start, None, f"line {start}: {len(row)} fields, but the header has {len(header)} ({', '.join(header)})"
        )
    return ManifestRecord(start, {name: cell for name, cell in zip(header, row) if cell != ""}, None)


def _parquet_records(file: IO[bytes], url: str) -> Iterator[ManifestRecord]:
    """Parquet rows in order; nulls are left out, since in a columnar file they only mean "not given in this row"."""
    try:
        parquet = pq.ParquetFile(file)
        number = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield ManifestRecord(number, {k: v for k, v in row.items() if v is not None}, None)
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"Manifest {url} is not a readable Parquet file ({error}).") from error


# ---- reports ------------------------------------------------------------------------------------------------------


def write_report(
    rows: list[dict[str, Any]], prefix_url: str, *, title: str = "FlashPortrait run report"
) -> tuple[str, str]:
    """Write ``<prefix>/report.parquet`` and ``<prefix>/report.html``; returns their URLs.

    Both go through :func:`storage.atomic_write`, so a reader never sees half a report.
    """
    columns = _columns(rows)
    parquet_url = storage.join_url(prefix_url, "report.parquet")
    html_url = storage.join_url(prefix_url, "report.html")
    buffer = io.BytesIO()
    pq.write_table(_report_table(rows, columns), buffer)
    storage.write_bytes_atomic(parquet_url, buffer.getvalue())
    storage.write_bytes_atomic(html_url, _report_html(rows, columns, title).encode("utf-8"))
    logger.info("wrote report of %d rows to %s and %s", len(rows), parquet_url, html_url)
    return parquet_url, html_url


def _columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Union of the rows' keys, in first-seen order (so the usual leading columns stay first)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _report_table(rows: list[dict[str, Any]], columns: list[str]) -> pa.Table:
    return pa.table({name: _report_column([row.get(name) for row in rows]) for name in columns})


def _report_column(values: list[Any]) -> pa.Array:
    """Nested values become JSON text; a column whose values have no common Arrow type becomes text throughout."""
    encoded = [_json_if_nested(value) for value in values]
    try:
        return pa.array(encoded)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if value is None else _text(value) for value in encoded], type=pa.string())


def _json_if_nested(value: Any) -> Any:
    if isinstance(value, dict | list | tuple | set):
        return json.dumps(value, default=str, sort_keys=True)
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(_json_if_nested(value))


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.4rem; margin-bottom: 0.2rem; }
p.meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; position: sticky; top: 0; }
td { max-width: 40rem; white-space: pre-wrap; word-break: break-word; }
tr.status-done td { background: #f1faf1; }
tr.status-failed td { background: #fdf0f0; }
tr.status-skipped td, tr.status-cancelled td { background: #f6f6f6; }
"""


def _report_html(rows: list[dict[str, Any]], columns: list[str], title: str) -> str:
    """A single self-contained page (inline CSS, no scripts); every value is escaped, as rows carry user input."""
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    header = "".join(f"<th>{html.escape(name)}</th>" for name in columns)
    body = "\n".join(_html_row(row, columns) for row in rows)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f'<h1>{html.escape(title)}</h1>\n<p class="meta">Generated {generated}</p>\n'
        f'<p class="summary">{html.escape(_summary(rows))}</p>\n'
        f"<table>\n<thead><tr>{header}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n</body>\n</html>\n"
    )


def _summary(rows: list[dict[str, Any]]) -> str:
    counts = Counter(str(row.get("status", "(no status)")) for row in rows)
    parts = ", ".join(f"{status}: {count}" for status, count in sorted(counts.items()))
    return f"{len(rows)} rows" + (f" ({parts})" if parts else "")


def _html_row(row: dict[str, Any], columns: list[str]) -> str:
    status = "".join(ch for ch in str(row.get("status", "")).lower() if ch.isalnum() or ch in "-_")
    cells = "".join(f"<td>{html.escape('' if row.get(name) is None else _text(row[name]))}</td>" for name in columns)
    return f'<tr class="status-{status}">{cells}</tr>'
