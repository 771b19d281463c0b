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
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

import flashportrait
from flashportrait.actors.cluster import RayClusterSettings, connect
from flashportrait.actors.coordinator import RayDenoiseBackend, WorkerPool, WorkerPoolSettings
from flashportrait.actors.errors import BackendUnavailable
from flashportrait.infra import storage, video_io
from flashportrait.infra.images import fit_image
from flashportrait.infra.limits import Limits
from flashportrait.infra.media_guard import MediaRejected, inspect_image, inspect_video, output_fps, sandbox_limits
from flashportrait.infra.preflight import check_run
from flashportrait.infra.redact import install_log_redaction, redact, redact_value
from flashportrait.infra.tables import read_manifest_records, write_report
from flashportrait.model.expression import get_extractor
from flashportrait.model.expression.landmark import NoFaceError, reference_face_box
from flashportrait.model.loading import resolve_local
from flashportrait.model.pipeline_flashportrait import FlashPortraitPipeline, GenerationRequest, StreamingResult

from .manifest import Job, JobFailure, ManifestError, check_manifest_shape, parse_jobs
from .publishing import Existing, JobOutputs, PublishConflict, check_existing, job_hash, publish_outputs
from .settings import RenderSettings


logger = logging.getLogger(__name__)

Backend = FlashPortraitPipeline | RayDenoiseBackend  # both: .preset, .weights_sha256, .stream(request, progress)
# Driving frames are decoded for expression extraction at most this large (the model's own size can be far too
# small to find a face in, and full 4K frames would only cost time).
EXTRACTION_MAX_SIDE = 640
# (job id, steps done, total steps): set by the CLI to drive its progress bar; None in deployments.
ProgressSink = Callable[[str, int, int], None]
progress_sink: ProgressSink | None = None


@dataclass
class RenderResult:
    id: str | None
    line: int
    status: str  # one of STATUSES
    reason: str = ""
    job_hash: str = ""
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
    alp: str = ""
    alp_full_steps: float = 0.0
    alp_predicted_steps: float = 0.0
    alp_block_equivalents: float = 0.0
    alp_state_bytes_peak: float = 0.0
    seconds_transformer: float = 0.0
    # Which model made the output: preset name and version, and the SHA-256 of every weights file it loaded.
    model_preset: str = ""
    model_version: str = ""
    weights_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: str = ""  # the row's own ("; "-joined: unknown manifest fields), a column of the report

    @classmethod
    def failed(cls, failure: JobFailure) -> RenderResult:
        return cls(failure.id, failure.line, "failed", failure.reason)

    @classmethod
    def not_run(cls, job: Job, status: str, reason: str) -> RenderResult:
        return cls(job.id, job.line, status, reason)


# done: published by this run (or found published with the same hash by a concurrent one); skipped: already
# published with the same job hash before this run; failed: the row's own inputs/parameters/outputs are at fault;
# unfinished: the cluster went away before the row ran (a re-run resumes it); cancelled: the run was stopped.
STATUSES = ("done", "skipped", "failed", "unfinished", "cancelled")
TERMINAL_FOR_MANIFEST = {"done", "skipped", "failed"}


# One job --------------------------------------------------------------------------------------------------------
def render_job(job: Job, outputs: JobOutputs, backend: Backend, settings: RenderSettings) -> RenderResult:
    """Render ``job`` and publish its video and sidecar, unless they are already published with the same hash.

    Nothing appears at either key unless it is complete (see ``flows.publishing``). The row's warnings (unknown
    manifest fields: a typo such as ``sed`` for ``seed`` renders with the default) go to the log and the result.
    """
    for warning in job.warnings:
        logger.warning("job %s (line %d): %s", job.id, job.line, warning)
    result = _render_and_publish(job, outputs, backend, settings)
    result.warnings = "; ".join(job.warnings)
    return result


