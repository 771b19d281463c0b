"""Landmark expression extractor: dlib face tracking + 68 landmarks → identity-agnostic 554-d vectors, no download.

The default extractor for real driving videos. Its weights ship inside PyPI packages: dlib (the ``dlib-bin``
wheel) brings the HOG face detector and the correlation tracker, ``face_recognition_models`` the 68-point shape
predictor and the CNN (MMOD) face detector. The 68-point predictor was trained on iBUG 300-W, whose licence
excludes commercial use (dlib's model notes say so): a commercial deployment must swap in another landmark model.

Per video, in one streaming pass (only the landmarks, 68 × 2 floats per frame, are kept):

1. **Detect** on a key frame (the first, and whenever the track is lost): the frame is resized so its longer side is
   ``detect_size`` px (bounded cost whatever the resolution; faces down to ~80/detect_size of the longer side are
   found, half that with the 2× retry made when nothing is found). Several faces: ``selection="largest"`` (default)
   or ``"central"`` (nearest the frame centre).
2. **Track** between key frames with dlib's correlation tracker (scale-adaptive DSST, Danelljan et al. 2014). Its
   peak-to-side-lobe ratio is the confidence: below ``min_tracker_confidence``, or every ``redetect_every`` frames
   to stop slow drift, the face is re-detected near the tracked box (then in the whole frame).
3. **Landmarks**: the predictor's box follows the previous frame's landmarks (placed as the detector placed it), not
   the tracker's box, which wobbles by ~5 % even on identical frames and would make the landmarks jitter; the
   tracker's motion moves the box only when it exceeds MOTION_DEAD_ZONE, so fast head motion is not lagged. The box
   is resampled to a canonical crop (face ≈ CANONICAL_FACE px), so dlib's integer landmark coordinates are sub-pixel
   in the frame and the predictor works at one scale for every video.
4. Frames where no face was found are **filled** by linear interpolation of the landmarks between the nearest found
   frames (held at the ends) and counted; fewer found frames than ``min_face_fraction`` → :class:`NoFaceError`.
5. **Smoothing** without lag: a centred Savitzky-Golay filter (``smoothing_window`` frames, quadratic) over each
   landmark's trajectory. Being symmetric it has zero phase delay, and a quadratic fit keeps the peaks of fast mouth
   motion that a causal low-pass would delay and flatten (possible because the whole track exists before features).
6. **Features** (:mod:`.landmark_features`): aligned, relative to the subject's own neutral statistics; every
   component and its range is documented there.

Expect failures on: profile views beyond ~45° yaw or strong pitch (the HOG detector is frontal-only; the ``cnn``
detector reaches further at ~10× the cost), faces under ~40 px, heavy occlusion (hands, microphones, masks), very
dark or motion-blurred frames, and cuts between people (a cut is tracked as one face).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import dlib
import numpy as np

from .landmark_features import expression_features


logger = logging.getLogger(__name__)

MODELS_PACKAGE = "face_recognition_models"
SHAPE_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"
DETECTORS = ("hog", "cnn")
SELECTIONS = ("largest", "central")
CANONICAL_FACE = 256  # px: the face box side in the crop the shape predictor sees
MOTION_DEAD_ZONE = 0.1  # tracker motion above 10 % of the box per frame moves the box; below: its noise (≤ 5 %)
MIN_FRAME_SIDE = 16

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in frame pixels


class NoFaceError(ValueError):
    """A driving video (or too much of it), or a reference image, shows no detectable face; the message names the
    input and the fix."""


def model_file(name: str) -> Path:
    """Path of a model file inside the ``face_recognition_models`` wheel, without importing that package.

    Its ``__init__`` imports ``pkg_resources`` (gone from current setuptools), so ``importlib.resources.files()``,
    which imports the package, fails; the package's resource reader (the same importlib.resources protocol) reads
    its files from the import spec alone.
    """
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"{MODELS_PACKAGE} is not installed; `pip install face_recognition_models==0.3.0` (it ships dlib's models)"
        )
    reader = spec.loader.get_resource_reader(MODELS_PACKAGE)  # type: ignore[attr-defined]
    resource = reader.files() / "models" / name
    with importlib.resources.as_file(resource) as path:  # a real file in a normal install: the path itself
        if not path.is_file():
            raise FileNotFoundError(f"{MODELS_PACKAGE} has no models/{name}; reinstall face_recognition_models==0.3.0")
        return Path(path)


@lru_cache(maxsize=1)
def _shape_predictor() -> dlib.shape_predictor:
    return dlib.shape_predictor(str(model_file(SHAPE_PREDICTOR_FILE)))


@lru_cache(maxsize=2)
def _detector(kind: str) -> dlib.fhog_object_detector | dlib.cnn_face_detection_model_v1:
    if kind == "cnn":
        return dlib.cnn_face_detection_model_v1(str(model_file(CNN_DETECTOR_FILE)))
    return dlib.get_frontal_face_detector()


# ---- detection --------------------------------------------------------------------------------------------------


def _resize_longer_side(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """``image`` resized so its longer side is ``side``, and the scale applied."""
    scale = side / max(image.shape[:2])
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=interpolation), scale


def detect_faces(image: np.ndarray, *, detector: str = "hog", detect_size: int = 480) -> list[Box]:
    """Face boxes in ``image`` (HxWx3 uint8 RGB), in its pixels; a 2× upsampled retry when a pass finds none."""
    small, scale = _resize_longer_side(image, detect_size)
    model = _detector(detector)
    for upsample in (0, 1):
        found = model(small, upsample)
        rects = [d.rect for d in found] if detector == "cnn" else list(found)
        if rects:
            return [
                (r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale) for r in rects
            ]
    return []


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _iou(a: Box, b: Box) -> float:
    inter = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    return inter / max(_area(a) + _area(b) - inter, 1e-9)


def select_face(boxes: list[Box], frame_size: tuple[int, int], selection: str, previous: Box | None = None) -> Box:
    """One box: the one continuing ``previous`` (IoU > 0.3) if any, else the largest or the most central."""
    if previous is not None:
        best = max(boxes, key=lambda box: _iou(box, previous))
        if _iou(best, previous) > 0.3:
            return best
    if selection == "central":
        centre = np.array(frame_size) / 2
        return min(boxes, key=lambda b: float(np.hypot(*((np.array(b[:2]) + b[2:]) / 2 - centre))))
    return max(boxes, key=_area)


def predict_landmarks(image: np.ndarray, box: Box) -> np.ndarray:
    """68 landmarks [68, 2] (x, y pixel centres, float) of the face in ``box`` of ``image`` (HxWx3 uint8 RGB).

    The region around the box is resampled so the box side is CANONICAL_FACE px, the predictor runs there, and the
    points are mapped back: sub-pixel in the frame, and one predictor scale for every resolution.
    """
    side = max(box[2] - box[0], box[3] - box[1], 1.0)
    scale = CANONICAL_FACE / side
    crop_side = 2 * CANONICAL_FACE  # the box plus half a box of context on each side
    # Frame → crop: x' = scale · (x - box_left) + CANONICAL_FACE / 2 (same for y).
    offset = np.array([box[0], box[1]]) - CANONICAL_FACE / 2 / scale
    matrix = np.array([[scale, 0, -scale * offset[0]], [0, scale, -scale * offset[1]]], dtype=np.float64)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    crop = cv2.warpAffine(image, matrix, (crop_side, crop_side), flags=interpolation, borderMode=cv2.BORDER_REPLICATE)
    half = CANONICAL_FACE // 2
    rect = dlib.rectangle(half, half, half + round((box[2] - box[0]) * scale), half + round((box[3] - box[1]) * scale))
    shape = _shape_predictor()(crop, rect)
    points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)  # [68, 2] in the crop
    return points / scale + offset


def detect_face_box(
    image: np.ndarray, *, selection: str = "largest", detector: str = "hog", detect_size: int = 640
) -> tuple[int, int, int, int] | None:
    """The face of a reference image as (left, top, right, bottom) pixels, or None when no face is found.

    The box is the bounding box of the face's 68 landmarks (brows to chin, jaw side to side; no hair or forehead),
    rounded outwards, which is tighter and steadier than the detector's box. For ``fit_reference(face_box=...)``.
    """
    rgb = _check_frame(image, 0, "reference image")
    boxes = detect_faces(rgb, detector=_check_choice(detector, DETECTORS, "detector"), detect_size=detect_size)
    if not boxes:
        return None
    height, width = rgb.shape[:2]
    points = predict_landmarks(
        rgb, select_face(boxes, (width, height), _check_choice(selection, SELECTIONS, "selection"))
    )
    left, top = np.floor(points.min(axis=0)).astype(int)
    right, bottom = np.ceil(points.max(axis=0)).astype(int) + 1
    return int(max(left, 0)), int(max(top, 0)), int(min(right, width)), int(min(bottom, height))


def reference_face_box(
    image: np.ndarray, *, allow_faceless: bool = False, source: str = "reference", **detect: Any
) -> tuple[int, int, int, int] | None:
    """:func:`detect_face_box` for a row's reference image, failing closed: no face raises :class:`NoFaceError`
    (the model would animate whatever the centred crop holds), unless ``allow_faceless``, which returns None (the
    caller then uses a centred crop and records that no face box was found)."""
    box = detect_face_box(image, **detect)
    if box is None and not allow_faceless:
        height, width = image.shape[:2]
        raise NoFaceError(
            f"{source}: no face found in the {width}x{height} image; use a portrait that shows one roughly frontal "
            "face (at least ~1/8 of the image wide), or set --allow-faceless-reference to render it anyway with a "
            "centred crop"
        )
    return box


# ---- tracking ---------------------------------------------------------------------------------------------------


def _centre(box: Box) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _shift(box: Box, offset: np.ndarray) -> Box:
    return box[0] + offset[0], box[1] + offset[1], box[2] + offset[0], box[3] + offset[1]


class _BoxRule:
    """Where the predictor's box sits relative to the face's landmarks, measured on the detection that found it.

    Later boxes come from the previous frame's landmarks by this rule instead of from the tracker, whose box wobbles
    by up to ~5 % of its size even on identical frames — enough to make the landmarks (and the features) jitter.
    """

    def __init__(self, box: Box, points: np.ndarray) -> None:
        centre, radius = self._frame(points)
        self.offset = (_centre(box) - centre) / radius
        self.half = np.array([box[2] - box[0], box[3] - box[1]]) / 2 / radius

    @staticmethod
    def _frame(points: np.ndarray) -> tuple[np.ndarray, float]:
        centre = points.mean(axis=0)
        return centre, float(np.sqrt(((points - centre) ** 2).sum(axis=1).mean()))  # RMS radius

    def box(self, points: np.ndarray) -> Box:
        centre, radius = self._frame(points)
        middle, half = centre + self.offset * radius, self.half * radius
        return middle[0] - half[0], middle[1] - half[1], middle[0] + half[0], middle[1] + half[1]


class _FaceTracker:
    """The chosen face's landmarks, frame after frame (module docstring, steps 1-3).

    The predictor's box comes from the previous landmarks (:class:`_BoxRule`); the correlation tracker runs beside
    it to say when the face is lost (low confidence) and to carry the box along motions faster than
    MOTION_DEAD_ZONE of the box per frame, which the previous landmarks alone would lag.
    """

    def __init__(self, extractor: LandmarkExpressionExtractor) -> None:
        self._settings = extractor
        self._tracker: dlib.correlation_tracker | None = None
        self._tracked: Box = (0.0, 0.0, 0.0, 0.0)  # the tracker's box in the previous frame
        self._points: np.ndarray | None = None  # the previous frame's landmarks
        self._rule: _BoxRule | None = None
        self._since_detection = 0
        self.detections = 0

    def landmarks(self, frame: np.ndarray) -> np.ndarray | None:
        """[68, 2] landmarks of the face in ``frame``, or None when no face is found."""
        small, scale = _resize_longer_side(frame, self._settings.detect_size)
        if self._tracker is not None and self._follow(frame, small, scale):
            return self._points
        return self._acquire(frame, small, scale)

    def _follow(self, frame: np.ndarray, small: np.ndarray, scale: float) -> bool:
        """Carry the face into this frame; False when it is lost (low confidence and not re-detected nearby)."""
        assert self._tracker is not None and self._rule is not None and self._points is not None
        confidence = self._tracker.update(small)
        position = self._tracker.get_position()
        tracked: Box = (
            position.left() / scale,
            position.top() / scale,
            position.right() / scale,
            position.bottom() / scale,
        )
        motion = _centre(tracked) - _centre(self._tracked)
        self._since_detection += 1
        confident = confidence >= self._settings.min_tracker_confidence
        if not confident or self._since_detection >= self._settings.redetect_every:
            found = self._detect_near(frame, tracked)
            if found is None and not confident:
                self._tracker = None
                return False
            if found is not None:
                self._start_tracker(small, scale, found)
                tracked = found
            self._since_detection = 0
        box = self._rule.box(self._points)
        if np.hypot(*motion) > MOTION_DEAD_ZONE * (box[2] - box[0]):
            box = _shift(box, motion)
        self._points = predict_landmarks(frame, box)
        self._tracked = tracked
        return True

    def _acquire(self, frame: np.ndarray, small: np.ndarray, scale: float) -> np.ndarray | None:
        """Detect in the whole frame; prefer the face the track last held, else the ``selection`` rule."""
        settings = self._settings
        boxes = detect_faces(frame, detector=settings.detector, detect_size=settings.detect_size)
        if not boxes:
            return None
        previous = self._rule.box(self._points) if self._rule is not None and self._points is not None else None
        box = select_face(boxes, (frame.shape[1], frame.shape[0]), settings.selection, previous)
        self._points = predict_landmarks(frame, box)
        self._rule = _BoxRule(box, self._points)
        self._start_tracker(small, scale, box)
        self._tracked, self._since_detection = box, 0
        return self._points

    def _detect_near(self, frame: np.ndarray, box: Box) -> Box | None:
        """Detection in the region of twice the box around it: cheap, and it keeps the same person."""
        width, height = box[2] - box[0], box[3] - box[1]
        left, top = int(max(0, box[0] - width / 2)), int(max(0, box[1] - height / 2))
        right, bottom = int(min(frame.shape[1], box[2] + width / 2)), int(min(frame.shape[0], box[3] + height / 2))
        if right - left < MIN_FRAME_SIDE or bottom - top < MIN_FRAME_SIDE:
            return None
        region = frame[top:bottom, left:right]
        size = min(max(region.shape[:2]), self._settings.detect_size)  # the face fills half the region: enough
        boxes = detect_faces(region, detector=self._settings.detector, detect_size=size)
        if not boxes:
            return None
        return max((_shift(b, np.array([left, top])) for b in boxes), key=lambda b: _iou(b, box))

    def _start_tracker(self, small: np.ndarray, scale: float, box: Box) -> None:
        self._tracker = dlib.correlation_tracker()
        self._tracker.start_track(small, dlib.drectangle(*(v * scale for v in box)))
        self.detections += 1


# ---- the extractor ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceTrack:
    """A video's face: landmarks for every frame, and which frames really had a detected face.

    Attributes:
        landmarks: [N, 68, 2] (x, y) in frame pixels; interpolated where ``detected`` is False, then smoothed.
        detected: [N] bool, True where a face was found in the frame.
        frame_size: (width, height) of the frames.
        detections: how many times the face was (re-)detected, the first time included.
    """

    landmarks: np.ndarray
    detected: np.ndarray
    frame_size: tuple[int, int]
    detections: int

    @property
    def interpolated(self) -> int:
        """Frames without a detected face, filled by interpolation."""
        return int((~self.detected).sum())


class LandmarkExpressionExtractor:
    """dlib-tracked 68 landmarks → 554-d identity-agnostic expression vectors; see the module docstring.

    Args:
        selection: which face when several are found: "largest" or "central" (nearest the frame centre).
        min_face_fraction: the fraction of frames (0-1] that must show a face, else :class:`NoFaceError`.
        detector: "hog" (dlib's frontal HOG detector, fast) or "cnn" (MMOD CNN: more poses, ~10× slower).
        detect_size: longer side (px) of the frame copy detection and tracking run on.
        min_tracker_confidence: peak-to-side-lobe ratio below which the face is re-detected (good tracks: 15-30).
        redetect_every: re-detect at least this often (frames), so slow tracker drift never accumulates.
        smoothing_window: Savitzky-Golay window in frames (odd, >= 5), or 1 for no smoothing.
    """

    name = "landmark"

    def __init__(
        self,
        *,
        selection: str = "largest",
        min_face_fraction: float = 0.5,
        detector: str = "hog",
        detect_size: int = 480,
        min_tracker_confidence: float = 8.0,
        redetect_every: int = 25,
        smoothing_window: int = 5,
    ) -> None:
        self.selection = _check_choice(selection, SELECTIONS, "selection")
        self.detector = _check_choice(detector, DETECTORS, "detector")
        if not 0 < min_face_fraction <= 1:
            raise ValueError(f"min_face_fraction must be in (0, 1], got {min_face_fraction}")
        if detect_size < 80:
            raise ValueError(f"detect_size must be >= 80 px (the HOG detector's window), got {detect_size}")
        if redetect_every < 1:
            raise ValueError(f"redetect_every must be >= 1 frame, got {redetect_every}")
        if smoothing_window != 1 and (smoothing_window < 5 or smoothing_window % 2 == 0):
            raise ValueError(f"smoothing_window must be 1 (off) or an odd number >= 5, got {smoothing_window}")
        self.min_face_fraction = min_face_fraction
        self.detect_size = detect_size
        self.min_tracker_confidence = min_tracker_confidence
        self.redetect_every = redetect_every
        self.smoothing_window = smoothing_window

    def extract(self, frames: Iterable[np.ndarray], *, source: str = "the driving video") -> np.ndarray:
        """Frames (HxWx3 uint8 RGB, one size) → float32 [N, 554]; ``source`` names the input in errors.

        Raises:
            NoFaceError: if fewer than ``min_face_fraction`` of the frames show a face.
            ValueError: if there are no frames, or a frame is not HxWx3 uint8 or changes size.
        """
        track = self.track(frames, source=source)
        return expression_features(track.landmarks, track.frame_size)

    def track(self, frames: Iterable[np.ndarray], *, source: str = "the driving video") -> FaceTrack:
        """Steps 1-5 of the module docstring: the face's smoothed, gap-filled landmarks in every frame."""
        tracker = _FaceTracker(self)
        points: list[np.ndarray | None] = []
        frame_size: tuple[int, int] | None = None
        for index, frame in enumerate(frames):
            rgb = _check_frame(frame, index, source)
            size = (rgb.shape[1], rgb.shape[0])
            if frame_size is not None and size != frame_size:
                raise ValueError(
                    f"{source}: frame {index} is {size[0]}x{size[1]}, frame 0 {frame_size[0]}x{frame_size[1]}"
                )
            frame_size = size
            points.append(tracker.landmarks(rgb))
        if frame_size is None:
            raise ValueError(f"{source} has no frames; the landmark extractor needs at least one")
        detected = np.array([p is not None for p in points])
        self._check_coverage(detected, frame_size, source)
        landmarks = savgol_smooth(_fill_gaps(points, detected), self.smoothing_window)
        logger.info(
            "%s: face in %d/%d frames (%d interpolated), %d detection(s)",
            source, detected.sum(), len(detected), (~detected).sum(), tracker.detections,
        )  # fmt: skip
        return FaceTrack(landmarks, detected, frame_size, tracker.detections)

    def _check_coverage(self, detected: np.ndarray, frame_size: tuple[int, int], source: str) -> None:
        found, total = int(detected.sum()), len(detected)
        if found >= max(1, self.min_face_fraction * total):
            return
        smallest = round(80 / self.detect_size * max(frame_size) / 2)
        raise NoFaceError(
            f"{source}: a face was found in {found} of {total} frames ({found / total:.0%}); the landmark "
            f"extractor needs one in at least {self.min_face_fraction:.0%} (min_face_fraction). Use a video that "
            f"shows one roughly frontal face at least ~{smallest} px wide in most frames, or lower min_face_fraction."
        )


# ---- track post-processing --------------------------------------------------------------------------------------


def _fill_gaps(points: list[np.ndarray | None], detected: np.ndarray) -> np.ndarray:
    """[N, 68, 2]: missing frames linearly interpolated between the nearest found ones, held at both ends."""
    found_at = np.flatnonzero(detected)
    known = np.stack([points[i] for i in found_at]).reshape(len(found_at), -1)  # [K, 136]
    frames = np.arange(len(points))
    filled = np.stack([np.interp(frames, found_at, known[:, c]) for c in range(known.shape[1])], axis=1)
    return filled.reshape(len(points), 68, 2)


def savgol_smooth(track: np.ndarray, window: int, order: int = 2) -> np.ndarray:
    """Centred Savitzky-Golay smoothing along axis 0 of ``track`` [N, ...]; zero phase, so no lag.

    Each output is the value at its own position of the least-squares degree-``order`` polynomial through the
    ``window`` samples centred on it; the first and last half-windows use the polynomial through the first / last
    full window (scipy's ``mode="interp"``). ``window`` 1, or a track shorter than the window, is returned as is.
    """
    if window == 1 or len(track) < window:
        return track.copy()
    half = window // 2
    positions = np.arange(-half, half + 1, dtype=np.float64)
    vandermonde = positions[:, None] ** np.arange(order + 1)  # [W, order + 1]
    hat = vandermonde @ np.linalg.pinv(vandermonde)  # [W, W]: samples → fitted values at every position
    flat = track.reshape(len(track), -1)
    windows = np.lib.stride_tricks.sliding_window_view(flat, window, axis=0)  # [N - W + 1, C, W]
    out = np.empty_like(flat, dtype=np.float64)
    out[half : len(flat) - half] = windows @ hat[half]
    out[:half] = hat[:half] @ flat[:window]
    out[len(flat) - half :] = hat[half + 1 :] @ flat[-window:]
    return out.reshape(track.shape)


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_frame(frame: np.ndarray, index: int, source: str) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        described = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"{source}: frame {index} must be an HxWx3 uint8 RGB array (got {described})")
    if min(frame.shape[:2]) < MIN_FRAME_SIDE:
        raise ValueError(f"{source}: frame {index} is {frame.shape[1]}x{frame.shape[0]}; faces need far more pixels")
    return np.ascontiguousarray(frame)
