"""Window planner and the order-independent overlap blend."""

from __future__ import annotations

import random

import pytest
import torch

from flashportrait.model.windows import blend_overlaps, blend_weights, plan_windows


# The official window lists for C = 51, O = 30 (reference notes §5.1, replayed from the official code).
OFFICIAL = {
    52: [0, 1],
    63: [0, 12],
    72: [0, 21],
    101: [0, 21, 42, 50],
    251: [0, 21, 42, 63, 84, 105, 126, 147, 168, 189, 200],
}


@pytest.mark.parametrize(("latent_frames", "starts"), sorted(OFFICIAL.items()))
def test_official_window_lists(latent_frames, starts):
    plan = plan_windows(latent_frames, 51, 30)
    assert [w.start for w in plan.windows] == starts
    assert all(w.length == 51 for w in plan.windows)


@pytest.mark.parametrize("latent_frames", range(1, 60))
def test_full_coverage_and_last_window_flush(latent_frames):
    plan = plan_windows(latent_frames, 7, 3)
    covered = set()
    for w in plan.windows:
        covered.update(range(w.start, w.stop))
    assert covered == set(range(latent_frames))
    assert plan.windows[-1].stop == latent_frames
    assert plan.windows[0].start == 0
    for prev, cur in zip(plan.windows, plan.windows[1:]):
        assert prev.stop - cur.start >= 3  # every overlap at least the requested one


def test_short_video_is_one_window_of_its_own_length():
    plan = plan_windows(4, 51, 30)
    assert [(w.start, w.stop) for w in plan.windows] == [(0, 4)]  # no wrap, no duplicated frames


def test_rgb_range_of_a_window():
    window = plan_windows(20, 5, 2).windows[1]  # starts 0, 3, …
    assert (window.start, window.stop) == (3, 8)
    assert window.rgb_range == (12, 28)  # RGB 4·3 … 4·7, i.e. 4(C−1)+1 = 17 frames


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="overlap must be between 1 and context_size − 1 = 4"):
        plan_windows(10, 5, 5)
    with pytest.raises(ValueError, match="num_latent_frames must be ≥ 1"):
        plan_windows(0, 5, 2)


def test_weights_ramp_across_overlaps():
    plan = plan_windows(8, 5, 2)  # windows [0,5) and [3,8): overlap of 2 frames
    first, second = blend_weights(plan)
    # ramp (r+1)/(ov+1) with ov = 2: 1/3, 2/3 into the second window; mirrored out of the first
    torch.testing.assert_close(first, torch.tensor([1, 1, 1, 2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(second, torch.tensor([1 / 3, 2 / 3, 1, 1, 1], dtype=torch.float64))


def _window_latents(plan, fn):
    return {w.index: fn(w) for w in plan.windows}


def test_blending_a_constant_gives_the_constant():
    plan = plan_windows(40, 7, 4)
    latents = _window_latents(plan, lambda w: torch.full((1, 2, w.length, 3, 3), 0.37))
    blended = blend_overlaps(plan, latents)
    assert blended.shape == (1, 2, 40, 3, 3)
    torch.testing.assert_close(blended, torch.full_like(blended, 0.37), atol=1e-7, rtol=0)


def test_single_coverage_frames_keep_their_window_value_exactly():
    plan = plan_windows(12, 5, 2)
    latents = _window_latents(
        plan, lambda w: torch.randn(1, 1, w.length, 2, 2, generator=torch.Generator().manual_seed(w.index))
    )
    blended = blend_overlaps(plan, latents)
    assert torch.equal(blended[:, :, 0:3], latents[0][:, :, 0:3])


def test_blend_is_independent_of_completion_order():
    plan = plan_windows(50, 9, 5)
    latents = _window_latents(
        plan, lambda w: torch.randn(1, 4, w.length, 3, 5, generator=torch.Generator().manual_seed(100 + w.index))
    )
    reference = blend_overlaps(plan, latents)
    order = list(latents)
    for seed in range(5):
        random.Random(seed).shuffle(order)
        shuffled = {k: latents[k] for k in order}
        assert torch.equal(blend_overlaps(plan, shuffled), reference)


def test_missing_window_is_an_error():
    plan = plan_windows(12, 5, 2)
    latents = _window_latents(plan, lambda w: torch.zeros(1, 1, w.length, 1, 1))
    latents.pop(1)
    with pytest.raises(ValueError, match=r"no latents for windows \[1\]"):
        blend_overlaps(plan, latents)
