"""Landmark extractor on landmark-warped synthetic videos with known expressions, and its geometry by hand."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from flashportrait.model.expression import (
    FEATURE_DIM,
    ExpressionExtractor,
    available_extractors,
    get_extractor,
)
from flashportrait.model.expression.landmark import (
    CNN_DETECTOR_FILE,
    SHAPE_PREDICTOR_FILE,
    FaceTrack,
    LandmarkExpressionExtractor,
    NoFaceError,
    detect_face_box,
    detect_faces,
    model_file,
    predict_landmarks,
    reference_face_box,
    savgol_smooth,
)
from flashportrait.model.expression.landmark_features import expression_features
from flashportrait.testing import (
    ASTRONAUT_LANDMARKS,
    RESHAPED_ASTRONAUT,
    astronaut_portrait,
    render_warped_frame,
    warped_driving_frames,
)


NUM_FRAMES, SIZE, FPS = 50, 192, 25.0  # 2 s: the seed-1 curves open the mouth, blink once, roll and yaw
HEADPOSE, EYE, EMOTION, MOUTH = slice(0, 6), slice(6, 12), slice(12, 42), slice(42, 554)
MOUTH_OPENING = 12  # emotion component 0
LEFT_EYE_OPEN, RIGHT_EYE_OPEN = 6, 7
YAW, ROLL, LOG_SCALE = 0, 2, 5


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture(scope="module")
def talking() -> tuple[np.ndarray, object, np.ndarray]:
    frames, truth = warped_driving_frames(NUM_FRAMES, SIZE, seed=1, fps=FPS)
    return frames, truth, LandmarkExpressionExtractor().extract(frames)


class TestRegistryAndModels:
    def test_registered_next_to_pixel(self) -> None:
        extractor = get_extractor("landmark", selection="central")
        assert isinstance(extractor, LandmarkExpressionExtractor) and isinstance(extractor, ExpressionExtractor)
        assert extractor.name == "landmark" and extractor.selection == "central"
        assert {"landmark", "pixel"} <= set(available_extractors())

    def test_model_files_are_found_without_importing_their_package(self) -> None:
        # face_recognition_models' __init__ imports pkg_resources, which current setuptools no longer has.
        for name in (SHAPE_PREDICTOR_FILE, CNN_DETECTOR_FILE):
            path = model_file(name)
            assert path.is_file() and path.stat().st_size > 500_000
        assert "face_recognition_models" not in sys.modules

    def test_missing_model_file_names_the_fix(self) -> None:
        with pytest.raises(FileNotFoundError, match=r"no models/nope\.dat; reinstall face_recognition_models"):
            model_file("nope.dat")


class TestFollowsGroundTruth:
    def test_layout(self, talking: tuple[np.ndarray, object, np.ndarray]) -> None:
        _, _, features = talking
        assert features.shape == (NUM_FRAMES, FEATURE_DIM) and features.dtype == np.float32
        assert np.isfinite(features).all()

    def test_mouth_opening_correlates(self, talking: tuple[np.ndarray, object, np.ndarray]) -> None:
        _, truth, features = talking
        assert np.ptp(truth.mouth_open) > 0.3  # the curve really moves in these 2 s
        assert pearson(features[:, MOUTH_OPENING], truth.mouth_open) >= 0.9
        assert pearson(features[:, MOUTH].sum(axis=1), truth.mouth_open) >= 0.9  # the mouth map opens too

    def test_eye_openness_correlates_for_both_eyes(self, talking: tuple[np.ndarray, object, np.ndarray]) -> None:
        _, truth, features = talking
        assert truth.blink.max() == 1.0
        for column in (LEFT_EYE_OPEN, RIGHT_EYE_OPEN):
            assert pearson(features[:, column], -truth.blink) >= 0.9  # blink closes: openness falls
        closed = int(np.argmax(truth.blink))
        # dlib places closed lids about halfway (its training set has few closed eyes): openness ≈ -0.5, not -1.
        assert features[closed, LEFT_EYE_OPEN] < -0.35 and features[closed, RIGHT_EYE_OPEN] < -0.35

    def test_roll_within_3_degrees(self, talking: tuple[np.ndarray, object, np.ndarray]) -> None:
        _, truth, features = talking
        relative_truth = truth.roll_deg - np.median(truth.roll_deg)  # features are relative to the median pose
        assert np.ptp(truth.roll_deg) > 2
        assert np.abs(np.degrees(features[:, ROLL]) - relative_truth).max() <= 3.0

    def test_yaw_follows_with_the_documented_sign(self, talking: tuple[np.ndarray, object, np.ndarray]) -> None:
        _, truth, features = talking
        assert pearson(features[:, YAW], truth.yaw_deg) >= 0.9

    def test_identities_making_the_same_expressions_are_closer_than_another_sequence(
        self, talking: tuple[np.ndarray, object, np.ndarray]
    ) -> None:
        _, _, astronaut = talking
        extractor = LandmarkExpressionExtractor()
        reshaped = extractor.extract(warped_driving_frames(NUM_FRAMES, SIZE, seed=1, face=RESHAPED_ASTRONAUT)[0])
        other_sequence = extractor.extract(warped_driving_frames(NUM_FRAMES, SIZE, seed=2)[0])
        for block in (HEADPOSE, EYE, EMOTION, MOUTH):
            same = np.linalg.norm(astronaut[:, block] - reshaped[:, block])
            assert 2 * same < np.linalg.norm(astronaut[:, block] - other_sequence[:, block])
            assert 2 * same < np.linalg.norm(reshaped[:, block] - other_sequence[:, block])

    def test_static_video_gives_zeros(self) -> None:
        frame, _ = render_warped_frame(size=160)
        features = LandmarkExpressionExtractor().extract([frame] * 30)  # 30 frames: re-detection at frame 25
        np.testing.assert_allclose(features, 0.0, atol=1e-6)  # no jitter from the tracker or the re-detection


class TestMissingFaces:
    def test_no_face_video_is_rejected_naming_the_input(self) -> None:
        blank = np.full((8, 96, 128, 3), 200, dtype=np.uint8)
        with pytest.raises(NoFaceError, match=r"blank\.mp4: a face was found in 0 of 8 frames \(0%\)"):
            LandmarkExpressionExtractor().extract(blank, source="blank.mp4")

    def test_too_few_faces_is_rejected(self) -> None:
        frames, _ = warped_driving_frames(10, 128, seed=0)
        frames[3:] = 200  # the face shows in 3 of 10 frames
        with pytest.raises(NoFaceError, match=r"3 of 10 frames \(30%\); .* at least 50% \(min_face_fraction\)"):
            LandmarkExpressionExtractor().extract(frames)
        track = LandmarkExpressionExtractor(min_face_fraction=0.3).track(frames)
        assert track.interpolated == 7

    def test_a_face_lost_for_a_few_frames_is_interpolated(self) -> None:
        frames, truth = warped_driving_frames(30, 160, seed=3)
        lost = slice(12, 16)
        frames[lost] = frames[lost].mean(axis=(1, 2), keepdims=True).astype(np.uint8)  # flat frames: no face
        extractor = LandmarkExpressionExtractor()
        track = extractor.track(frames)
        assert isinstance(track, FaceTrack)
        assert track.interpolated == 4 and not track.detected[lost].any() and track.detected[:12].all()
        # Unsmoothed, the gap is the straight line between the frames on either side of it.
        raw = LandmarkExpressionExtractor(smoothing_window=1).track(frames).landmarks
        weights = (np.arange(12, 16) - 11) / 5  # frames 12..15 between found frames 11 and 16
        expected = raw[11] + weights[:, None, None] * (raw[16] - raw[11])
        np.testing.assert_allclose(raw[lost], expected, atol=1e-9)
        features = extractor.extract(frames)
        assert np.isfinite(features).all()
        assert pearson(features[:, MOUTH_OPENING], truth.mouth_open) >= 0.9  # the gap does not break the curve


class TestFaces:
    def test_landmarks_match_the_warp_to_a_few_percent_of_the_eye_distance(self) -> None:
        frame, truth = render_warped_frame(mouth_open=0.6, blink=0.3, roll_deg=3.0, size=224)
        boxes = detect_faces(frame)
        assert len(boxes) == 1
        points = predict_landmarks(frame, boxes[0])
        eye_distance = np.linalg.norm(truth[36:42].mean(0) - truth[42:48].mean(0))
        errors = np.linalg.norm(points - truth, axis=1) / eye_distance
        assert errors.mean() < 0.03 and errors.max() < 0.1

    def test_cnn_detector_finds_the_face(self) -> None:
        boxes = detect_faces(render_warped_frame(size=128)[0], detector="cnn", detect_size=128)
        assert len(boxes) == 1 and 20 < boxes[0][0] < 64

    def test_reference_face_box_is_the_landmark_box(self) -> None:
        from skimage import data

        box = detect_face_box(data.astronaut())
        expected = (*np.floor(ASTRONAUT_LANDMARKS.min(0)), *np.ceil(ASTRONAUT_LANDMARKS.max(0)) + 1)
        assert box is not None and np.abs(np.subtract(box, expected)).max() <= 3
        assert detect_face_box(np.full((120, 160, 3), 90, dtype=np.uint8)) is None

    def test_a_reference_without_a_face_fails_unless_allowed(self) -> None:
        portrait = astronaut_portrait(256)
        assert reference_face_box(portrait) == detect_face_box(portrait) is not None
        landscape = np.tile(np.linspace(40, 220, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))  # no face
        with pytest.raises(NoFaceError, match=r"reference: no face found in the 320x240 image; .*allow-faceless"):
            reference_face_box(landscape)
        assert reference_face_box(landscape, allow_faceless=True) is None

    def test_several_faces_largest_or_central(self) -> None:
        canvas = np.full((256, 640, 3), 235, dtype=np.uint8)
        canvas[:, :256] = astronaut_portrait(256)  # large face, far from the centre (x = 320)
        canvas[40:216, 280:456] = astronaut_portrait(176)  # smaller face near the centre
        largest = detect_face_box(canvas, selection="largest")
        central = detect_face_box(canvas, selection="central")
        assert largest is not None and largest[2] < 256
        assert central is not None and central[0] > 280
        track = LandmarkExpressionExtractor(selection="central").track([canvas] * 3)
        assert track.landmarks[:, :, 0].min() > 280


class TestGeometryByHand:
    """expression_features on hand-made landmark tracks (the astronaut's measured landmarks, moved exactly)."""

    FRAME = (512, 512)

    @staticmethod
    def rotate_scale(points: np.ndarray, degrees: float, scale: float, centre: tuple[float, float]) -> np.ndarray:
        angle = np.radians(degrees)  # counter-clockwise on screen (y down)
        c, s = np.cos(angle), np.sin(angle)
        d = points - np.array(centre)
        return np.array(centre) + scale * np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], axis=1)

    def test_similarity_changes_only_the_pose(self) -> None:
        base = ASTRONAUT_LANDMARKS
        # Rotation about the principal point (the frame centre) is a pure camera roll, whatever the 3-D model.
        turned = self.rotate_scale(base, 10.0, 1.0, (256.0, 256.0))
        scaled = self.rotate_scale(base, 0.0, 1.2, (225.0, 120.0))
        features = expression_features(np.stack([base, turned, scaled]), self.FRAME)
        np.testing.assert_allclose(features[:, 6:], 0.0, atol=1e-5)  # eye, emotion, mouth: unchanged shape
        # Median roll is frame 0's (0°): frame 1 rolls +10°, frame 2 none.
        np.testing.assert_allclose(np.degrees(features[:, ROLL]), [0.0, 10.0, 0.0], atol=0.01)  # solver tolerance
        # Sizes 1, 1, 1.2 → median 1 → log scale 0, 0, log(1.2) = 0.1823.
        np.testing.assert_allclose(features[:, LOG_SCALE], [0.0, 0.0, np.log(1.2)], atol=1e-6)

    def test_half_closed_eye_has_openness_minus_a_half(self) -> None:
        half_closed = ASTRONAUT_LANDMARKS.copy()
        for upper, lower in ((37, 41), (38, 40)):  # image-left eye: both upper lid points halfway down
            half_closed[upper] += 0.5 * (ASTRONAUT_LANDMARKS[lower] - ASTRONAUT_LANDMARKS[upper])
        track = np.stack([ASTRONAUT_LANDMARKS, ASTRONAUT_LANDMARKS, half_closed])
        features = expression_features(track, self.FRAME)
        # Neutral = median of (open, open, half) = open. EAR halves: openness = 0.5 - 1 = -0.5; the other eye 0.
        np.testing.assert_allclose(features[:, LEFT_EYE_OPEN], [0.0, 0.0, -0.5], atol=1e-6)
        np.testing.assert_allclose(features[:, RIGHT_EYE_OPEN], 0.0, atol=1e-9)

    def test_brow_raise_in_eye_distances(self) -> None:
        raised = ASTRONAUT_LANDMARKS.copy()
        eye_distance = np.linalg.norm(raised[42:48].mean(0) - raised[36:42].mean(0))
        raised[22:27, 1] -= 0.2 * eye_distance  # the image-right brow up by 0.2 u
        features = expression_features(np.stack([ASTRONAUT_LANDMARKS] * 2 + [raised]), self.FRAME)
        # eye block: [open L, open R, inner brow L, inner brow R, outer brow L, outer brow R]
        np.testing.assert_allclose(features[2, EYE], [0, 0, 0, 0.2, 0, 0.2], atol=1e-6)


