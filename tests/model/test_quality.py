"""Quality figures on constructed cases: the astronaut against herself, a reshaped twin, non-faces and copies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flashportrait.model.expression.landmark import NoFaceError
from flashportrait.model.quality import (
    IDENTITY_SAME_PERSON_THRESHOLD,
    IdentityScore,
    changed_pixel_fraction,
    expression_correlation,
    expression_signals,
    eye_openness,
    face_embedding,
    identity_distances,
    identity_score,
    mouth_opening,
    psnr,
    ssim,
    trivial_baseline,
)
from flashportrait.testing import (
    ASTRONAUT_IOD,
    ASTRONAUT_LANDMARKS,
    MOUTH_MAX_DROP_IOD,
    RESHAPED_ASTRONAUT,
    astronaut_portrait,
    render_warped_frame,
    warped_driving_frames,
)


NUM_FRAMES, SIZE, FPS = 25, 128, 25.0  # 1 s of the seed-1 curves: the mouth opens and closes, one blink


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return astronaut_portrait(SIZE)


@pytest.fixture(scope="module")
def driving() -> tuple[np.ndarray, object]:
    return warped_driving_frames(NUM_FRAMES, SIZE, seed=1, fps=FPS)


@pytest.fixture(scope="module")
def twin() -> np.ndarray:
    """Another face (eyes further apart, narrower jaw) making exactly the driving video's expressions."""
    return warped_driving_frames(NUM_FRAMES, SIZE, seed=1, fps=FPS, face=RESHAPED_ASTRONAUT)[0]


def not_faces(portrait: np.ndarray) -> list[np.ndarray]:
    """Upside down (the frontal detector does not see it), colour-inverted, and flat grey."""
    return [np.ascontiguousarray(portrait[::-1]), 255 - portrait, np.full_like(portrait, 128)]


class TestIdentity:
    def test_embedding_is_a_deterministic_128d_vector(self, portrait: np.ndarray) -> None:
        first, second = face_embedding(portrait), face_embedding(portrait.copy())
        assert first is not None and second is not None
        assert first.shape == (128,) and first.dtype == np.float64 and np.isfinite(first).all()
        np.testing.assert_array_equal(first, second)  # num_jitters=0: no randomness

    def test_small_images_are_upscaled_and_still_the_same_person(self, portrait: np.ndarray) -> None:
        small = face_embedding(astronaut_portrait(96))
        assert small is not None
        assert np.linalg.norm(small - face_embedding(portrait)) < IDENTITY_SAME_PERSON_THRESHOLD

    def test_the_68_point_alignment_agrees(self, portrait: np.ndarray) -> None:
        five, sixty_eight = face_embedding(portrait), face_embedding(portrait, landmarks="68")
        assert sixty_eight is not None and np.linalg.norm(five - sixty_eight) < IDENTITY_SAME_PERSON_THRESHOLD

    def test_non_faces_have_no_embedding(self, portrait: np.ndarray) -> None:
        assert [face_embedding(image) for image in not_faces(portrait)] == [None, None, None]

    def test_a_copy_of_the_reference_is_the_same_person(self, portrait: np.ndarray) -> None:
        score = identity_score(portrait, trivial_baseline(portrait, 3))
        assert score.mean_distance == pytest.approx(0.0, abs=1e-9)
        assert (score.fraction_same, score.frames_scored, score.frames_without_face) == (1.0, 3, 0)

    def test_animated_frames_keep_the_identity(self, portrait: np.ndarray, driving: tuple[np.ndarray, object]) -> None:
        distances = identity_distances(portrait, driving[0], every=6)  # frames 0, 6, 12, 18, 24
        assert distances.shape == (5,)
        # An open mouth or a blink moves the descriptor (0.3-0.45 here), but well inside one person.
        assert (distances > 0.01).all() and (distances < IDENTITY_SAME_PERSON_THRESHOLD).all()

    def test_frames_without_a_face_are_nan_and_counted(self, portrait: np.ndarray) -> None:
        distances = identity_distances(portrait, [portrait, *not_faces(portrait)])
        assert distances[0] == pytest.approx(0.0, abs=1e-9) and np.isnan(distances[1:]).all()
        score = IdentityScore.from_distances(distances)
        assert (score.frames_scored, score.frames_without_face, score.fraction_same) == (1, 3, 1.0)
        assert score.mean_distance == pytest.approx(0.0, abs=1e-9)

    def test_summary_rules(self) -> None:
        score = IdentityScore.from_distances(np.array([0.2, 0.6, 1.0, np.nan]))
        assert score.fraction_same == pytest.approx(1 / 3)  # dlib's rule is strictly below 0.6
        assert score.mean_distance == pytest.approx(0.6) and (score.frames_scored, score.frames_without_face) == (3, 1)
        empty = IdentityScore.from_distances(np.array([np.nan, np.nan]))
        assert math.isnan(empty.mean_distance) and math.isnan(empty.fraction_same) and empty.frames_without_face == 2

    def test_reference_without_a_face_names_the_fix(self, portrait: np.ndarray) -> None:
        with pytest.raises(NoFaceError, match=r"no face found in the reference image; pass the portrait"):
            identity_distances(np.full_like(portrait, 128), [portrait])

    def test_bad_inputs_name_the_fix(self, portrait: np.ndarray) -> None:
        with pytest.raises(ValueError, match=r"every must be >= 1"):
            identity_distances(portrait, [portrait], every=0)
        with pytest.raises(ValueError, match=r"must be an HxWx3 uint8 RGB array \(got float64"):
            face_embedding(portrait / 255.0)
        with pytest.raises(ValueError, match=r"landmarks must be '5' or '68'"):
            face_embedding(portrait, landmarks="81")


