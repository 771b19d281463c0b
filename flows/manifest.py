"""Manifest rows → validated ``Job`` values, or a failed row with a reason a user can act on.

One row is one job: ``id``, ``reference`` (URL), ``driving`` (URL) and optional ``prompt``, ``seed``, ``steps``,
``width``, ``height``, ``fps``. Relative URLs resolve against the manifest's own location. A bad row never sinks
the batch: it becomes a ``JobFailure`` and the other rows render.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from flashportrait.infra.limits import Limits
from flashportrait.infra.redact import redact
from flashportrait.infra.storage import resolve_url
from flashportrait.infra.tables import ManifestRecord
from flashportrait.infra.urls import UrlPolicy, UrlRefused, check_input_url
from flashportrait.model.alp import ALP_PRESETS


SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KNOWN_FIELDS = ("id", "reference", "driving", "prompt", "seed", "steps", "width", "height", "fps", "alp")
REQUIRED_FIELDS = ("id", "reference", "driving")


class ManifestError(ValueError):
    """The manifest as a whole is unusable (empty, too large, required columns missing): nothing renders."""


def _strict_int(value: Any, field: str) -> Any:
    """Integers from JSON numbers or CSV digit strings; booleans, NaN and fractions are refused, never rounded."""
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an integer, got a boolean")
    if isinstance(value, float):
        if value != value or not value.is_integer():
            raise ValueError(f"{field} must be an integer, got {value!r}")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"{field} must be an integer, got {value!r}")
        return int(text)
    return value


class Job(BaseModel):
    """One validated render job (URLs already resolved against the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    reference: str
    driving: str
    prompt: str = ""
    seed: int = 42
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    alp: str | None = None
    line: int = 0
    warnings: tuple[str, ...] = ()

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        if not SAFE_ID.fullmatch(value):
            raise ValueError(
                f"id {value!r} is not a safe object name: use 1–128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("reference", "driving")
    @classmethod
    def _non_empty_url(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("URL is empty")
        return value.strip()

    @field_validator("seed", "steps", "width", "height", mode="before")
    @classmethod
    def _integers(cls, value: Any, info) -> Any:
        return _strict_int(value, info.field_name)

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int) -> int:
        if not 0 <= value < 2**63:
            raise ValueError(f"seed must be in [0, 2^63), got {value}")
        return value

    @field_validator("steps")
    @classmethod
    def _steps_range(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 1000:
            raise ValueError(f"steps must be between 1 and 1000, got {value}")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value: int | None, info) -> int | None:
        if value is not None and (value < 16 or value % 16 or value > 4096):
            raise ValueError(f"{info.field_name} must be a multiple of 16 between 16 and 4096, got {value}")
        return value

    @field_validator("alp")
    @classmethod
    def _alp_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in ALP_PRESETS:
            raise ValueError(f"alp {value!r} is not an ALP preset; choose one of {', '.join(ALP_PRESETS)}")
        return value

    @field_validator("fps", mode="before")
    @classmethod
    def _fps_number(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("fps must be a number, got a boolean")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"fps must be a number, got {value!r}") from None
        if isinstance(value, int):
            value = float(value)
        if isinstance(value, float) and not 0 < value <= 240:
            raise ValueError(f"fps must be in (0, 240], got {value}")
        return value


@dataclass(frozen=True)
class JobFailure:
    id: str | None
    line: int
    reason: str


def check_manifest_shape(records: list[ManifestRecord], manifest_url: str, limits: Limits) -> None:
    """Manifest-level checks that stop the whole run (exit 2) before any row is looked at."""
    shown = redact(manifest_url)
    if not records:
        raise ManifestError(f"manifest {shown} has no rows; add one JSON object (or CSV row) per job")
    if len(records) > limits.max_manifest_rows:
        raise ManifestError(
            f"manifest {shown} has {len(records)} rows, more than max_manifest_rows ({limits.max_manifest_rows}); "
            "split it or raise --max-manifest-rows"
        )
    parsed = [r.values for r in records if r.values is not None]
    if parsed:
        present = set().union(*parsed)
        missing = [f for f in REQUIRED_FIELDS if f not in present]
        if missing:
            raise ManifestError(
                f"manifest {shown} has no {', '.join(missing)} column(s) in any row; required columns are "
                f"{', '.join(REQUIRED_FIELDS)}"
            )


def parse_jobs(
    records: list[ManifestRecord],
    manifest_url: str,
    policy: UrlPolicy | None = None,
    limits: Limits | None = None,
) -> tuple[list[Job], list[JobFailure]]:
    """Validate every row; duplicates of an earlier id fail (the first one renders)."""
    policy = policy or UrlPolicy(local_roots=())
    limits = limits or Limits()
    jobs: list[Job] = []
    failures: list[JobFailure] = []
    seen: dict[str, int] = {}
    for record in records:
        row_id = record.values.get("id") if record.values else None
        row_id = redact(str(row_id))[:128] if row_id is not None else None
        if record.error is not None:
            failures.append(JobFailure(row_id, record.line, redact(record.error)))
            continue
        job, reason = _validate(record, manifest_url, policy, limits)
        if job is None:
            failures.append(JobFailure(row_id, record.line, redact(reason)))
        elif job.id in seen:
            failures.append(
                JobFailure(
                    job.id,
                    record.line,
                    f"line {record.line}: duplicate id {job.id!r} (first on line {seen[job.id]}); ids must be unique",
                )
            )
        else:
            seen[job.id] = record.line
            jobs.append(job)
    return jobs, failures


def _validate(record: ManifestRecord, manifest_url: str, policy: UrlPolicy, limits: Limits) -> tuple[Job | None, str]:
    raw = record.values or {}
    unknown = sorted(k for k in raw if k not in KNOWN_FIELDS)
    for key, value in raw.items():
        if isinstance(value, str):
            cap = limits.max_prompt_bytes if key == "prompt" else limits.max_field_bytes
            size = len(value.encode("utf-8", "surrogatepass"))
            if size > cap:
                flag_name = "--max-prompt-bytes" if key == "prompt" else "--max-field-bytes"
                return (
                    None,
                    f"line {record.line}: {key}: {size} bytes exceeds the limit of {cap}; "
                    f"shorten it or raise {flag_name}",
                )
    values = {k: v for k, v in raw.items() if k in KNOWN_FIELDS and v is not None and v != ""}
    try:
        for key in ("reference", "driving"):
            if isinstance(values.get(key), str) and values[key].strip():
                resolved = resolve_url(values[key].strip(), manifest_url)
                values[key] = check_input_url(resolved, field_name=key, manifest_url=manifest_url, policy=policy)
    except (UrlRefused, ValueError) as exc:
        return None, f"line {record.line}: {exc}"
    warnings = tuple(f"unknown field {k!r} ignored" for k in unknown)
    try:
        return Job(line=record.line, warnings=warnings, **values), ""
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'row'}: {_message(e)}" for e in exc.errors())
        return None, f"line {record.line}: {problems}"
    except TypeError as exc:
        return None, f"line {record.line}: {exc}"


def _message(error: dict) -> str:
    message = error["msg"]
    return message.removeprefix("Value error, ")
