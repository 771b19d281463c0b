"""Synthetic test inputs: the astronaut portrait and seeded driving videos whose ground truth shows in the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from flashportrait.testing import (
    MAX_ROLL_DEG,
    MOUTH_CENTER,
    MOUTH_HALF_WIDTH,
    MOUTH_MAX_HALF_HEIGHT,
    SyntheticExpression,
    astronaut_portrait,
    synthetic_driving_frames,
)


class TestAstronautPortrait:
    def test_shape_and_dtype(self) -> None:
        portrait = astronaut_portrait(64)
        assert portrait.shape == (64, 64, 3)
        assert portrait.dtype == np.uint8

    def test_returns_a_fresh_copy(self) -> None:
        astronaut_portrait(32)[:] = 0
        assert astronaut_portrait(32).any()

    def test_rejects_tiny_size(self) -> None:
        with pytest.raises(ValueError, match=r"`size` must be >= 16 \(got 8\)"):
            astronaut_portrait(8)


class TestSyntheticDrivingFrames:
    def test_shapes_dtypes_and_ranges(self) -> None:
        frames, truth = synthetic_driving_frames(30, 32)
        assert frames.shape == (30, 32, 32, 3)
        assert frames.dtype == np.uint8
        assert isinstance(truth, SyntheticExpression)
        for curve in (truth.mouth_open, truth.blink, truth.roll_deg):
            assert curve.shape == (30,)
        assert 0 <= truth.mouth_open.min() and truth.mouth_open.max() <= 1
        assert 0 <= truth.blink.min() and truth.blink.max() == 1  # 30 frames at 25 fps: one 5-frame blink
        assert np.abs(truth.roll_deg).max() <= MAX_ROLL_DEG

    def test_deterministic_per_seed(self) -> None:
        frames_a, truth_a = synthetic_driving_frames(6, 32, seed=3)
        frames_b, truth_b = synthetic_driving_frames(6, 32, seed=3)
        frames_c, _ = synthetic_driving_frames(6, 32, seed=4)
        assert np.array_equal(frames_a, frames_b)
        assert np.array_equal(truth_a.mouth_open, truth_b.mouth_open)
        assert not np.array_equal(frames_a, frames_c)

    def test_mouth_opening_darkens_the_mouth_region(self) -> None:
        size = 64
        frames, truth = synthetic_driving_frames(40, size, seed=0)
        top = round((MOUTH_CENTER[0] - MOUTH_MAX_HALF_HEIGHT) * size)
        bottom = round((MOUTH_CENTER[0] + MOUTH_MAX_HALF_HEIGHT) * size)
        left = round((MOUTH_CENTER[1] - MOUTH_HALF_WIDTH) * size)
        right = round((MOUTH_CENTER[1] + MOUTH_HALF_WIDTH) * size)
        brightness = frames[:, top:bottom, left:right].astype(np.float64).mean(axis=(1, 2, 3))  # [N]
        assert np.ptp(truth.mouth_open) > 0.2  # the curve actually moves over these 1.6 s
        assert np.corrcoef(truth.mouth_open, brightness)[0, 1] < -0.8

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match=r"`num_frames` must be >= 1 \(got 0\)"):
            synthetic_driving_frames(0)
        with pytest.raises(ValueError, match=r"`fps` must be > 0 \(got 0.0\)"):
            synthetic_driving_frames(5, fps=0.0)
        with pytest.raises(ValueError, match=r"`size` must be >= 16 \(got 8\)"):
            synthetic_driving_frames(5, 8)
