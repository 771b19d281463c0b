"""Single-device pipeline: determinism, shapes, request checks."""

from __future__ import annotations

import numpy as np
import pytest

from flashportrait.model import runtime
from flashportrait.model.pipeline_flashportrait import FlashPortraitPipeline, GenerationRequest


@pytest.fixture(scope="module")
def pipeline() -> FlashPortraitPipeline:
    runtime.configure_threads(1)
    return FlashPortraitPipeline.from_preset("tiny")


def request(frames: int = 25, seed: int = 3, **kwargs) -> GenerationRequest:
    rng = np.random.default_rng(0)
    return GenerationRequest(
        reference=rng.integers(0, 256, (64, 48, 3), dtype=np.uint8),
        expression_features=rng.standard_normal((frames, 554)).astype(np.float32),
        prompt="a test",
        seed=seed,
        num_inference_steps=2,
        **kwargs,
    )


def test_same_seed_same_bits_and_other_seed_differs(pipeline):
    first = pipeline(request())
    second = pipeline(request())
    other = pipeline(request(seed=4))
    assert np.array_equal(first.frames, second.frames)
    assert not np.array_equal(first.frames, other.frames)


def test_output_shape_drops_the_reference_frame(pipeline):
    result = pipeline(request(frames=25))
    # 25 RGB frames → 7 latent frames → windows (5, overlap 2): starts 0, 2 → 2 windows;
    # decoded 4·(7−1)+1 = 25 frames, minus frame 0 = 24
    assert result.frames.shape == (24, 64, 48, 3)
    assert result.stats.windows == 2
    assert result.stats.transformer_calls == 2 * 2 * 2  # steps × windows × CFG streams (cond, no-expression)


def test_expression_features_change_the_video(pipeline):
    base = request()
    changed = GenerationRequest(**{**base.__dict__, "expression_features": base.expression_features * -1.0})
    assert not np.array_equal(pipeline(base).frames, pipeline(changed).frames)


def test_shorter_than_a_window_renders(pipeline):
    assert pipeline(request(frames=9)).frames.shape[0] == 8


@pytest.mark.parametrize(
    ("frames", "message"),
    [(24, r"24 frames after resampling; need a count of the form 4k\+1"), (1, "need a count of the form 4k")],
)
def test_bad_frame_counts_are_refused(pipeline, frames, message):
    with pytest.raises(ValueError, match=message):
        pipeline(request(frames=frames))


def test_size_must_be_a_multiple_of_16(pipeline):
    bad = GenerationRequest(**{**request().__dict__, "reference": np.zeros((60, 48, 3), np.uint8)})
    with pytest.raises(ValueError, match="multiples of 16"):
        pipeline(bad)