def _render_and_publish(job: Job, outputs: JobOutputs, backend: Backend, settings: RenderSettings) -> RenderResult:
    started = time.perf_counter()
    preset = backend.preset
    width = job.width or preset.sampling.width
    height = job.height or preset.sampling.height
    # 0. Identity: the same job hash means the same output bits; decide skip / refuse before any work.
    fingerprints = {"reference": storage.fingerprint(job.reference), "driving": storage.fingerprint(job.driving)}
    expected_hash = job_hash(job, settings.output_parameters(), fingerprints)
    existing = check_existing(outputs, expected_hash)
    if not settings.force:
        if existing.state is Existing.SAME:
            return RenderResult(
                job.id,
                job.line,
                "skipped",
                "already published with the same job hash",
                job_hash=expected_hash,
                output=outputs.video,
                sidecar=outputs.sidecar,
            )
        if existing.state is Existing.DIFFERENT:
            raise PublishConflict(
                f"{outputs.sidecar} was published from other inputs or parameters (job hash "
                f"{existing.published_hash}, this row has {expected_hash}); re-run with --force to replace it"
            )
    with tempfile.TemporaryDirectory(prefix=f"fp-{job.id}-", dir=settings.scratch_dir) as scratch:
        scratch_dir = Path(scratch)
        # 1. Inputs: size-checked, fetched into the job's scratch directory, inspected in the sandbox.
        limits = settings.resource_limits()
        reference_path = _fetch(job.reference, scratch_dir / f"reference{_suffix(job.reference)}", "reference", limits)
        driving_path = _fetch(job.driving, scratch_dir / f"driving{_suffix(job.driving)}", "driving", limits)
        info = inspect_video(driving_path, limits)
        fps = output_fps(job.fps, info.fps, limits)  # a 240 fps source renders at 120
        _check_output_fps(fps, info.duration, limits)
        reference_pixels, reference_info = inspect_image(reference_path, scratch_dir / "reference.npy", limits)
        # 2. Driving video streamed at the job's fps (default: its own) through a sandboxed ffmpeg, at a size faces
        #    can be found in, into the expression extractor; then cut to the largest 4k+1 frame count.
        decode_report = video_io.DecodeReport() if settings.lenient_decode else None
        frames = video_io.iter_frames(
            driving_path,
            fps=fps,
            max_side=EXTRACTION_MAX_SIDE,
            max_frames=limits.max_frames,
            info=info.video_info(),
            preexec_fn=sandbox_limits(limits),
            lenient=decode_report,
        )
        features = _extractor(settings).extract(frames, source=redact(job.driving))
        features = features[: video_io.largest_4k_plus_1(len(features))]
        # 3. Reference (the sandbox's decode) fitted to the model resolution around the detected face.
        face_box = reference_face_box(reference_pixels, allow_faceless=settings.allow_faceless_reference)
        if face_box is None:
            logger.warning("job %s: no face found in the reference; using a centred crop (allowed)", job.id)
        reference = fit_image(Image.fromarray(reference_pixels), width, height, face_box=face_box)
        # 4. Denoise + decode.
        request = GenerationRequest(
            reference=reference.pixels,
            expression_features=features,
            prompt=job.prompt,
            seed=job.seed,
            num_inference_steps=job.steps or settings.steps,
            alp=job.alp or settings.alp,
        )
        deadline = started + limits.row_timeout_s
        result = backend.stream(request, progress=_job_progress(job.id, deadline, limits.row_timeout_s))
        # 5. Encode locally (faststart needs a seekable file), then publish: video, then the sidecar.
        video_path = scratch_dir / "output.mp4"
        # Frames are encoded as they are decoded (nothing holds the whole video). Output frame k is driving frame
        # k (frame 0, the reference, was dropped), so the driving audio starts at 1/fps.
        with video_io.VideoEncoder(
            video_path,
            width,
            height,
            fps,
            crf=settings.crf,
            preset=settings.encoder_preset,
            audio_source=driving_path if info.has_audio else None,
            audio_offset=1.0 / fps,
        ) as encoder:
            for chunk in result.chunks:
                check_stop()  # a stop request aborts the encode; nothing is published
                for frame in chunk:
                    encoder.write(frame)
        outcome = RenderResult(
            id=job.id,
            line=job.line,
            status="done",
            job_hash=expected_hash,
            output=outputs.video,
            sidecar=outputs.sidecar,
            frames=encoder.frames_written,
            fps=fps,
            width=width,
            height=height,
            seconds_denoising=result.stats.seconds_denoising,
            seconds_decoding=result.stats.seconds_decoding,
            seconds_orchestration=result.stats.seconds_orchestration,
            transformer_calls=result.stats.transformer_calls,
            windows=result.stats.windows,
            model_preset=backend.preset.name,
            model_version=backend.preset.version,
            weights_sha256=" ".join(f"{name}={digest}" for name, digest in sorted(backend.weights_sha256.items())),
            extra={
                "reference_crop_box": list(reference.crop_box),
                "reference_face_box": list(face_box) if face_box else None,
                "reference_padded": reference.padded,
                "driving_frames_used": int(features.shape[0]),
                "reference_normalised": reference_info.normalised,
                "driving_fps": info.fps,
                "driving_container": info.container,
                "driving_damaged": None
                if decode_report is None or not decode_report.damaged
                else {
                    "frames_kept": decode_report.frames_kept,
                    "frames_dropped": decode_report.frames_dropped,
                    "problem": decode_report.problem,
                    "decoder_errors": decode_report.decoder_errors,
                },
                **result.stats.extra,
            },
            alp=job.alp or settings.alp or "",
            alp_full_steps=_alp_total(result, "full_steps"),
            alp_predicted_steps=_alp_total(result, "predicted_steps"),
            alp_block_equivalents=_alp_total(result, "block_equivalents"),
            alp_state_bytes_peak=_alp_total(result, "state_bytes_peak"),
            seconds_transformer=result.stats.seconds_transformer,
        )
        outcome.seconds_total = time.perf_counter() - started
        published = publish_outputs(
            video_path,
            redact_value(_sidecar(job, settings, outcome, request, fingerprints, backend, result)),
            outputs,
            expected_hash,
            force=settings.force,
        )
        if published.by_concurrent_run:
            outcome.reason = "already published by a concurrent run (same job hash)"
    return outcome


