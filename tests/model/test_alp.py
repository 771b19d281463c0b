"""Adaptive Latent Prediction: the forecaster's arithmetic, the schedules, the hooks and the sampler integration."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from flashportrait.model import runtime
from flashportrait.model.alp import (
    ALP_PRESETS,
    AdaptiveLatentPredictionConfig,
    AlpPlan,
    DifferenceTable,
    ProfileCache,
    StreamState,
    VariationProfile,
    fixed_full_steps,
    planned_full_steps,
    resolve_alp_config,
)
from flashportrait.model.pipeline_flashportrait import FlashPortraitPipeline, GenerationRequest
from flashportrait.model.presets import TINY
from flashportrait.model.sampling import WindowDenoiser, grid_for, initial_noise, step_windows
from flashportrait.model.transformer_flashportrait import FlashPortraitTransformer, feature_site_layout
from flashportrait.model.windows import blend_overlaps


# 1. Difference tables --------------------------------------------------------------------------------------------
def polynomial(tau: float, coefficients: list[torch.Tensor]) -> torch.Tensor:
    return sum(c * tau**k for k, c in enumerate(coefficients))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_newton_is_exact_for_polynomials_of_its_order_on_a_non_uniform_grid(order):
    g = torch.Generator().manual_seed(order)
    coefficients = [torch.randn(2, 7, 5, generator=g, dtype=torch.float64) for _ in range(order + 1)]
    table = DifferenceTable(order, "newton", torch.float64)
    for tau in (0.0, 0.7, 1.9, 4.0)[: order + 1]:  # spacings 0.7, 1.2, 2.1: far from uniform
        table.update(tau, polynomial(tau, coefficients))
    for target in (5.5, 2.5, 9.0):  # extrapolation and interpolation alike
        expected = polynomial(target, coefficients)
        torch.testing.assert_close(table.predict(target).double(), expected, rtol=1e-9, atol=1e-9)


def test_newton_in_float32_is_exact_to_float_precision_on_a_sigma_grid():
    # The σ coordinate: nodes are the (non-uniform) shifted flow-matching sigmas.
    sigmas = [1.0, 0.9615, 0.8929, 0.7692]
    coefficients = [torch.full((3, 4), 0.5), torch.full((3, 4), -2.0), torch.full((3, 4), 1.5)]
    table = DifferenceTable(2, "newton", torch.float32)
    for sigma in sigmas[:3]:
        table.update(sigma, polynomial(sigma, coefficients))
    torch.testing.assert_close(table.predict(sigmas[3]), polynomial(sigmas[3], coefficients), rtol=1e-5, atol=1e-5)


def test_taylor_form_has_its_known_bias_on_a_quadratic():
    # f(τ) = τ² on the uniform grid 0, K, 2K. TaylorSeer's recursion: Δ¹ = (f(2K) − f(K))/K = 3K, the older
    # Δ¹ = (K² − 0)/K = K, Δ² = (3K − K)/K = 2. f̂(2K + d) = 4K² + 3K·d + d² while f = 4K² + 4K·d + d²:
    # the bias is −K·d (Δ¹ is the slope at the midpoint 1.5K, not at 2K). Newton on the same nodes is exact.
    K, d = 5.0, 3.0
    taylor = DifferenceTable(2, "taylor", torch.float64)
    newton = DifferenceTable(2, "newton", torch.float64)
    for tau in (0.0, K, 2 * K):
        taylor.update(tau, torch.tensor([tau**2], dtype=torch.float64))
        newton.update(tau, torch.tensor([tau**2], dtype=torch.float64))
    truth = (2 * K + d) ** 2
    assert taylor.predict(2 * K + d).item() == pytest.approx(truth - K * d, abs=1e-9)
    assert newton.predict(2 * K + d).item() == pytest.approx(truth, abs=1e-9)


def test_order_ramps_up_while_the_history_is_short():
    table = DifferenceTable(3, "newton", torch.float32)
    table.update(0.0, torch.tensor([1.0]))
    assert table.predict(4.0).item() == 1.0  # one node: order 0, the last value
    table.update(1.0, torch.tensor([3.0]))
    assert table.predict(4.0).item() == pytest.approx(9.0)  # two nodes: the line 1 + 2τ
    assert len(table.factors) == 2


def test_gains_follow_the_paper_as_printed_and_are_clipped():
    # Two block groups with first-difference magnitudes 1 and 4 (one token, one channel): mean 2.5, so
    # r = 0.4 and 1.6, w = r^(−1/2) = 1.5811 and 0.7906; 'div' gains 1/(w·s) with s = 1: 0.6325 and 1.2649.
    config = AdaptiveLatentPredictionConfig(granularity="groups:2", gain_mode="div", cache_dtype="float32")
    state = StreamState(config, feature_site_layout("groups:2", 2))
    for site, slope in ((0, 1.0), (1, 4.0)):
        state.update(site, 0.0, torch.zeros(1, 1, 1))
        state.update(site, 1.0, torch.full((1, 1, 1), slope))
    state.set_gains(1.0)
    assert state.gains[0][0] == pytest.approx(math.sqrt(0.4), rel=1e-6)
    assert state.gains[1][0] == pytest.approx(math.sqrt(1.6), rel=1e-6)
    state.set_gains(0.1)  # 1/(w·s) = 6.3 and 12.6: clipped to gain_clip = 2
    assert state.gains == [[2.0], [2.0]]


# 2. Schedules ----------------------------------------------------------------------------------------------------
def test_planned_schedule_puts_full_steps_at_equal_shares_of_a_hand_made_profile():
    # ρ̃ = [–, .5, .5, .5, .5, 2, 2, 2, 4, 4] → cumulative C = [0, .5, 1, 1.5, 2, 4, 6, 8, 12, 16], total 16.
    # B = 4: step 0, then the first j with C_j ≥ 16·k/4 = 4, 8, 12 → j = 5, 7, 8.
    profile = [0.0, 0.5, 0.5, 0.5, 0.5, 2.0, 2.0, 2.0, 4.0, 4.0]
    assert planned_full_steps(profile, 4) == (0, 5, 7, 8)
    # A flat profile gives an even spread: C_j = j, total 9, B = 3 → C_j ≥ 3, 6 → (0, 3, 6).
    assert planned_full_steps([0.0] + [1.0] * 9, 3) == (0, 3, 6)
    # p = 0.5: √ρ̃ = [.71 ×4, 1.41 ×3, 2 ×2], C = [0, .71, 1.41, 2.12, 2.83, 4.24, 5.66, 7.07, 9.07, 11.07];
    # B = 4 → C_j ≥ 2.77, 5.54, 8.30 → j = 4, 6, 8.
    assert planned_full_steps(profile, 4, power=0.5) == (0, 4, 6, 8)
    # All the change in the last step: the shares collide and are spread backwards inside the grid.
    assert planned_full_steps([0.0] * 9 + [1.0], 4) == (0, 7, 8, 9)
    # final_full reserves the last step; warm-up 2 keeps steps 0 and 1.
    assert planned_full_steps(profile, 4, final_full=True)[-1] == 9
    assert planned_full_steps(profile, 4, warmup=2)[:2] == (0, 1)


def test_fixed_schedule_is_every_k_after_the_warm_up():
    assert fixed_full_steps(30, 5) == (0, 5, 10, 15, 20, 25)
    assert fixed_full_steps(12, 5, warmup=3) == (0, 1, 2, 7)
    assert fixed_full_steps(12, 5, final_full=True) == (0, 5, 10, 11)


def test_presets_meet_their_budgets():
    fast, balanced = ALP_PRESETS["fast"], ALP_PRESETS["balanced"]
    assert (fast.full_step_budget(30), fast.full_step_budget(50)) == (5, 8)  # ≥ 6× fewer transformer calls
    assert (balanced.full_step_budget(30), balanced.full_step_budget(50)) == (10, 15)
    assert AlpPlan.build(ALP_PRESETS["paper"], 30).full_steps == (0, 5, 10, 15, 20, 25)
    assert resolve_alp_config("off") is None and resolve_alp_config(None) is None


# 3. Bad configurations -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"order": 0}, r"order must be 1, 2 or 3, got 0; use 2"),
        ({"order": 4}, r"order must be 1, 2 or 3, got 4; use 2"),
        ({"granularity": "layers"}, r"unknown ALP granularity 'layers'; use 'stack', 'groups:G'"),
        ({"gain_mode": "times"}, r"unknown ALP gain_mode 'times'; use one of none, div, mul"),
        ({"gain_clip": 0.5}, r"gain_clip must be ≥ 1"),
    ],
)
def test_bad_configurations_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveLatentPredictionConfig(**kwargs)


def test_budget_larger_than_the_step_count_is_refused():
    with pytest.raises(ValueError, match=r"budget of 40 full steps per window exceeds num_inference_steps=30; lower"):
        AlpPlan.build(AdaptiveLatentPredictionConfig(budget=40), 30)


def test_profile_for_another_step_count_is_refused():
    profile = VariationProfile("m|s|steps=50", 50, (0.0,) + (1.0,) * 49)
    with pytest.raises(ValueError, match=r"is for 50 steps but sampling uses 30; calibrate for 30 steps"):
        AlpPlan.build(ALP_PRESETS["fast"], 30, profile)


def test_too_many_groups_and_unknown_preset_are_refused():
    with pytest.raises(ValueError, match=r"asks for 3 block groups but the transformer has 2 blocks; use at most"):
        feature_site_layout("groups:3", 2)
    with pytest.raises(ValueError, match=r"unknown ALP preset 'turbo'; choose one of off, balanced, fast, paper"):
        resolve_alp_config("turbo")


def test_profile_cache_round_trip(tmp_path):
    cache = ProfileCache(tmp_path)
    profile = VariationProfile("tiny@v1|euler|steps=3|window=5x8x8|stack", 3, (0.0, 0.25, 0.5))
    assert cache.load(profile.key) is None
    cache.store(profile)
    assert ProfileCache(tmp_path).load(profile.key) == profile


# 4. Feature sites on the transformer -----------------------------------------------------------------------------
class RecordThenForecast:
    """A FeatureCache that records a full call's features and replays them on the next (forecast) call."""

    def __init__(self):
        self.forecasting = False
        self.features: dict[int, torch.Tensor] = {}

    def record(self, site, feature):
        self.features[site] = feature.float().clone()

    def forecast(self, site):
        return self.features[site]


