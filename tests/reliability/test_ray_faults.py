"""Ray faults: a worker SIGKILLed mid-video is restarted and the video comes out bit-identical; a pool whose
worker cannot come back raises BackendUnavailable (the flow then leaves rows unfinished)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from flashportrait.actors.coordinator import RayDenoiseBackend, WorkerPool, WorkerPoolSettings
from flashportrait.actors.errors import BackendUnavailable
from flashportrait.model.pipeline_flashportrait import GenerationRequest


pytestmark = pytest.mark.slow


def request() -> GenerationRequest:
    rng = np.random.default_rng(11)
    return GenerationRequest(
        reference=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        expression_features=rng.standard_normal((41, 554)).astype(np.float32),  # 3 windows
        prompt="fault",
        seed=5,
        num_inference_steps=4,
    )


def test_actor_killed_mid_step_restarts_and_output_is_identical(ray_cluster):
    pool = WorkerPool(WorkerPoolSettings(workers=2, torch_threads=1, max_restarts=2))
    try:
        backend = RayDenoiseBackend(pool)
        clean = backend(request())
        victim = pool.infos[1].pid
        killed = []

        def kill_after_first_step(done: int, total: int) -> None:
            if done == 1 and not killed:
                os.kill(victim, signal.SIGKILL)  # the worker dies between steps; its windows' state is lost
                killed.append(victim)

        faulty = backend(request(), progress=kill_after_first_step)
        assert killed == [victim]
        import ray

        new_pid = ray.get(pool.actors[1].info.remote(), timeout=120).pid
        assert new_pid != victim  # Ray restarted the actor (a new process) and the retried step rebuilt its state
        assert np.array_equal(faulty.frames, clean.frames)
        assert faulty.stats.transformer_calls == clean.stats.transformer_calls
    finally:
        pool.close()


def test_worker_that_cannot_restart_makes_the_backend_unavailable(ray_cluster):
    pool = WorkerPool(WorkerPoolSettings(workers=2, torch_threads=1, max_restarts=0, step_timeout_s=60))
    try:
        backend = RayDenoiseBackend(pool)
        victim = pool.infos[0].pid

        def kill(done: int, total: int) -> None:
            if done == 1:
                os.kill(victim, signal.SIGKILL)

        with pytest.raises(BackendUnavailable, match="a worker died at step 1 and could not be restarted"):
            backend(request(), progress=kill)
    finally:
        pool.close()


def test_broken_but_alive_worker_exits_and_is_replaced(ray_cluster, tmp_path):
    """A CUDA-style error leaves the worker alive but its device unusable: it must exit so Ray replaces it, and the
    retried step on the fresh actor gives the same bits."""
    from flashportrait.actors.worker import FAULT_MARKER_ENV

    marker = tmp_path / "device-error-injected"
    clean_pool = WorkerPool(WorkerPoolSettings(workers=1, torch_threads=1))
    try:
        clean = RayDenoiseBackend(clean_pool)(request())
    finally:
        clean_pool.close()
    pool = WorkerPool(WorkerPoolSettings(workers=1, torch_threads=1, env_vars=((FAULT_MARKER_ENV, str(marker)),)))
    try:
        before = pool.infos[0].pid
        faulty = RayDenoiseBackend(pool)(request())
        import ray

        after = ray.get(pool.actors[0].info.remote(), timeout=120).pid
    finally:
        pool.close()
    assert marker.exists() and after != before  # the error happened and the actor process was replaced
    assert np.array_equal(faulty.frames, clean.frames)
