"""WindowWorker: a Ray actor that holds the model on its device and advances the windows it is sent.

Thin by design: it loads the model once, keeps each job's window conditioning between steps, and calls
``model.sampling.step_windows`` — the same function the single-device pipeline calls. Every call carries a
reference to the job's conditioning inputs, so a restarted actor (Ray ``max_restarts``) rebuilds what it lost on
its first retried call and the retry returns the same bits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import ray

from flashportrait.model.alp import AlpWindowStats
from flashportrait.model.loading import ModelSource
from flashportrait.model.pipeline_flashportrait import FlashPortraitPipeline
from flashportrait.model.presets import ModelPreset
from flashportrait.model.sampling import JobConditioningInputs, WindowDenoiser, grid_for, step_windows
from flashportrait.model.vae_streaming import iter_decode_latents
from flashportrait.model.windows import Window


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    node_id: str
    device: str
    preset: ModelPreset  # as built (for released files: the sizes read from them)
    weights_sha256: dict[str, str]


# Fault injection for the reliability tests (a device error cannot be produced on a CPU): when this variable names
# a marker file that does not exist yet, the next step creates it and fails with a CUDA-style error — once per
# marker, so the restarted actor proceeds. Unset in production.
FAULT_MARKER_ENV = "FLASHPORTRAIT_INJECT_DEVICE_ERROR_ONCE"


def _injected_device_fault(step_index: int) -> None:
    marker = os.environ.get(FAULT_MARKER_ENV)
    if marker and step_index >= 1:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by the test)")


@dataclass(frozen=True)
class StepResult:
    latents: dict[int, np.ndarray]  # window index → stepped latents
    transformer_calls: int
    seconds_transformer: float = 0.0


class WindowWorker:
    """Wrapped with ``ray.remote`` by ``actors.coordinator.WorkerPool`` (resources and restarts set there)."""

    def __init__(self, source: ModelSource, torch_threads: int | None = None) -> None:
        from flashportrait.model import runtime

        runtime.configure_threads(torch_threads)
        gpu_ids = ray.get_gpu_ids()
        self.device = "cuda" if gpu_ids and runtime.cuda_available() else "cpu"
        self.pipeline = FlashPortraitPipeline.from_source(source)
        self.pipeline.components.to(self.device)
        self.source = source
        self._jobs: dict[str, tuple[WindowDenoiser, object]] = {}

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            os.getpid(),
            ray.get_runtime_context().get_node_id(),
            self.device,
            self.pipeline.preset,
            self.pipeline.weights_sha256,
        )

    def _job(self, job_key: str, inputs: JobConditioningInputs, windows: list[Window]):
        if job_key not in self._jobs:
            denoiser = WindowDenoiser(self.pipeline.components, inputs, windows)
            grid = grid_for(inputs.sampling)
            self._jobs[job_key] = (denoiser, grid)
        return self._jobs[job_key]

    def step(
        self,
        job_key: str,
        inputs: JobConditioningInputs,
        windows: list[Window],
        step_index: int,
        window_latents: dict[int, np.ndarray],
    ) -> StepResult:
        """Advance this worker's windows by one step; latents travel as numpy arrays (zero-copy in the store).

        The step's transformer calls come back with it, so the job's count survives a restart of this actor."""
        from flashportrait.model import runtime

        denoiser, grid = self._job(job_key, inputs, windows)
        calls_before, seconds_before = denoiser.transformer_calls, denoiser.seconds_transformer
        try:
            _injected_device_fault(step_index)
            stepped = step_windows(denoiser, runtime.tensors_from_numpy(window_latents), grid, step_index)
        except RuntimeError as exc:
            if runtime.is_fatal_device_error(exc):
                # A CUDA error or OOM leaves the device unusable; exit so Ray restarts a clean actor.
                logger.error("fatal device error in job %s step %d: %s; exiting for restart", job_key, step_index, exc)
                os._exit(1)
            raise
        return StepResult(
            {k: v.numpy() for k, v in stepped.items()},
            denoiser.transformer_calls - calls_before,
            denoiser.seconds_transformer - seconds_before,
        )

    def alp_window_stats(self, job_key: str) -> list[AlpWindowStats]:
        """ALP's per-window statistics for the windows this worker advanced (empty without ALP)."""
        job = self._jobs.get(job_key)
        return job[0].alp_window_stats() if job else []

    @ray.method(_generator_backpressure_num_objects=2)
    def decode_stream(self, latents: np.ndarray, chunk_latent_frames: int):
        """Decoded uint8 frame chunks, streamed back as they are made (Ray pauses this generator while two chunks
        are unconsumed, so the object store holds about two chunks, not the video)."""
        from flashportrait.model import runtime

        yield from iter_decode_latents(
            self.pipeline.components, runtime.tensor_from_numpy(latents), chunk_latent_frames=chunk_latent_frames
        )

    def release(self, job_key: str) -> bool:
        job = self._jobs.pop(job_key, None)
        if job is not None:
            job[0].release()
        return job is not None