@pytest.mark.parametrize("granularity", ["stack", "groups:2", "block", "module"])
def test_forecasting_the_recorded_features_reproduces_the_full_call(granularity):
    torch.manual_seed(0)
    model = FlashPortraitTransformer(**TINY.transformer).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 36, 3, 8, 8, generator=g),
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=torch.randn(1, 64, 16, generator=g),
        encoder_hidden_states_image=torch.randn(1, 17, 16, generator=g),
    )
    with torch.no_grad():
        plain = model(**inputs, return_dict=False)[0]
        layout = model.enable_feature_sites(granularity)
        cache = RecordThenForecast()
        full = model(**inputs, return_dict=False, feature_cache=cache)[0]
        cache.forecasting = True
        predicted = model(**inputs, return_dict=False, feature_cache=cache)[0]
        dormant = model(**inputs, return_dict=False)[0]
    assert len(cache.features) == layout.num_sites == {"stack": 1, "groups:2": 2, "block": 2, "module": 6}[granularity]
    assert torch.equal(full, plain) and torch.equal(dormant, plain)  # recording and idle hooks change no bit
    # The live path recomputed at the same x and t plus h_end − h_start: equal up to the rounding of that difference.
    torch.testing.assert_close(predicted, plain, rtol=1e-5, atol=1e-5)


