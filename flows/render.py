"""Rendering: one job end to end, and the Prefect flow that renders a whole manifest.

The path of one job (design §2): inputs opened by URL → driving video decoded at the job's fps to 4k+1 frames →
expression features → reference fitted to the model resolution → windows denoised (in-process, or sharded over
Ray workers) → frames encoded to H.264 MP4 → published atomically to ``<prefix>/<id>.mp4`` with a JSON sidecar →
a result row for the run report. Prefect runs one task per job; Ray parallelises inside a job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

import flashportrait
from flashportrait.actors.cluster import RayClusterSettings, connect
from flashportrait.actors.coordinator import RayDenoiseBackend, WorkerPool, WorkerPoolSettings
from flashportrait.infra import storage, video_io
from flashportrait.infra.images import fit_reference
from flashportrait.infra.tables import read_manifest_records, write_report
from flashportrait.model.expression import get_extractor
from flashportrait.model.pipeline_flashportrait import FlashPortraitPipeline, GenerationRequest, GenerationResult
from flashportrait.model.presets import get_preset

from .manifest import Job, JobFailure, parse_jobs


logger = logging.getLogger(__name__)

Backend = Callable[..., GenerationResult]
# (job id, steps done, total steps): set by the CLI to drive its progress bar; None in deployments.
ProgressSink = Callable[[str, int, int], None]
progress_sink: ProgressSink | None = None


class RenderSettings(BaseModel):
    """How to render; the same for every job of a run (a row may override steps, size, fps, seed, prompt)."""

    preset: str = "tiny"
    extractor: str = "pixel"
    workers: int = 2  # 0 = in-process single-device pipeline, no Ray
    ray_address: str | None = None
    steps: int | None = None
    crf: int = 18
    encoder_preset: str = "medium"
    scratch_dir: str | None = None


@dataclass
class RenderResult:
    id: str | None
    line: int
    status: str  # "done" | "failed"
    reason: str = ""
    output: str = ""
    sidecar: str = ""
    frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    seconds_total: float = 0.0
    seconds_denoising: float = 0.0
    seconds_decoding: float = 0.0
    seconds_orchestration: float = 0.0
    transformer_calls: int = 0
    windows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, failure: JobFailure) -> RenderResult:
        return cls(failure.id, failure.line, "failed", failure.reason)


# One job --------------------------------------------------------------------------------------------------------
def render_job(
    job: Job,
    output_url: str,
    sidecar_url: str,
    backend: Backend,
    settings: RenderSettings,
) -> RenderResult:
    """Render ``job`` and publish ``output_url`` + ``sidecar_url``; nothing appears at either unless it succeeds."""
    started = time.perf_counter()
    preset = get_preset(settings.preset)
    width = job.width or preset.sampling.width
    height = job.height or preset.sampling.height
    with tempfile.TemporaryDirectory(prefix=f"fp-{job.id}-", dir=settings.scratch_dir) as scratch:
        scratch_dir = Path(scratch)
        # 1. Inputs, fetched by URL into the job's scratch directory.
        reference_path = storage.download(job.reference, scratch_dir / "reference")
        driving_path = storage.download(job.driving, scratch_dir / "driving")
        # 2. Driving video at the job's fps (default: its own), truncated to 4k+1 frames, then expressions.
        info = video_io.probe_video(driving_path)
        fps = float(job.fps or info.fps)
        frames = video_io.read_frames_4k_plus_1(driving_path, fps=fps, size=(width, height))
        features = get_extractor(settings.extractor).extract(frames)
        del frames
        # 3. Reference fitted to the model resolution.
        reference = fit_reference(reference_path, width, height)
        # 4. Denoise + decode.
        request = GenerationRequest(
            reference=reference.pixels,
            expression_features=features,
            prompt=job.prompt,
            seed=job.seed,
            num_inference_steps=job.steps or settings.steps,
        )
        result = backend(request, progress=_job_progress(job.id))
        # 5. Encode locally (faststart needs a seekable file), then publish atomically.
        video_path = scratch_dir / "output.mp4"
        video_io.encode_video(video_path, iter(result.frames), fps, crf=settings.crf, preset=settings.encoder_preset)
        storage.publish_file(video_path, output_url)
        outcome = RenderResult(
            id=job.id,
            line=job.line,
            status="done",
            output=output_url,
            sidecar=sidecar_url,
            frames=int(result.frames.shape[0]),
            fps=fps,
            width=width,
            height=height,
            seconds_total=time.perf_counter() - started,
            seconds_denoising=result.stats.seconds_denoising,
            seconds_decoding=result.stats.seconds_decoding,
            seconds_orchestration=result.stats.seconds_orchestration,
            transformer_calls=result.stats.transformer_calls,
            windows=result.stats.windows,
            extra={"reference_crop_box": list(reference.crop_box), "driving_fps": info.fps, **result.stats.extra},
        )
        storage.write_bytes_atomic(
            sidecar_url, json.dumps(_sidecar(job, settings, outcome, request), indent=2).encode()
        )
    return outcome


def _job_progress(job_id: str) -> Callable[[int, int], None] | None:
    sink = progress_sink
    if sink is None:
        return None
    return lambda done, total: sink(job_id, done, total)


def _sidecar(job: Job, settings: RenderSettings, outcome: RenderResult, request: GenerationRequest) -> dict[str, Any]:
    preset = get_preset(settings.preset)
    return {
        "id": job.id,
        "flashportrait_version": flashportrait.__version__,
        "created_at": datetime.now(UTC).isoformat(),
        "model_preset": preset.name,
        "model_version": preset.version,
        "model_notes": preset.notes,
        "parameters": {
            "reference": job.reference,
            "driving": job.driving,
            "prompt": job.prompt,
            "seed": job.seed,
            "steps": request.sampling_config(preset).num_inference_steps,
            "width": outcome.width,
            "height": outcome.height,
            "fps": outcome.fps,
            "extractor": settings.extractor,
            "context_size": preset.sampling.context_size,
            "context_overlap": preset.sampling.context_overlap,
        },
        "result": asdict(outcome),
    }


# Backends -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def open_backend(settings: RenderSettings) -> Iterator[Backend]:
    """The in-process pipeline (workers = 0) or a pool of Ray workers that lives for the whole run."""
    if settings.workers == 0:
        yield FlashPortraitPipeline.from_preset(settings.preset)
        return
    connect(RayClusterSettings(address=settings.ray_address))
    pool = WorkerPool(WorkerPoolSettings(preset=settings.preset, workers=settings.workers))
    try:
        yield RayDenoiseBackend(pool)
    finally:
        pool.close()


# Prefect --------------------------------------------------------------------------------------------------------
@task(name="read-manifest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def read_manifest(manifest_url: str) -> tuple[list[Job], list[JobFailure]]:
    records = read_manifest_records(manifest_url)
    jobs, failures = parse_jobs(records, manifest_url)
    get_run_logger().info("manifest %s: %d valid job(s), %d invalid row(s)", manifest_url, len(jobs), len(failures))
    return jobs, failures


@task(name="render-job", cache_policy=NO_CACHE, task_run_name="render-{job.id}")
def render_job_task(job: Job, output_prefix: str, backend: Backend, settings: RenderSettings) -> RenderResult:
    log = get_run_logger()
    output_url = storage.join_url(output_prefix, f"{job.id}.mp4")
    sidecar_url = storage.join_url(output_prefix, f"{job.id}.json")
    try:
        result = render_job(job, output_url, sidecar_url, backend, settings)
    except Exception as exc:  # one bad job never sinks the batch; its reason goes to the report
        log.error("job %s (line %d) failed: %s", job.id, job.line, exc)
        return RenderResult(job.id, job.line, "failed", f"{type(exc).__name__}: {exc}")
    log.info("job %s: %d frames in %.1f s → %s", job.id, result.frames, result.seconds_total, result.output)
    return result


@task(name="write-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def write_run_report(results: list[RenderResult], output_prefix: str) -> tuple[str, str]:
    rows = [asdict(r) for r in sorted(results, key=lambda r: r.line)]
    return write_report(rows, output_prefix)


class RunSummary(BaseModel):
    manifest: str
    output_prefix: str
    done: int
    failed: int
    report_parquet: str
    report_html: str
    results: list[dict[str, Any]]


@flow(name="render-manifest")
def render_manifest(
    manifest_url: str,
    output_prefix: str,
    preset: str = "tiny",
    workers: int = 2,
    ray_address: str | None = None,
    extractor: str = "pixel",
    steps: int | None = None,
) -> RunSummary:
    """Render every valid row of the manifest at ``manifest_url`` to ``output_prefix``; write the run report."""
    log = get_run_logger()
    settings = RenderSettings(
        preset=preset, workers=workers, ray_address=ray_address, extractor=extractor, steps=steps
    )
    jobs, failures = read_manifest(manifest_url)
    results = [RenderResult.failed(f) for f in failures]
    if jobs:
        with open_backend(settings) as backend:
            for job in jobs:
                results.append(render_job_task(job, output_prefix, backend, settings))
    parquet_url, html_url = write_run_report(results, output_prefix)
    done = sum(r.status == "done" for r in results)
    log.info("rendered %d of %d row(s); report: %s", done, len(results), html_url)
    return RunSummary(
        manifest=manifest_url,
        output_prefix=output_prefix,
        done=done,
        failed=len(results) - done,
        report_parquet=parquet_url,
        report_html=html_url,
        results=[asdict(r) for r in sorted(results, key=lambda r: r.line)],
    )
