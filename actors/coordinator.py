"""Per timestep: scatter each window to the worker that holds it, wait for all of them at once, blend.

The coordinator runs the pipeline's recipe (``model.pipeline_flashportrait``) with ``step_windows`` executed on
Ray actors. A window stays on one worker for the whole run (its conditioning lives there); the blend runs here
with the same ``blend_overlaps`` as the single-device pipeline, so the output is the same bits for the same seed,
whichever worker finishes first.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RaySystemError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from flashportrait.model.alp import AlpJobStats, AlpPlan, AlpWindowStats
from flashportrait.model.loading import ModelSource
from flashportrait.model.pipeline_flashportrait import (
    DECODE_CHUNK_LATENT_FRAMES,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    ProgressCallback,
    StreamingResult,
    output_frames,
    resolve_alp_plan,
)
from flashportrait.model.sampling import initial_noise
from flashportrait.model.windows import Window, WindowPlan, blend_overlaps

from .errors import BackendUnavailable
from .worker import WindowWorker, WorkerInfo


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPoolSettings:
    source: ModelSource = ModelSource()
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 1 on a GPU cluster; fractions let tests place several actors on one GPU
    torch_threads: int | None = 1
    step_timeout_s: float = 600.0  # one step of one window never legitimately takes longer
    # Unlimited restarts and call retries (Ray's idiom for model-holding actors): a step is a pure function of its
    # inputs, so a retry is safe, and step_timeout_s still bounds a worker that keeps dying.
    max_restarts: int = -1
    # One placement group reserves every worker's resources at once (gang scheduling, no half-started pool);
    # SPREAD puts workers on different nodes when it can, without pinning any actor to a node that may die.
    placement_strategy: str = "SPREAD"
    # Extra environment for the worker processes (Ray starts them from the raylet's environment, not the driver's).
    env_vars: tuple[tuple[str, str], ...] = ()
    start_timeout_s: float = 900.0  # model load included


class WorkerPool:
    """N ``WindowWorker`` actors in one placement group, each holding the model; Ray restarts a dead one."""

    def __init__(self, settings: WorkerPoolSettings):
        if settings.workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {settings.workers}")
        self.settings = settings
        bundle = {"CPU": settings.cpus_per_worker}
        if settings.gpus_per_worker:
            bundle["GPU"] = settings.gpus_per_worker
        self.placement_group = placement_group(
            [dict(bundle) for _ in range(settings.workers)], strategy=settings.placement_strategy
        )
        self._wait_placement()
        actor_cls = ray.remote(WindowWorker)
        self.actors = [
            actor_cls.options(
                num_cpus=settings.cpus_per_worker,
                num_gpus=settings.gpus_per_worker,
                max_restarts=settings.max_restarts,
                max_task_retries=settings.max_restarts,
                runtime_env={"env_vars": dict(settings.env_vars)} if settings.env_vars else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group, placement_group_bundle_index=i
                ),
            ).remote(settings.source, settings.torch_threads)
            for i in range(settings.workers)
        ]
        self.infos: list[WorkerInfo] = self._wait_ready()
        self.preset = self.infos[0].preset
        self.weights_sha256 = self.infos[0].weights_sha256

    def _wait_placement(self) -> None:
        ready, _ = ray.wait([self.placement_group.ready()], timeout=self.settings.start_timeout_s)
        if not ready:
            remove_placement_group(self.placement_group)
            raise TimeoutError(
                f"the cluster cannot place {self.settings.workers} worker(s) of {self.settings.cpus_per_worker} CPU"
                f" and {self.settings.gpus_per_worker} GPU within {self.settings.start_timeout_s:.0f} s; lower "
                "--workers or add nodes (check `ray status`)"
            )

    def _wait_ready(self) -> list[WorkerInfo]:
        try:
            return ray.get([a.info.remote() for a in self.actors], timeout=self.settings.start_timeout_s)
        except GetTimeoutError as exc:
            self.close()
            raise TimeoutError(
                f"{self.settings.workers} worker(s) did not load the model within "
                f"{self.settings.start_timeout_s:.0f} s; check the workers' logs (`ray logs`)"
            ) from exc

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        remove_placement_group(self.placement_group)


def assign_windows(windows: Sequence[Window], workers: int) -> list[list[Window]]:
    """Round-robin: windows have equal cost, so this balances work and keeps neighbours on different workers."""
    shards: list[list[Window]] = [[] for _ in range(workers)]
    for window in windows:
        shards[window.index % workers].append(window)
    return shards


@dataclass
class _DenoiseRun:
    """What the step loop over the workers returns (named: a bare tuple of six drifted once)."""

    latents: np.ndarray
    transformer_calls: int
    seconds_transformer: float  # summed over the workers
    alp_windows: list[AlpWindowStats]
    seconds_waiting: float  # on the workers' steps
    workers: int


class RayDenoiseBackend:
    """Generates one video with its windows sharded over a ``WorkerPool``."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self.preset = pool.preset
        self.weights_sha256 = pool.weights_sha256

    def stream(self, request: GenerationRequest, progress: ProgressCallback | None = None) -> StreamingResult:
        """Denoise over the workers, then stream the decode back from one worker chunk by chunk."""
        start = time.perf_counter()
        request.check(self.preset)
        plan = request.window_plan(self.preset)
        # ALP's schedule is resolved here (a planned schedule's calibration runs on the workers once per model) and
        # travels to every worker inside the conditioning inputs, so workers never decide it differently.
        alp_plan, seconds_calibration = resolve_alp_plan(request, self.preset, plan, self._calibration_run)
        run = self._denoise(request, plan, alp_plan, progress)
        denoised = time.perf_counter()
        stats = GenerationStats(
            transformer_calls=run.transformer_calls,
            windows=len(plan.windows),
            steps=request.sampling_config(self.preset).num_inference_steps,
            seconds_denoising=denoised - start,
            seconds_transformer=run.seconds_transformer,
            seconds_orchestration=max(0.0, (denoised - start) - seconds_calibration - run.seconds_waiting),
            extra={"workers": run.workers},
        )
        if alp_plan is not None:
            stats.alp = AlpJobStats.collect(alp_plan, run.alp_windows, seconds_calibration)
        chunks = self._decoded_chunks(run.latents)
        return StreamingResult(stats, output_frames(chunks, stats))

    def __call__(self, request: GenerationRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        return self.stream(request, progress).collect()

    def _decoded_chunks(self, latents: np.ndarray):
        """uint8 frame chunks from a worker's streaming decode; each chunk is copied out of the object store and its
        reference dropped at once, so the store holds about two chunks."""
        timeout = self.pool.settings.step_timeout_s
        generator = self.pool.actors[0].decode_stream.remote(latents, DECODE_CHUNK_LATENT_FRAMES)
        for ref in generator:
            try:
                chunk = ray.get(ref, timeout=timeout)
            except (RayActorError, RaySystemError, ObjectLostError) as exc:
                raise BackendUnavailable(f"the worker decoding the video died ({type(exc).__name__})") from exc
            yield np.array(chunk)  # a writable copy; the store's copy is freed with ``ref``
            del ref

    def _calibration_run(self, request: GenerationRequest, alp_plan: AlpPlan) -> AlpJobStats:
        run = self._denoise(request, request.window_plan(self.preset), alp_plan, None)
        return AlpJobStats.collect(alp_plan, run.alp_windows)

    def _denoise(
        self,
        request: GenerationRequest,
        plan: WindowPlan,
        alp_plan: AlpPlan | None,
        progress: ProgressCallback | None,
    ) -> _DenoiseRun:
        """The step loop over the workers."""
        inputs_ref = ray.put(request.conditioning_inputs(self.preset, alp_plan))
        steps = request.sampling_config(self.preset).num_inference_steps
        shards = [
            (actor, shard)
            for actor, shard in zip(self.pool.actors, assign_windows(plan.windows, len(self.pool.actors)))
            if shard
        ]
        job_key = uuid.uuid4().hex
        z = self.preset.vae["z_dim"]
        height, width = request.reference.shape[:2]
        latents = initial_noise(request.seed, (1, z, plan.num_latent_frames, height // 8, width // 8)).numpy()
        busy = 0.0
        calls, seconds_transformer = 0, 0.0
        try:
            for step in range(steps):
                refs = [
                    actor.step.remote(
                        job_key, inputs_ref, shard, step, {w.index: latents[:, :, w.start : w.stop] for w in shard}
                    )
                    for actor, shard in shards
                ]
                t0 = time.perf_counter()
                stepped, step_calls, step_seconds = self._gather(refs, job_key, step)
                calls += step_calls
                seconds_transformer += step_seconds
                busy += time.perf_counter() - t0
                latents = blend_overlaps(plan, _as_tensors(stepped)).numpy()
                if progress is not None:
                    progress(step + 1, steps)
            alp_windows = [
                w for part in ray.get([a.alp_window_stats.remote(job_key) for a, _ in shards]) for w in part
            ]
        finally:
            for actor, _ in shards:
                actor.release.remote(job_key)
        return _DenoiseRun(latents, calls, seconds_transformer, alp_windows, busy, len(shards))

    def _gather(self, refs: list, job_key: str, step: int) -> tuple[dict[int, np.ndarray], int, float]:
        """Wait on every shard at once (never one blocking get at a time) with a deadline; merged latents and the
        step's transformer calls and seconds."""
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.pool.settings.step_timeout_s)
        if pending:
            raise BackendUnavailable(
                f"job {job_key}: {len(pending)} of {len(refs)} workers did not finish step {step} within "
                f"{self.pool.settings.step_timeout_s:.0f} s"
            )
        merged: dict[int, np.ndarray] = {}
        calls, seconds = 0, 0.0
        try:
            for part in ray.get(ready):
                merged.update(part.latents)
                calls += part.transformer_calls
                seconds += part.seconds_transformer
        except (RayActorError, RaySystemError, ObjectLostError) as exc:
            raise BackendUnavailable(
                f"job {job_key}: a worker died at step {step} and could not be restarted ({type(exc).__name__})"
            ) from exc
        return merged, calls, seconds


def _as_tensors(arrays: dict[int, np.ndarray]):
    from flashportrait.model import runtime

    return runtime.tensors_from_numpy(arrays)