# 5. In the sampler -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline() -> FlashPortraitPipeline:
    runtime.configure_threads(1)
    return FlashPortraitPipeline.from_preset("tiny")


def request(steps: int = 30, frames: int = 25, alp=None) -> GenerationRequest:
    rng = np.random.default_rng(0)
    return GenerationRequest(
        reference=rng.integers(0, 256, (64, 48, 3), dtype=np.uint8),
        expression_features=rng.standard_normal((frames, 554)).astype(np.float32),  # 7 latent frames → 2 windows
        prompt="alp",
        seed=3,
        num_inference_steps=steps,
        alp=alp,
    )


def test_off_and_all_full_alp_equal_the_plain_sampler_bit_for_bit(pipeline, tmp_path):
    plain = pipeline(request(steps=8))
    all_full = replace(ALP_PRESETS["fast"], schedule="fixed", interval=1, cache_dtype="float32")
    recorded = pipeline(request(steps=8, alp=all_full))  # installs the hooks; every step records features
    off = pipeline(request(steps=8, alp="off"))  # hooks stay installed but idle
    assert np.array_equal(recorded.frames, plain.frames) and np.array_equal(off.frames, plain.frames)
    assert off.stats.alp is None and recorded.stats.alp.totals["predicted_steps"] == 0


def test_fast_at_30_steps_makes_at_most_5_full_steps_per_window(pipeline, tmp_path):
    result = pipeline(request(alp=replace(ALP_PRESETS["fast"], profile_dir=str(tmp_path))))
    stats = result.stats.alp
    assert len(stats.windows) == 2 and stats.profile_key and "steps=30" in stats.profile_key
    for window in stats.windows:
        assert window.full_steps <= 5 and window.full_steps + window.predicted_steps == 30
        assert window.full_step_indices == stats.planned_full_steps
        assert window.full_step_indices[0] == 0 and window.full_step_indices[-1] == 29  # first and last are full
        assert window.block_equivalents == 2 * window.full_steps  # two CFG streams
        # stack, n = 2, bf16: 3 factors × (5 frames × 4 × 3 tokens) × 24 channels × 2 B, × 2 streams = 17280 B
        assert window.state_bytes_peak == 3 * 60 * 24 * 2 * 2
        assert window.seconds_transformer_full > 0 and window.seconds_transformer_predicted > 0
    assert result.stats.transformer_calls == sum(w.block_equivalents for w in stats.windows) <= 2 * 5 * 2
    assert stats.seconds_calibration > 0 and ProfileCache(tmp_path).load(stats.profile_key).num_steps == 30
    again = pipeline(request(alp=replace(ALP_PRESETS["fast"], profile_dir=str(tmp_path))))
    assert again.stats.alp.seconds_calibration == 0 and np.array_equal(again.frames, result.frames)


