"""Windows sharded over Ray worker actors give the single-device result, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from flashportrait.actors.coordinator import RayDenoiseBackend, WorkerPool, WorkerPoolSettings, assign_windows
from flashportrait.model import runtime
from flashportrait.model.pipeline_flashportrait import FlashPortraitPipeline, GenerationRequest
from flashportrait.model.windows import plan_windows


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool(ray_cluster):
    pool = WorkerPool(WorkerPoolSettings(workers=2, cpus_per_worker=1, torch_threads=1))
    yield pool
    pool.close()


def make_request() -> GenerationRequest:
    rng = np.random.default_rng(5)
    return GenerationRequest(
        reference=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        expression_features=rng.standard_normal((41, 554)).astype(np.float32),  # 11 latent frames → 3 windows
        prompt="distributed",
        seed=123,
        num_inference_steps=3,
    )


def test_round_robin_balances_windows():
    plan = plan_windows(30, 5, 2)
    shards = assign_windows(plan.windows, 2)
    assert [len(s) for s in shards] == [5, 5]
    assert sorted(w.index for s in shards for w in s) == list(range(10))


def test_two_workers_equal_single_device(pool):
    assert {info.pid for info in pool.infos} and len({info.pid for info in pool.infos}) == 2
    distributed = RayDenoiseBackend(pool)(make_request())
    # Same torch thread count as the workers: CPU GEMM blocking (and so rounding) depends on it.
    runtime.configure_threads(1)
    single = FlashPortraitPipeline.from_preset("tiny")(make_request())
    assert distributed.stats.windows == 3 and distributed.stats.extra["workers"] == 2
    assert distributed.stats.transformer_calls == single.stats.transformer_calls == 3 * 3 * 2
    assert distributed.stats.seconds_transformer > 0 and single.stats.seconds_transformer > 0  # summed over workers
    assert np.array_equal(distributed.frames, single.frames)