class TestSmoothing:
    def test_quadratics_pass_unchanged_including_the_ends(self) -> None:
        t = np.arange(12, dtype=np.float64)
        track = np.stack([3 - 2 * t + 0.5 * t**2, 7 + t], axis=1)  # [12, 2]
        np.testing.assert_allclose(savgol_smooth(track, 5), track, atol=1e-9)

    def test_no_lag_a_symmetric_peak_stays_in_place(self) -> None:
        spike = np.zeros(21)
        spike[8:13] = [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3]  # a 5-frame blink peaking at frame 10
        smoothed = savgol_smooth(spike, 5)
        assert int(np.argmax(smoothed)) == 10
        # Centre coefficients (-3, 12, 17, 12, -3)/35: (-1 + 8 + 17 + 8 - 1)/35 = 31/35 of the peak survives.
        assert smoothed[10] == pytest.approx(31 / 35)

    def test_window_one_is_identity(self) -> None:
        track = np.random.default_rng(0).normal(size=(7, 3))
        np.testing.assert_array_equal(savgol_smooth(track, 1), track)


class TestErrors:
    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"selection": "biggest"}, r"selection must be one of \['largest', 'central'\], got 'biggest'"),
            ({"detector": "mtcnn"}, r"detector must be one of \['hog', 'cnn'\]"),
            ({"min_face_fraction": 0.0}, r"min_face_fraction must be in \(0, 1\], got 0.0"),
            ({"smoothing_window": 4}, r"smoothing_window must be 1 \(off\) or an odd number >= 5, got 4"),
            ({"detect_size": 40}, r"detect_size must be >= 80 px"),
            ({"redetect_every": 0}, r"redetect_every must be >= 1 frame"),
        ],
    )
    def test_bad_options(self, options: dict[str, object], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            LandmarkExpressionExtractor(**options)  # type: ignore[arg-type]

    def test_empty(self) -> None:
        with pytest.raises(ValueError, match=r"clip\.mp4 has no frames"):
            LandmarkExpressionExtractor().extract([], source="clip.mp4")

    def test_wrong_dtype(self) -> None:
        with pytest.raises(ValueError, match=r"frame 0 must be an HxWx3 uint8 RGB array \(got float32"):
            LandmarkExpressionExtractor().extract([np.zeros((64, 64, 3), dtype=np.float32)])

    def test_size_change(self) -> None:
        frames = [astronaut_portrait(128), astronaut_portrait(96)]
        with pytest.raises(ValueError, match=r"frame 1 is 96x96, frame 0 128x128"):
            LandmarkExpressionExtractor().extract(frames)