def test_online_schedule_respects_its_hard_budget(pipeline):
    config = AdaptiveLatentPredictionConfig(schedule="online", budget=4, online_threshold=10.0, online_max_skip=3)
    stats = pipeline(request(steps=20, alp=config)).stats.alp
    for window in stats.windows:
        # Step 0, then the τ/ρ̃ rule (its skip is clamped to ≤ 3) until the budget of 4 is spent.
        assert window.full_steps == 4 and window.full_step_indices[0] == 0
        assert all(0 < b - a <= 3 for a, b in zip(window.full_step_indices, window.full_step_indices[1:]))


def test_windows_stepped_one_at_a_time_in_shuffled_order_give_the_same_bits(pipeline):
    """The state is per window: advancing the windows in any order (as workers finishing in any order do) and
    blending afterwards changes nothing."""
    req = request(steps=10, alp=replace(ALP_PRESETS["paper"], interval=3))
    preset = pipeline.preset
    plan = req.window_plan(preset)
    reference, _ = pipeline.denoise(req)
    inputs = req.conditioning_inputs(preset, AlpPlan.build(req.alp_config(), 10))
    denoiser = WindowDenoiser(pipeline.components, inputs, plan.windows)
    grid = grid_for(inputs.sampling)
    latents = initial_noise(req.seed, req.latent_shape(pipeline.components, plan.num_latent_frames))
    rng = random.Random(3)
    for step in range(10):
        stepped = {}
        for window in rng.sample(plan.windows, len(plan.windows)):
            stepped.update(
                step_windows(denoiser, {window.index: latents[:, :, window.start : window.stop]}, grid, step)
            )
        latents = blend_overlaps(plan, stepped)
    assert torch.equal(latents, reference)


def test_jobs_with_different_feature_sites_interleave_on_one_model(pipeline):
    """A worker may step two jobs alternately; each call re-installs its own granularity's sites."""
    requests = [
        request(steps=6, alp=replace(ALP_PRESETS["paper"], interval=2)),  # per-module sites
        request(steps=6, alp=AdaptiveLatentPredictionConfig(schedule="fixed", interval=2)),  # one stack residual
    ]
    alone = [pipeline.denoise(r)[0] for r in requests]
    preset = pipeline.preset
    jobs = []
    for req in requests:
        plan = req.window_plan(preset)
        inputs = req.conditioning_inputs(preset, AlpPlan.build(req.alp_config(), 6))
        latents = initial_noise(req.seed, req.latent_shape(pipeline.components, plan.num_latent_frames))
        jobs.append(
            [plan, WindowDenoiser(pipeline.components, inputs, plan.windows), grid_for(inputs.sampling), latents]
        )
    for step in range(6):
        for job in jobs:
            plan, denoiser, grid, latents = job
            slices = {w.index: latents[:, :, w.start : w.stop] for w in plan.windows}
            job[3] = blend_overlaps(plan, step_windows(denoiser, slices, grid, step))
    assert torch.equal(jobs[0][3], alone[0]) and torch.equal(jobs[1][3], alone[1])
