"""Pixel expression extractor and the extractor registry: layout, zero on a static video, locality, errors."""

from __future__ import annotations

import numpy as np
import pytest

from flashportrait.model.expression import (
    EMOTION_DIM,
    EYE_DIM,
    FEATURE_DIM,
    HEADPOSE_DIM,
    MOUTH_DIM,
    ExpressionExtractor,
    available_extractors,
    get_extractor,
)
from flashportrait.model.expression.pixel import (
    EMOTION_CELLS,
    MOUTH_SCALE,
    MOUTH_SHAPE,
    PixelExpressionExtractor,
)
from flashportrait.testing import astronaut_portrait, synthetic_driving_frames


HEADPOSE = slice(0, 6)
EYE = slice(6, 12)
EMOTION = slice(12, 42)
MOUTH = slice(42, 554)
GREY = 128 / 255  # luma of (128, 128, 128): 128/255 × (0.299 + 0.587 + 0.114)


def grey_frame(size: int = 64) -> np.ndarray:
    return np.full((size, size, 3), 128, dtype=np.uint8)


class TestLayout:
    def test_constants(self) -> None:
        assert (HEADPOSE_DIM, EYE_DIM, EMOTION_DIM, MOUTH_DIM) == (6, 6, 30, 512)
        assert FEATURE_DIM == 554  # 6 + 6 + 30 + 512
        assert EMOTION_CELLS[0] * EMOTION_CELLS[1] == EMOTION_DIM  # 5 × 6
        assert MOUTH_SHAPE[0] * MOUTH_SHAPE[1] == MOUTH_DIM  # 16 × 32

    def test_registry(self) -> None:
        extractor = get_extractor("pixel")
        assert isinstance(extractor, PixelExpressionExtractor)
        assert isinstance(extractor, ExpressionExtractor)
        assert extractor.name == "pixel"
        assert "pixel" in available_extractors()

    def test_registry_rejects_unknown_name(self) -> None:
        with pytest.raises(ValueError, match=r"unknown expression extractor 'no-such'; choose one of \[.*'pixel'"):
            get_extractor("no-such")