def _fetch(url: str, dest: Path, field_name: str, limits: Limits) -> Path:
    """Refuse an oversized input from its size alone, before a byte of it is downloaded."""
    size = storage.size(url)
    if size > limits.max_file_bytes:
        raise MediaRejected(
            f"{field_name}: {size} bytes exceeds max_file_bytes ({limits.max_file_bytes}); shrink the file or raise "
            "--max-file-bytes"
        )
    if size == 0:
        raise MediaRejected(f"{field_name}: the file is empty")
    return storage.download(url, dest)


def _extractor(settings: RenderSettings):
    """The expression extractor; PD-FGC reads its ONNX face models and encoder from the released files."""
    name = settings.resolved_extractor
    if name == "pdfgc":
        if settings.flashportrait is None:
            raise ValueError("--extractor pdfgc needs the released files (--flashportrait URL): its models are there")
        return get_extractor("pdfgc", model_dir=resolve_local(settings.flashportrait))
    return get_extractor(name)


def _alp_total(result: StreamingResult, key: str) -> float:
    return float(result.stats.alp.totals.get(key, 0.0)) if result.stats.alp is not None else 0.0


def _suffix(url: str) -> str:
    """The URL's file extension if it is a plain one (kept so format notes can compare name and content)."""
    name = url.split("?", 1)[0].rsplit("/", 1)[-1]
    suffix = Path(name).suffix.lower()
    return suffix if suffix[1:].isalnum() and len(suffix) <= 6 else ""


def _check_output_fps(fps: float, duration: float, limits: Limits) -> None:
    if not limits.min_fps <= fps <= limits.max_fps:
        raise MediaRejected(
            f"fps: {fps:g} is outside [{limits.min_fps:g}, {limits.max_fps:g}]; set the row's fps inside the range "
            "or change --min-fps/--max-fps"
        )
    frames = int(duration * fps)
    if frames > limits.max_frames:
        raise MediaRejected(
            f"driving: {frames} frames at {fps:g} fps exceed max_frames ({limits.max_frames}); cut the video, lower "
            "the fps or raise --max-frames"
        )


class RowTimeout(TimeoutError):
    """The row ran past ``row_timeout_s``; checked after every denoising step, so a stuck row gives its time back."""


def _job_progress(job_id: str, deadline: float, timeout_s: float) -> Callable[[int, int], None]:
    """Per-step callback: feeds the CLI's progress bar and enforces the row's wall-clock limit."""
    sink = progress_sink

    def progress(done: int, total: int) -> None:
        if sink is not None:
            sink(job_id, done, total)
        check_stop()
        if done < total and time.monotonic() > deadline:
            raise RowTimeout(
                f"exceeded row_timeout_s ({timeout_s:g} s) after step {done} of {total}; lower the steps or the "
                "video length, or raise --row-timeout-s"
            )

    return progress


def _sidecar(
    job: Job,
    settings: RenderSettings,
    outcome: RenderResult,
    request: GenerationRequest,
    fingerprints: dict[str, str],
    backend: Backend,
    result: StreamingResult,
) -> dict[str, Any]:
    preset = backend.preset
    return {
        "id": job.id,
        "model": settings.model_source().describe(),
        "weights_sha256": backend.weights_sha256,
        "alp": None if result.stats.alp is None else result.stats.alp.to_dict(),
        "job_hash": outcome.job_hash,
        "inputs": fingerprints,
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
            "extractor": settings.resolved_extractor,
            "context_size": preset.sampling.context_size,
            "context_overlap": preset.sampling.context_overlap,
        },
        "result": asdict(outcome),
    }


