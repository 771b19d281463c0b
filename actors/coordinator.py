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
from ray.exceptions import GetTimeoutError, RayActorError

from flashportrait.model.alp import AlpJobStats, AlpPlan, AlpWindowStats
from flashportrait.model.pipeline_flashportrait import (
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    ProgressCallback,
    resolve_alp_plan,
)
from flashportrait.model.presets import get_preset
from flashportrait.model.sampling import initial_noise
from flashportrait.model.windows import Window, WindowPlan, blend_overlaps

from .worker import WindowWorker, WorkerInfo


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPoolSettings:
    preset: str = "tiny"
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 1 on a GPU cluster; fractions let tests place several actors on one GPU
    torch_threads: int | None = 1
    step_timeout_s: float = 600.0  # one step of one window never legitimately takes longer
    max_restarts: int = 3


class WorkerPool:
    """N ``WindowWorker`` actors, each holding the model; restarted by Ray if their process dies."""

    def __init__(self, settings: WorkerPoolSettings):
        if settings.workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {settings.workers}")
        self.settings = settings
        actor_cls = ray.remote(WindowWorker).options(
            num_cpus=settings.cpus_per_worker,
            num_gpus=settings.gpus_per_worker,
            max_restarts=settings.max_restarts,
            max_task_retries=settings.max_restarts,
        )
        self.actors = [actor_cls.remote(settings.preset, settings.torch_threads) for _ in range(settings.workers)]
        self.infos: list[WorkerInfo] = self._wait_ready()

    def _wait_ready(self) -> list[WorkerInfo]:
        try:
            return ray.get([a.info.remote() for a in self.actors], timeout=self.settings.step_timeout_s)
        except GetTimeoutError as exc:
            raise TimeoutError(
                f"{self.settings.workers} worker(s) did not start within {self.settings.step_timeout_s:.0f} s; the "
                f"cluster may lack the resources asked for ({self.settings.cpus_per_worker} CPU, "
                f"{self.settings.gpus_per_worker} GPU each): check `ray status`"
            ) from exc

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def assign_windows(windows: Sequence[Window], workers: int) -> list[list[Window]]:
    """Round-robin: windows have equal cost, so this balances work and keeps neighbours on different workers."""
    shards: list[list[Window]] = [[] for _ in range(workers)]
    for window in windows:
        shards[window.index % workers].append(window)
    return shards


class RayDenoiseBackend:
    """Generates one video with its windows sharded over a ``WorkerPool``."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self.preset = get_preset(pool.settings.preset)

    def __call__(self, request: GenerationRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        start = time.perf_counter()
        request.check(self.preset)
        plan = request.window_plan(self.preset)
        # ALP's schedule is resolved here (a planned schedule's calibration runs on the workers once per model) and
        # travels to every worker inside the conditioning inputs, so workers never decide it differently.
        alp_plan, seconds_calibration = resolve_alp_plan(request, self.preset, plan, self._calibration_run)
        latents, calls, alp_windows, busy, workers = self._denoise(request, plan, alp_plan, progress)
        denoised = time.perf_counter()
        frames = ray.get(self.pool.actors[0].decode.remote(latents), timeout=self.pool.settings.step_timeout_s)
        stats = GenerationStats(
            transformer_calls=calls,
            windows=len(plan.windows),
            steps=request.sampling_config(self.preset).num_inference_steps,
            seconds_denoising=denoised - start,
            seconds_decoding=time.perf_counter() - denoised,
            seconds_orchestration=max(0.0, (denoised - start) - seconds_calibration - busy),
            extra={"workers": workers},
        )
        if alp_plan is not None:
            stats.alp = AlpJobStats.collect(alp_plan, alp_windows, seconds_calibration)
        return GenerationResult(frames[1:], stats)

    def _calibration_run(self, request: GenerationRequest, alp_plan: AlpPlan) -> AlpJobStats:
        _, _, alp_windows, _, _ = self._denoise(request, request.window_plan(self.preset), alp_plan, None)
        return AlpJobStats.collect(alp_plan, alp_windows)

    def _denoise(
        self,
        request: GenerationRequest,
        plan: WindowPlan,
        alp_plan: AlpPlan | None,
        progress: ProgressCallback | None,
    ) -> tuple[np.ndarray, int, list[AlpWindowStats], float, int]:
        """The step loop; returns (latents, transformer calls, ALP window stats, seconds waiting on workers,
        workers)."""
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
        try:
            for step in range(steps):
                refs = [
                    actor.step.remote(
                        job_key, inputs_ref, shard, step, {w.index: latents[:, :, w.start : w.stop] for w in shard}
                    )
                    for actor, shard in shards
                ]
                t0 = time.perf_counter()
                stepped = self._gather(refs, job_key, step)
                busy += time.perf_counter() - t0
                latents = blend_overlaps(plan, _as_tensors(stepped)).numpy()
                if progress is not None:
                    progress(step + 1, steps)
            calls = sum(ray.get([actor.transformer_calls.remote(job_key) for actor, _ in shards]))
            alp_windows = [
                w for part in ray.get([a.alp_window_stats.remote(job_key) for a, _ in shards]) for w in part
            ]
        finally:
            for actor, _ in shards:
                actor.release.remote(job_key)
        return latents, calls, alp_windows, busy, len(shards)

    def _gather(self, refs: list, job_key: str, step: int) -> dict[int, np.ndarray]:
        """Wait on every shard at once (never one blocking get at a time) with a deadline."""
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.pool.settings.step_timeout_s)
        if pending:
            raise TimeoutError(
                f"job {job_key}: {len(pending)} of {len(refs)} workers did not finish step {step} within "
                f"{self.pool.settings.step_timeout_s:.0f} s"
            )
        merged: dict[int, np.ndarray] = {}
        try:
            for part in ray.get(ready):
                merged.update(part)
        except RayActorError as exc:
            raise RuntimeError(
                f"job {job_key}: a worker died at step {step} and could not be restarted: {exc}"
            ) from exc
        return merged


def _as_tensors(arrays: dict[int, np.ndarray]):
    from flashportrait.model import runtime

    return runtime.tensors_from_numpy(arrays)