class TestFeatures:
    def test_static_video_gives_zeros(self) -> None:
        out = PixelExpressionExtractor().extract([astronaut_portrait(48)] * 4)
        assert out.shape == (4, 554)
        assert out.dtype == np.float32
        assert not out.any()

    def test_accepts_a_generator(self) -> None:
        frames = [astronaut_portrait(40), 255 - astronaut_portrait(40)]
        from_list = PixelExpressionExtractor().extract(frames)
        from_generator = PixelExpressionExtractor().extract(frame for frame in frames)
        assert np.array_equal(from_list, from_generator)

    def test_deterministic(self) -> None:
        rng = np.random.default_rng(0)
        frames = rng.integers(0, 256, size=(3, 37, 53, 3), dtype=np.uint8)
        assert np.array_equal(PixelExpressionExtractor().extract(frames), PixelExpressionExtractor().extract(frames))

    def test_lower_centre_change_moves_mouth_not_eyes(self) -> None:
        neutral = astronaut_portrait(96)
        talking = neutral.copy()
        talking[62:84, 34:62] //= 4  # rows 65-88 %, cols 35-65 %: inside the mouth region only
        out = PixelExpressionExtractor().extract([neutral, talking])[1]
        mouth, eye = np.abs(out[MOUTH]).mean(), np.abs(out[EYE]).mean()
        assert mouth > 0.05
        assert mouth > 10 * eye

    def test_hand_computed_eye_band(self) -> None:
        # 64×64 frames: the analysis grid is the frame itself. Whiten grid rows 16..28 (the eye band), left half.
        neutral, changed = grey_frame(), grey_frame()
        changed[16:29, :32] = 255
        out = PixelExpressionExtractor().extract([neutral, changed])[1]
        delta = 1 - GREY  # 127/255 per whitened cell
        # left: mean |change| = delta, vertical gradient unchanged (uniform inside the band), mean change = delta.
        np.testing.assert_allclose(out[EYE], [delta, 0, delta, 0, 0, 0], atol=1e-6)
        # brightness change = 13 rows × 32 cols × delta / 4096 cells.
        np.testing.assert_allclose(out[4], 13 * 32 * delta / 4096, atol=1e-6)
        assert not out[MOUTH].any()  # the mouth region starts at row 38.4

    def test_hand_computed_mouth(self) -> None:
        # Black lower half: every mouth cell (rows 38.4-58.9 of 64) goes from GREY to 0.
        neutral, changed = grey_frame(), grey_frame()
        changed[32:] = 0
        out = PixelExpressionExtractor().extract([neutral, changed])[1]
        np.testing.assert_allclose(out[MOUTH], -GREY * MOUTH_SCALE, atol=1e-5)  # −0.502 × 4 = −2.008
        assert not out[EYE].any()

    def test_horizontal_shift_moves_centroid_x(self) -> None:
        # A white 20×10 block on black; moving it 8 px right shifts the centroid by 8/64 = 0.125 of the width
        # (to 1e-4: the 1e-6 mass added per cell weighs 0.004 against the block's 200).
        first, right, left = (np.zeros((64, 64, 3), dtype=np.uint8) for _ in range(3))
        first[20:40, 20:30] = 255
        right[20:40, 28:38] = 255
        left[20:40, 12:22] = 255
        out = PixelExpressionExtractor().extract([first, right, left])
        assert out[1, 0] == pytest.approx(0.125, abs=1e-4)
        assert out[2, 0] == pytest.approx(-0.125, abs=1e-4)
        np.testing.assert_allclose(out[1:, 1:4], 0, atol=1e-4)  # no y shift, rotation or scale change (to the eps)

    def test_portrait_moving_right_is_positive(self) -> None:
        # The 48×48 portrait on a black 64×64 canvas moves 8 px right: the centroid moves 8/64 = 0.125.
        before, after = (np.zeros((64, 64, 3), dtype=np.uint8) for _ in range(2))
        before[8:56, 4:52] = astronaut_portrait(48)
        after[8:56, 12:60] = astronaut_portrait(48)
        out = PixelExpressionExtractor().extract([before, after])
        assert out[1, 0] == pytest.approx(0.125, abs=1e-3)
        assert out[1, 1] == pytest.approx(0.0, abs=1e-3)

    def test_follows_synthetic_ground_truth(self) -> None:
        frames, truth = synthetic_driving_frames(40, 64, seed=0)
        out = PixelExpressionExtractor().extract(frames)
        # An opening mouth darkens the mouth region, so the mean mouth feature falls.
        assert np.corrcoef(truth.mouth_open, out[:, MOUTH].mean(axis=1))[0, 1] < -0.8
        # Roll is counter-clockwise-positive, the orientation change clockwise-positive: they move oppositely.
        assert np.corrcoef(truth.roll_deg, out[:, 2])[0, 1] < -0.95


class TestErrors:
    def test_too_small(self) -> None:
        with pytest.raises(ValueError, match=r"frame 0 is 15x20; .*at least 16x16"):
            PixelExpressionExtractor().extract([np.zeros((15, 20, 3), dtype=np.uint8)])

    def test_wrong_dtype(self) -> None:
        with pytest.raises(ValueError, match=r"frame 1 must be an HxWx3 uint8 RGB array \(got float32"):
            PixelExpressionExtractor().extract([grey_frame(), grey_frame().astype(np.float32)])

    def test_size_change(self) -> None:
        with pytest.raises(ValueError, match=r"frame 1 has shape \(32, 32, 3\) but frame 0 has \(64, 64, 3\)"):
            PixelExpressionExtractor().extract([grey_frame(64), grey_frame(32)])

    def test_empty(self) -> None:
        with pytest.raises(ValueError, match=r"`frames` is empty"):
            PixelExpressionExtractor().extract([])