# Backends -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def open_backend(settings: RenderSettings) -> Iterator[Backend]:
    """The in-process pipeline (workers = 0) or a pool of Ray workers that lives for the whole run."""
    source = settings.model_source()
    if settings.workers == 0:
        yield FlashPortraitPipeline.from_source(source)
        return
    cluster = connect(RayClusterSettings(address=settings.ray_address))
    # One GPU per worker on a GPU cluster (Ray sets CUDA_VISIBLE_DEVICES for it); CPU workers otherwise.
    gpus = 1.0 if cluster.gpus >= settings.workers else 0.0
    pool = WorkerPool(WorkerPoolSettings(source=source, workers=settings.workers, gpus_per_worker=gpus))
    try:
        yield RayDenoiseBackend(pool)
    finally:
        pool.close()


# Prefect --------------------------------------------------------------------------------------------------------
class RunCancelled(Exception):
    """Raised at a safe point (between rows, after a denoising step, between encoded chunks) once the process was
    asked to stop (SIGTERM, Prefect cancellation)."""


# Set by request_stop (the SIGTERM handler). A handler that raised at an arbitrary point could land inside a
# logging lock or a finaliser, where Python swallows it ("Exception ignored in …") and the run goes on; a flag checked
# at safe points always stops the run, and an upload in flight is aborted by its context manager.
_stop_requested = threading.Event()


def request_stop(signum: int | None = None, frame: object = None) -> None:
    _stop_requested.set()


def check_stop() -> None:
    if _stop_requested.is_set():
        raise RunCancelled("stop requested (SIGTERM or cancellation)")


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Route SIGTERM to ``request_stop`` for the block (Prefect's own handler raises at arbitrary points)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@task(name="read-manifest", cache_policy=NO_CACHE)
def read_manifest(manifest_url: str, settings: RenderSettings) -> tuple[list[Job], list[JobFailure]]:
    """Read and validate every row; a manifest that is unusable as a whole raises ManifestError (exit 2)."""
    limits = settings.resource_limits()
    size = storage.size(manifest_url)
    if size > limits.max_manifest_bytes:
        raise ManifestError(
            f"manifest {redact(manifest_url)} is {size} bytes, more than max_manifest_bytes "
            f"({limits.max_manifest_bytes}); split it or raise --max-manifest-bytes"
        )
    records = read_manifest_records(manifest_url)
    check_manifest_shape(records, manifest_url, limits)
    jobs, failures = parse_jobs(records, manifest_url, settings.url_policy(), limits)
    get_run_logger().info("manifest %s: %d valid job(s), %d invalid row(s)", manifest_url, len(jobs), len(failures))
    return jobs, failures


@task(name="render-job", cache_policy=NO_CACHE, task_run_name="render-{job.id}")
def render_job_task(job: Job, output_prefix: str, backend: Backend, settings: RenderSettings) -> RenderResult:
    """One row; its own failures become a failed row. A lost cluster propagates (the flow marks rows unfinished)."""
    log = get_run_logger()
    try:
        result = render_job(job, JobOutputs.under(output_prefix, job.id), backend, settings)
    except (BackendUnavailable, RunCancelled, KeyboardInterrupt):
        raise
    except Exception as exc:  # one bad job never sinks the batch; its reason goes to the report
        known = MediaRejected | NoFaceError | PublishConflict | RowTimeout
        detail = str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}"
        reason = redact(f"row {job.id!r}: {detail}")
        log.error("job %s (line %d) failed: %s", job.id, job.line, reason)
        return RenderResult(job.id, job.line, "failed", reason, warnings="; ".join(job.warnings))
    log.info("job %s: %s %s", job.id, result.status, result.reason or f"in {result.seconds_total:.1f} s")
    return result


@task(name="write-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def write_run_report(results: list[RenderResult], output_prefix: str) -> tuple[str, str]:
    rows = [redact_value(asdict(r)) for r in sorted(results, key=lambda r: r.line)]
    return write_report(rows, output_prefix)


def install_log_redaction_everywhere() -> None:
    """Secrets never reach a log line: our loggers, Prefect's console and API handlers, the root logger."""
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "flashportrait"):
        install_log_redaction(logging.getLogger(name))


