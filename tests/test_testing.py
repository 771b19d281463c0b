"""Synthetic test inputs: the astronaut portrait and seeded driving videos whose ground truth shows in the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from flashportrait.testing import (
    ASTRONAUT,
    ASTRONAUT_FACE_BOX,
    ASTRONAUT_IOD,
    ASTRONAUT_LANDMARKS,
    MAX_ROLL_DEG,
    MAX_YAW_DEG,
    MOUTH_CENTER,
    MOUTH_HALF_WIDTH,
    MOUTH_MAX_DROP_IOD,
    MOUTH_MAX_HALF_HEIGHT,
    RESHAPED_ASTRONAUT,
    FaceShape,
    SyntheticExpression,
    astronaut_portrait,
    expression_curves,
    framing_box,
    iter_warped_frames,
    render_warped_frame,
    synthetic_driving_frames,
    warped_driving_frames,
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


class TestExpressionCurves:
    def test_painted_generator_shows_the_same_curves_without_yaw(self) -> None:
        _, painted = synthetic_driving_frames(40, 32, seed=5)
        curves = expression_curves(40, seed=5)
        for name in ("mouth_open", "blink", "roll_deg"):
            np.testing.assert_array_equal(getattr(painted, name), getattr(curves, name))
        assert not painted.yaw_deg.any()
        assert 0 < np.abs(curves.yaw_deg).max() <= MAX_YAW_DEG

    def test_bounds(self) -> None:
        curves = expression_curves(100, seed=1, max_roll_deg=2.0, max_yaw_deg=0.0)
        assert np.abs(curves.roll_deg).max() <= 2.0 and not curves.yaw_deg.any()
        with pytest.raises(ValueError, match=r"roll/yaw bounds must be >= 0 \(got -1.0, 8.0\)"):
            expression_curves(5, max_roll_deg=-1.0)


class TestWarpedFrames:
    SIDE = ASTRONAUT_FACE_BOX[2]  # a frame of this side shows the face box at scale 1: landmark pixels = source pixels

    def test_neutral_frame_is_the_portrait(self) -> None:
        frame, landmarks = render_warped_frame(size=128)
        assert np.abs(frame.astype(float) - astronaut_portrait(128)).mean() < 3  # bilinear vs Lanczos resampling
        top, left, side = ASTRONAUT_FACE_BOX
        expected = (ASTRONAUT_LANDMARKS - np.array([left, top]) + 0.5) * 128 / side - 0.5
        np.testing.assert_allclose(landmarks, expected, atol=1e-9)

    def test_any_size_and_aspect(self) -> None:
        frames, truth = warped_driving_frames(3, (160, 90), seed=0, fps=12)
        assert frames.shape == (3, 90, 160, 3) and frames.dtype == np.uint8
        assert truth.mouth_open.shape == (3,)
        assert framing_box(160, 90)[2] / framing_box(160, 90)[3] == pytest.approx(160 / 90)

    def test_deterministic_and_streamable(self) -> None:
        frames, truth = warped_driving_frames(4, 64, seed=2)
        again, _ = warped_driving_frames(4, 64, seed=2)
        assert np.array_equal(frames, again)
        assert np.array_equal(np.stack(list(iter_warped_frames(truth, 64))), frames)

    def test_mouth_opening_moves_the_lower_lip_by_the_documented_amount(self) -> None:
        _, closed = render_warped_frame(size=self.SIDE)
        _, opened = render_warped_frame(mouth_open=1.0, size=self.SIDE)
        # mouth_open = 1 drops the lower lip (57) by 0.35 interocular distances, in source pixels (scale 1 here).
        assert opened[57, 1] - closed[57, 1] == pytest.approx(MOUTH_MAX_DROP_IOD * ASTRONAUT_IOD)
        assert opened[8, 1] - closed[8, 1] == pytest.approx(MOUTH_MAX_DROP_IOD * ASTRONAUT_IOD)  # the chin follows

    def test_opening_darkens_the_mouth_and_blinks_cover_the_eyes(self) -> None:
        size = 96
        neutral, points = render_warped_frame(size=size)
        opened, _ = render_warped_frame(mouth_open=1.0, size=size)
        closed, _ = render_warped_frame(blink=1.0, size=size)
        mouth = tuple(
            slice(int(lo), int(hi) + 1) for lo, hi in zip(points[48:68].min(0)[::-1], points[48:68].max(0)[::-1])
        )
        eye = tuple(
            slice(int(lo), int(hi) + 1) for lo, hi in zip(points[36:42].min(0)[::-1], points[36:42].max(0)[::-1])
        )
        assert opened[mouth].mean() < neutral[mouth].mean() - 30
        assert np.abs(closed[eye].astype(float) - neutral[eye]).mean() > 10
        assert np.array_equal(closed[mouth], neutral[mouth])  # a blink leaves the mouth alone

    def test_blink_closes_the_lids_and_roll_turns_the_eye_line(self) -> None:
        _, shut = render_warped_frame(blink=1.0, size=self.SIDE)
        gap = np.linalg.norm(shut[37] - shut[41]) / np.linalg.norm(ASTRONAUT_LANDMARKS[37] - ASTRONAUT_LANDMARKS[41])
        assert gap == pytest.approx(0.05)  # 95 % closed, so no triangle folds
        _, rolled = render_warped_frame(roll_deg=4.0, size=self.SIDE)
        _, upright = render_warped_frame(size=self.SIDE)

        def eye_line(p: np.ndarray) -> float:  # counter-clockwise positive on screen (y down)
            return float(np.degrees(np.arctan2(-(p[45, 1] - p[36, 1]), p[45, 0] - p[36, 0])))

        assert eye_line(rolled) - eye_line(upright) == pytest.approx(4.0)

    def test_reshaped_identity_has_wider_set_eyes_and_a_narrower_face(self) -> None:
        _, astronaut = render_warped_frame(size=self.SIDE)
        _, reshaped = render_warped_frame(size=self.SIDE, face=RESHAPED_ASTRONAUT)

        def eye_distance(p: np.ndarray) -> float:  # horizontal: the reshaping scales x about the midline
            return float(p[42:48, 0].mean() - p[36:42, 0].mean())

        assert eye_distance(reshaped) / eye_distance(astronaut) == pytest.approx(RESHAPED_ASTRONAUT.eye_distance)
        jaw = reshaped[16, 0] - reshaped[0, 0]
        assert jaw / (astronaut[16, 0] - astronaut[0, 0]) == pytest.approx(RESHAPED_ASTRONAUT.face_width)
        assert FaceShape() == ASTRONAUT

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match=r"FaceShape.eye_distance must be in \[0.7, 1.3\] \(got 2.0\)"):
            FaceShape(eye_distance=2.0)
        with pytest.raises(ValueError, match=r"`size` must be at least 16×16 \(got 8×32\)"):
            render_warped_frame(size=(8, 32))
        with pytest.raises(ValueError, match=r"`num_frames` must be >= 1 \(got 0\)"):
            warped_driving_frames(0)