class TestExpressionGeometry:
    def test_mouth_opening_is_the_inner_lip_gap_in_interocular_distances(self) -> None:
        closed, opened = (render_warped_frame(mouth_open=m, size=256)[1] for m in (0.0, 1.0))
        landmarks = np.stack([closed, opened, closed * 3])  # a 3× larger face: the same opening
        values = mouth_opening(landmarks)
        gap = np.mean(
            [
                np.linalg.norm(ASTRONAUT_LANDMARKS[a] - ASTRONAUT_LANDMARKS[b])
                for a, b in ((61, 67), (62, 66), (63, 65))
            ]
        )
        assert values[0] == pytest.approx(gap / ASTRONAUT_IOD) and values[2] == pytest.approx(values[0])
        # Lower inner lip drops by the full 0.35 IOD, the upper rises by 0.08 of it.
        assert values[1] - values[0] == pytest.approx(1.08 * MOUTH_MAX_DROP_IOD, rel=0.02)

    def test_eye_openness_is_the_eye_aspect_ratio(self) -> None:
        points = np.zeros((1, 68, 2))
        for start in (36, 42):  # a 10 × 3 eye: corners at x 0 and 10, lids 3 apart
            points[0, start : start + 6] = [(0, 0), (3, -1.5), (7, -1.5), (10, 0), (7, 1.5), (3, 1.5)]
        assert eye_openness(points) == pytest.approx([0.3])
        closed = render_warped_frame(blink=1.0, size=256)[1]
        assert eye_openness(closed[None])[0] < 0.25 * eye_openness(ASTRONAUT_LANDMARKS[None])[0]


class TestExpressionCorrelation:
    def test_signals_follow_the_ground_truth(self, driving: tuple[np.ndarray, object]) -> None:
        frames, truth = driving
        mouth, eye, pose = expression_signals(frames, FPS)
        assert mouth.shape == eye.shape == (NUM_FRAMES,) and pose.shape == (NUM_FRAMES, 3)
        assert np.corrcoef(mouth, truth.mouth_open)[0, 1] > 0.95
        assert np.corrcoef(eye, truth.blink)[0, 1] < -0.9  # a blink closes the eyes
        assert np.corrcoef(pose[:, 2], truth.roll_deg)[0, 1] > 0.9

    def test_identical_videos_correlate_perfectly(self, driving: tuple[np.ndarray, object]) -> None:
        score = expression_correlation(driving[0], driving[0], FPS)
        assert score.mouth_r == pytest.approx(1.0) and score.eye_r == pytest.approx(1.0)
        assert score.head_pose_mae_deg == pytest.approx(0.0, abs=1e-9) and score.mouth_lag_s == 0.0
        assert score.frames == NUM_FRAMES and score.reason is None

    def test_another_face_making_the_same_expressions(
        self, driving: tuple[np.ndarray, object], twin: np.ndarray
    ) -> None:
        score = expression_correlation(twin, driving[0], FPS)
        assert score.mouth_r >= 0.9 and score.eye_r >= 0.9 and score.mouth_lag_s == 0.0
        assert score.head_pose_mae_deg < 1.0 and max(score.head_pose_mae_per_axis_deg) < 1.0

    def test_other_expressions_do_not_correlate(self, driving: tuple[np.ndarray, object]) -> None:
        other = warped_driving_frames(NUM_FRAMES, SIZE, seed=2, fps=FPS)[0]
        assert expression_correlation(other, driving[0], FPS).mouth_r < 0.6

    def test_a_late_output_shows_its_lag(self, driving: tuple[np.ndarray, object], twin: np.ndarray) -> None:
        late = np.concatenate([twin[:1], twin[:1], twin[:-2]])  # two frames behind
        score = expression_correlation(late, driving[0], FPS)
        assert score.mouth_lag_s == pytest.approx(2 / FPS)

    def test_a_copy_of_the_reference_has_no_correlation(
        self, portrait: np.ndarray, driving: tuple[np.ndarray, object]
    ) -> None:
        score = expression_correlation(trivial_baseline(portrait, NUM_FRAMES), driving[0], FPS)
        assert math.isnan(score.mouth_r) and math.isnan(score.eye_r) and math.isnan(score.mouth_lag_s)
        assert "mouth opening is constant in the output video" in score.reason
        assert "eye openness is constant in the output video" in score.reason
        assert np.isfinite(score.head_pose_mae_deg)

    def test_an_output_without_a_face_scores_nan(self, driving: tuple[np.ndarray, object]) -> None:
        grey = np.full((10, SIZE, SIZE, 3), 128, np.uint8)  # 10 frames: each costs two full detection passes
        score = expression_correlation(grey, driving[0][:10], FPS)
        assert math.isnan(score.mouth_r) and math.isnan(score.head_pose_mae_deg) and score.frames == 10
        assert score.reason is not None and score.reason.startswith("the output video: a face was found in 0 of 10")

    def test_bad_inputs_name_the_fix(self, driving: tuple[np.ndarray, object]) -> None:
        frames = driving[0]
        with pytest.raises(ValueError, match=r"\(got 24 output, 25 driving\); trim the longer video"):
            expression_correlation(frames[:-1], frames, FPS)
        with pytest.raises(ValueError, match=r"fps must be > 0"):
            expression_correlation(frames, frames, 0.0)