MANIFEST_MARKER = "_manifest.json"


def manifest_output_prefix(output_root: str, manifest_url: str) -> str:
    """Where a bulk render puts one manifest's outputs: ``<root>/<manifest file name without extension>``."""
    name = manifest_url.rstrip("/").rsplit("/", 1)[-1]
    return storage.join_url(output_root, name.split(".", 1)[0] or name)


def is_manifest_rendered(manifest_url: str, output_prefix: str) -> bool:
    """True when a run of this exact manifest version (its fingerprint) finished every row at ``output_prefix``."""
    marker = storage.join_url(output_prefix, MANIFEST_MARKER)
    if not storage.exists(marker):
        return False
    try:
        recorded = json.loads(storage.read_bytes(marker))
    except ValueError:
        return False
    return recorded.get("fingerprint") == storage.fingerprint(manifest_url)


def _write_manifest_marker(manifest_url: str, output_prefix: str, results: list[RenderResult]) -> None:
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    marker = {
        "manifest": manifest_url,
        "fingerprint": storage.fingerprint(manifest_url),
        "rows": len(results),
        "counts": counts,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    storage.write_bytes_atomic(storage.join_url(output_prefix, MANIFEST_MARKER), json.dumps(marker).encode())


class RunSummary(BaseModel):
    manifest: str
    output_prefix: str
    done: int
    skipped: int
    failed: int
    unfinished: int
    cancelled: int
    report_parquet: str
    report_html: str
    results: list[dict[str, Any]]

    @property
    def complete(self) -> bool:
        """Every row reached done / skipped / failed (nothing left for a re-run except failures)."""
        return self.unfinished == 0 and self.cancelled == 0


def _render_rows(jobs: list[Job], output_prefix: str, settings: RenderSettings, results: list[RenderResult]) -> None:
    """Render rows in manifest order into ``results``; a lost cluster or a stop request leaves the rest unfinished /
    cancelled (appended before a stop request propagates, so the report still lists them)."""
    log = get_run_logger()
    remaining = list(jobs)
    try:
        with open_backend(settings) as backend:
            while remaining:
                check_stop()
                results.append(render_job_task(remaining[0], output_prefix, backend, settings))
                remaining.pop(0)
    except BackendUnavailable as exc:
        log.error("the render cluster is unavailable (%s); %d row(s) left unfinished", exc, len(remaining))
        results += [RenderResult.not_run(j, "unfinished", f"cluster unavailable: {exc}") for j in remaining]
    except (RunCancelled, KeyboardInterrupt):
        log.warning("run stopped; %d row(s) cancelled", len(remaining))
        results += [
            RenderResult.not_run(j, "cancelled", "the run was stopped before this row finished") for j in remaining
        ]
        raise
    return results


@flow(name="render-manifest")
def render_manifest(manifest_url: str, output_prefix: str, settings: RenderSettings | None = None) -> RunSummary:
    """Render every valid row of the manifest at ``manifest_url`` to ``output_prefix``; write the run report.

    Idempotent: rows already published with the same job hash are skipped, so a re-run after a crash renders only
    the rest, and a re-run of a finished manifest renders nothing (``settings.force`` re-renders everything).
    ``settings`` unset = the defaults with this process's ``FLASHPORTRAIT_*`` environment.
    """
    install_log_redaction_everywhere()
    log = get_run_logger()
    settings = settings or RenderSettings()
    check_run([manifest_url], output_prefix)  # credentials (no metadata-service call) and a writable output
    jobs, failures = read_manifest(manifest_url, settings)
    results = [RenderResult.failed(f) for f in failures]
    try:
        if jobs:
            with stop_on_sigterm():
                _render_rows(jobs, output_prefix, settings, results)
    finally:
        reported = {r.line for r in results}
        results += [
            RenderResult.not_run(j, "cancelled", "the run was stopped before this row started")
            for j in jobs
            if j.line not in reported
        ]
        parquet_url, html_url = write_run_report(results, output_prefix)
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    summary = RunSummary(
        manifest=manifest_url,
        output_prefix=output_prefix,
        **counts,
        report_parquet=parquet_url,
        report_html=html_url,
        results=[asdict(r) for r in sorted(results, key=lambda r: r.line)],
    )
    if summary.complete:
        _write_manifest_marker(manifest_url, output_prefix, results)
    log.info("%s; report: %s", ", ".join(f"{n} {s}" for s, n in counts.items() if n), html_url)
    return summary
