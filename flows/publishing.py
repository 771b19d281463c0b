"""Publish, skip and resume: the one design behind idempotent re-runs, concurrent runs and crash recovery.

A job's outputs live at keys derived from its id: ``<prefix>/<id>.mp4`` and ``<prefix>/<id>.json`` (the sidecar).
Its **job hash** is a SHA-256 over everything that decides the output bits (inputs' content fingerprints, every
parameter, the model preset and version), so "the same job" has a precise meaning.

Publishing is two conditional creates, in order:

1. the video, with ``If-None-Match: *`` (S3) / an atomic link (local), carrying the job hash in its metadata;
2. the sidecar, the same way — the sidecar is the commit record: a job is *done* exactly when its sidecar exists.

Consequences, each tested:

- **Re-run**: a row whose sidecar holds the same job hash is ``skipped`` without any work; a different hash fails
  the row ("published from other inputs/parameters; --force to replace") rather than silently overwrite.
- **Crash between the two creates** (video, no sidecar): the row renders again; the video's conditional create
  finds the key taken, its metadata shows the same hash (deterministic renders give the same bits), and the
  sidecar is written. Local files carry no metadata; there a video without a sidecar is replaced.
- **Two runs at once**: both may render, only one create per key wins; the loser finds the same hash and reports
  the row ``done (already published by a concurrent run)``; contents never mix.
- **``--force``**: plain (non-conditional) atomic writes replace both objects.
- **A failure anywhere** before the sidecar's create leaves at most a complete video (never a partial object), and
  the row is retried in full on the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from flashportrait.infra import storage

from .manifest import Job


logger = logging.getLogger(__name__)

JOB_HASH_METADATA_KEY = "flashportrait-job-hash"
CONFLICT_SETTLE_S = 2.0


@dataclass(frozen=True)
class JobOutputs:
    video: str
    sidecar: str

    @classmethod
    def under(cls, prefix: str, job_id: str) -> JobOutputs:
        return cls(storage.join_url(prefix, f"{job_id}.mp4"), storage.join_url(prefix, f"{job_id}.json"))


# The job hash's schema. Rule for growing the settings without invalidating published outputs: a new setting or
# manifest field gets a default that reproduces the old behaviour, and default-valued fields are left out of the hash,
# so every earlier hash stays the same. Bump this (which re-renders everything once) only when the meaning of an
# existing field changes or a default's output changes.
JOB_HASH_SCHEMA = 2
# Row fields that do not decide the output bits.
_NOT_HASHED = {"line", "id", "warnings"}


def job_hash(job: Job, run_parameters: dict[str, Any], fingerprints: dict[str, str]) -> str:
    """SHA-256 of the canonical JSON of the schema version, the job's fields set away from their defaults, the run's
    output-relevant parameters (:meth:`RenderSettings.output_parameters`: also default-free) and the inputs'
    identities."""
    payload = {
        "schema": JOB_HASH_SCHEMA,
        "job": job.model_dump(exclude=_NOT_HASHED, exclude_defaults=True),
        "run": run_parameters,
        "inputs": fingerprints,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Existing(Enum):
    NONE = "none"  # nothing published: render
    SAME = "same"  # done with the same job hash: skip
    DIFFERENT = "different"  # done from other inputs/parameters: refuse unless --force
    INCOMPLETE = "incomplete"  # a video without its sidecar (a crash between the two creates): render again


@dataclass(frozen=True)
class ExistingOutputs:
    state: Existing
    published_hash: str | None = None


def check_existing(outputs: JobOutputs, expected_hash: str) -> ExistingOutputs:
    if storage.exists(outputs.sidecar):
        published = _sidecar_hash(outputs.sidecar)
        state = Existing.SAME if published == expected_hash else Existing.DIFFERENT
        return ExistingOutputs(state, published)
    if storage.exists(outputs.video):
        return ExistingOutputs(Existing.INCOMPLETE, storage.object_metadata(outputs.video).get(JOB_HASH_METADATA_KEY))
    return ExistingOutputs(Existing.NONE)


class PublishConflict(RuntimeError):
    """The final key holds another job's output (a different job hash); nothing was overwritten."""


@dataclass(frozen=True)
class PublishOutcome:
    video_written: bool
    sidecar_written: bool

    @property
    def by_concurrent_run(self) -> bool:
        return not self.sidecar_written


def publish_outputs(
    video_path: Path, sidecar: dict[str, Any], outputs: JobOutputs, expected_hash: str, *, force: bool
) -> PublishOutcome:
    """Publish video then sidecar as conditional creates (plain atomic replaces with ``force``)."""
    metadata = {JOB_HASH_METADATA_KEY: expected_hash}
    video_written = _create(
        outputs.video,
        expected_hash,
        force,
        lambda exclusive: storage.publish_file(video_path, outputs.video, exclusive=exclusive, metadata=metadata),
    )
    body = json.dumps(sidecar, indent=2, sort_keys=True).encode()
    sidecar_written = _create(
        outputs.sidecar,
        expected_hash,
        force,
        lambda exclusive: storage.write_bytes_atomic(outputs.sidecar, body, exclusive=exclusive, metadata=metadata),
    )
    return PublishOutcome(video_written, sidecar_written)


def _create(url: str, expected_hash: str, force: bool, write: Callable[[bool], None]) -> bool:
    """Run ``write`` as a conditional create; a taken key is fine only if it holds the same job hash."""
    if force:
        write(False)
        return True
    try:
        write(True)
        return True
    except FileExistsError:
        published = _published_hash(url)
    except OSError as error:
        if "ConditionalRequestConflict" not in str(error) and "409" not in str(error):
            raise
        # S3 answers 409 when another conditional write to the key is in flight: let it land, then compare.
        time.sleep(CONFLICT_SETTLE_S)
        published = _published_hash(url) if storage.exists(url) else None
        if published is None:
            raise PublishConflict(
                f"{url}: a concurrent conditional write was in flight and did not land; re-run the row"
            ) from error
    return _accept_existing(url, published, expected_hash, write)


def _accept_existing(url: str, published: str | None, expected_hash: str, write: Callable[[bool], None]) -> bool:
    """A taken key is fine only if it holds this job's hash; a metadata-less local video is a leftover to replace."""
    if published == expected_hash:
        logger.info("%s already holds this job's output (job hash %s…)", url, expected_hash[:12])
        return False
    if published is None and not url.endswith(".json") and storage.is_local(url):
        # A local video carries no metadata: it is a leftover of a run that died before its sidecar
        # (the caller only renders when the sidecar is missing), so replace it.
        write(False)
        return True
    raise PublishConflict(
        f"{url} already holds output of job hash {published or 'unknown'}, not {expected_hash}; it was "
        "published from other inputs or parameters. Re-run with --force to replace it."
    )


def _published_hash(url: str) -> str | None:
    if url.endswith(".json"):
        return _sidecar_hash(url)
    return storage.object_metadata(url).get(JOB_HASH_METADATA_KEY)


def _sidecar_hash(url: str) -> str | None:
    try:
        return json.loads(storage.read_bytes(url)).get("job_hash")
    except (ValueError, AttributeError):
        logger.warning("sidecar %s is not a JSON object; treating its job as unknown", url)
        return None
