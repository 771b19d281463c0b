"""ALP on Ray workers gives the single-device result bit for bit, in any worker placement and completion order."""

from __future__ import annotations

import random
import uuid
from dataclasses import replace

import numpy as np
import pytest
import ray

from flashportrait.actors.coordinator import RayDenoiseBackend, WorkerPool, WorkerPoolSettings
from flashportrait.model import runtime
from flashportrait.model.alp import ALP_PRESETS, AlpPlan
from flashportrait.model.pipeline_flashportrait import FlashPortraitPipeline, GenerationRequest, resolve_alp_plan
from flashportrait.model.presets import get_preset
from flashportrait.model.sampling import initial_noise
from flashportrait.model.windows import blend_overlaps


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool(ray_cluster):
    pool = WorkerPool(WorkerPoolSettings(workers=2, cpus_per_worker=1, torch_threads=1))
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def single() -> FlashPortraitPipeline:
    # Same torch thread count as the workers: CPU GEMM blocking (and so rounding) depends on it.
    runtime.configure_threads(1)
    return FlashPortraitPipeline.from_preset("tiny")


def make_request(alp) -> GenerationRequest:
    rng = np.random.default_rng(5)
    return GenerationRequest(
        reference=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        expression_features=rng.standard_normal((41, 554)).astype(np.float32),  # 11 latent frames → 3 windows
        prompt="distributed",
        seed=123,
        num_inference_steps=12,
        alp=alp,
    )


def test_planned_alp_on_two_workers_equals_single_device(pool, single, tmp_path):
    # The distributed run calibrates the profile on a worker (cold cache); the single-device run reads it back.
    config = replace(ALP_PRESETS["fast"], budget=4, profile_dir=str(tmp_path))
    distributed = RayDenoiseBackend(pool)(make_request(config))
    local = single(make_request(config))
    assert np.array_equal(distributed.frames, local.frames)
    assert distributed.stats.alp.seconds_calibration > 0 and local.stats.alp.seconds_calibration == 0
    d_windows, l_windows = distributed.stats.alp.windows, local.stats.alp.windows
    assert [w.window for w in d_windows] == [0, 1, 2]
    for d, s in zip(d_windows, l_windows):
        assert (d.full_steps, d.predicted_steps, d.full_step_indices) == (
            s.full_steps,
            s.predicted_steps,
            s.full_step_indices,
        )
        assert d.full_steps == 4 and d.predicted_steps == 8 and d.state_bytes_peak == s.state_bytes_peak > 0
    # 4 full steps × 3 windows × 2 CFG streams
    assert distributed.stats.transformer_calls == local.stats.transformer_calls == 24


def test_online_paper_module_alp_two_workers_equals_single_device(pool, single):
    # online (per-window decisions from each window's own state) and the per-module paper reading need no profile.
    config = replace(ALP_PRESETS["paper"], schedule="online", online_threshold=0.3, budget=6)
    distributed = RayDenoiseBackend(pool)(make_request(config))
    local = single(make_request(config))
    assert np.array_equal(distributed.frames, local.frames)
    assert [w.full_step_indices for w in distributed.stats.alp.windows] == [
        w.full_step_indices for w in local.stats.alp.windows
    ]


def test_shuffled_placement_and_completion_order_give_the_same_bits(pool, single):
    """Drive the workers directly: each step sends the shards in a random order, with the windows placed on the
    other worker than the round-robin default, and merges the results in a random completion order."""
    preset = get_preset("tiny")
    request = make_request(replace(ALP_PRESETS["fast"], schedule="fixed", interval=3, order=3))
    plan = request.window_plan(preset)
    alp_plan, _ = resolve_alp_plan(request, preset, plan, calibrate=None)
    assert isinstance(alp_plan, AlpPlan) and alp_plan.full_steps == (0, 3, 6, 9, 11)
    inputs_ref = ray.put(request.conditioning_inputs(preset, alp_plan))
    shards = [(pool.actors[1], [plan.windows[0], plan.windows[2]]), (pool.actors[0], [plan.windows[1]])]
    rng = random.Random(7)
    job_key = uuid.uuid4().hex
    latents = initial_noise(request.seed, (1, 16, plan.num_latent_frames, 8, 8)).numpy()
    try:
        for step in range(request.num_inference_steps):
            order = rng.sample(shards, len(shards))
            refs = []
            for actor, shard in order:
                windows = rng.sample(shard, len(shard))
                refs.append(
                    actor.step.remote(
                        job_key, inputs_ref, shard, step, {w.index: latents[:, :, w.start : w.stop] for w in windows}
                    )
                )
            stepped = {}
            for ref in rng.sample(refs, len(refs)):
                stepped.update(ray.get(ref).latents)
            latents = blend_overlaps(plan, runtime.tensors_from_numpy(stepped)).numpy()
    finally:
        for actor, _ in shards:
            actor.release.remote(job_key)
    local, stats = single.denoise(request)
    assert np.array_equal(latents, local.numpy())
    assert [w.full_step_indices for w in stats.alp.windows] == [(0, 3, 6, 9, 11)] * 3