class TestPixels:
    def test_identical_frames(self, driving: tuple[np.ndarray, object]) -> None:
        frames = driving[0][:4]
        assert psnr(frames, frames.copy()) == math.inf
        assert ssim(frames, frames.copy()) == pytest.approx(1.0)

    def test_known_error(self, portrait: np.ndarray) -> None:
        grey = np.full((2, 32, 32, 3), 100, np.uint8)
        assert psnr(grey, grey + 5) == pytest.approx(10 * math.log10(255**2 / 25))  # MSE 25
        assert psnr(portrait, portrait) == math.inf  # one [H, W, 3] frame is a one-frame video
        assert ssim(portrait, np.flipud(portrait)) < 0.5

    def test_changed_pixels(self) -> None:
        neutral, ajar, opened, blinking = (
            render_warped_frame(mouth_open=m, blink=b, size=SIZE)[0] for m, b in ((0, 0), (0.25, 0), (1, 0), (0, 1))
        )
        moved = changed_pixel_fraction(opened, neutral)
        # The synthetic jaw drop bends the whole lower face and the background beside it (~1/3 of the frame);
        # a blink moves only the eyelids.
        assert changed_pixel_fraction(ajar, neutral) < moved < 0.5
        assert 0.002 < changed_pixel_fraction(blinking, neutral) < 0.05
        assert changed_pixel_fraction(neutral, neutral) == 0.0
        assert changed_pixel_fraction(np.stack([neutral, opened]), neutral) == pytest.approx(moved / 2)
        grey = np.full((8, 8, 3), 100, np.uint8)
        brighter = grey.copy()
        brighter[..., 1] += 12  # one channel, exactly at the threshold: not changed
        assert changed_pixel_fraction(brighter, grey) == 0.0
        brighter[:4, :, 2] += 13  # half the pixels, one channel above it
        assert changed_pixel_fraction(brighter, grey) == 0.5

    def test_trivial_baseline(self, portrait: np.ndarray, driving: tuple[np.ndarray, object]) -> None:
        copies = trivial_baseline(portrait, 5)
        assert copies.shape == (5, SIZE, SIZE, 3) and copies.dtype == np.uint8 and copies.flags.writeable
        assert (copies == portrait).all() and changed_pixel_fraction(copies, portrait) == 0.0
        assert 10 < psnr(copies, driving[0][:5]) < math.inf and ssim(copies, driving[0][:5]) < 1.0

    def test_bad_inputs_name_the_fix(self, portrait: np.ndarray) -> None:
        with pytest.raises(ValueError, match=r"a and b must have the same shape"):
            psnr(portrait, portrait[:64])
        with pytest.raises(ValueError, match=r"b must be uint8 RGB frames \[N, H, W, 3\].*astype\(np\.uint8\)"):
            ssim(portrait, portrait.astype(np.float32))
        with pytest.raises(ValueError, match=r"frame and reference must be the same size"):
            changed_pixel_fraction(portrait, portrait[:64])
        with pytest.raises(ValueError, match=r"threshold must be in \[0, 255\)"):
            changed_pixel_fraction(portrait, portrait, threshold=255)
        with pytest.raises(ValueError, match=r"reference must be one \[H, W, 3\] uint8 image"):
            trivial_baseline(portrait[None], 2)
        with pytest.raises(ValueError, match=r"num_frames must be >= 1, got 0"):
            trivial_baseline(portrait, 0)
