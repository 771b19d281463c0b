"""Face detection and 222-point landmarks with the released ONNX models (``face_det.onnx``, ``face_landmark.onnx``),
pre- and post-processed as the official FlashPortrait / FantasyPortrait face tools do, so the PD-FGC encoder sees
the crops the released model was trained on.

1. detector — NanoDet-style, one class: the frame letterboxed (centred, aspect kept) into 160×272, normalised with
   BGR mean/std; per stride 8/16/32 a score map and a DFL box map (softmax over 8 bins, expectation × stride, around
   grid points without a half-cell offset); top 1000 per level, score > 0.4, hard NMS at IoU 0.3; boxes mapped back;
2. landmarks — a 128×128 crop (margin 0.15) from a box, then twice more from the previous landmarks rotated so the
   eyes are level; 444 outputs = 222 x then 222 y in [0, 1] × 128, plus (pitch, yaw) and a score;
3. tracking — per region One-Euro smoothing whose parameter follows the region's motion; faces that overlap by
   IoU > 0.12 keep the larger; faces with score < 1e-4 or a landmark box under 96 px are dropped;
4. two passes, run here in lockstep over one stream of frames (pass 2 at frame t only needs pass 1's box of frame t):
   pass 1 tracks from detections, pass 2 restarts from pass 1's first box, and its smoothed landmarks are the result.

Frames are BGR uint8 here (OpenCV order, as the ONNX models were trained); the extractor converts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np


DET_INPUT_HW = (272, 160)
DET_MEAN = np.array([103.53, 116.28, 123.675], dtype=np.float32).reshape(1, 1, 3) / 255
DET_STD = np.array([57.375, 57.12, 58.395], dtype=np.float32).reshape(1, 1, 3) / 255
DET_STRIDES = (8, 16, 32)
DET_REG_MAX = 7
DET_SCORE_THRESHOLD = 0.4
DET_IOU_THRESHOLD = 0.3
DET_CANDIDATES = 1000
LANDMARK_SIZE = 128
LANDMARK_MARGIN = 0.15
LANDMARK_PASSES = 3
LEFT_EYE_CORNER, RIGHT_EYE_CORNER = 74, 96
MIN_FACE_PROB = 1e-4
MIN_FACE_PX = 96
DUPLICATE_IOU = 0.12

# (indices, indices whose motion drives the filter, still threshold, base, max) per face region.
SMOOTHING_REGIONS = (
    (range(0, 33), range(9, 24), 0.005, 0.05, 0.3),  # contour, driven by its lower part
    (range(33, 48), None, 0.003, 0.03, 0.7),  # nose
    (range(48, 74), None, 0.003, 0.02, 0.5),  # brows
    (range(74, 96), None, 0.003, 0.03, 0.7),  # left eye
    (range(96, 118), None, 0.003, 0.03, 0.7),  # right eye
    (range(118, 182), None, 0.003, 0.05, 0.7),  # mouth
    (range(182, 202), None, 0.003, 0.03, 0.7),  # left pupil
    (range(202, 222), None, 0.003, 0.03, 0.7),  # right pupil
)
FAST_MOTION = 0.02


def onnx_session(path: str | Path, providers: list[str] | None = None):
    """An onnxruntime session on the given providers (default: CUDA when this onnxruntime has it, then CPU)."""
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist (part of the FlashPortrait download)")
    if providers is None:
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise ValueError(f"cannot load ONNX model {path}: {exc}; download it again") from None
    if len(session.get_inputs()) != 1:
        raise ValueError(f"ONNX model {path} has {len(session.get_inputs())} inputs; the face models take one image")
    return session


# 1. Detector ------------------------------------------------------------------------------------------------------
def letterbox_matrix(width: int, height: int, out_w: int, out_h: int) -> np.ndarray:
    """3×3 matrix that centres a width×height frame in out_w×out_h, scaled to fit with its aspect kept."""
    ratio = out_h / height if width / height < out_w / out_h else out_w / width
    centre = np.array([[1, 0, -width / 2], [0, 1, -height / 2], [0, 0, 1]], dtype=np.float64)
    scale = np.diag([ratio, ratio, 1.0])
    shift = np.array([[1, 0, out_w / 2], [0, 1, out_h / 2], [0, 0, 1]], dtype=np.float64)
    return shift @ scale @ centre


def _iou(boxes: np.ndarray, box: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    top_left = np.maximum(boxes[:, :2], box[:2])
    bottom_right = np.minimum(boxes[:, 2:], box[2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=1)
    area = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0.0, None), axis=1)
    area_box = np.prod(np.clip(box[2:] - box[:2], 0.0, None))
    return inter / (area + area_box - inter + eps)


def hard_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS, highest score first (ties: the later index first, as the official argsort)."""
    order = list(np.argsort(scores))
    kept = []
    while order:
        current = order.pop()
        kept.append(current)
        if order:
            rest = np.array(order)
            order = list(rest[_iou(boxes[rest], boxes[current]) <= iou_threshold])
    return np.array(kept, dtype=np.int64)


class FaceDetector:
    """``face_det.onnx``: [1, 3, 272, 160] → 3 score maps [1, N_s, 1] then 3 box maps [1, N_s, 32]."""

    def __init__(self, path: str | Path, providers: list[str] | None = None):
        self.session = onnx_session(path, providers)
        self.input_name = self.session.get_inputs()[0].name

    def detect(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Face boxes [K, 4] (x0, y0, x1, y1 int32 in frame pixels) and their scores [K], best first."""
        height, width = frame_bgr.shape[:2]
        out_h, out_w = DET_INPUT_HW
        matrix = letterbox_matrix(width, height, out_w, out_h)
        resized = cv2.warpPerspective(frame_bgr, matrix, dsize=(out_w, out_h))
        pixels = (resized.astype(np.float32) / 255 - DET_MEAN) / DET_STD
        outputs = self.session.run(None, {self.input_name: pixels.transpose(2, 0, 1)[None]})
        boxes, scores = [], []
        for stride, score_map, box_map in zip(DET_STRIDES, outputs[:3], outputs[3:]):
            score = np.squeeze(score_map).reshape(-1)  # one class
            rows, cols = np.meshgrid(np.arange(out_h / stride), np.arange(out_w / stride), indexing="ij")
            centres = np.stack([cols.ravel(), rows.ravel()] * 2, axis=1) * stride  # no half-cell offset
            bins = np.squeeze(box_map).reshape(-1, DET_REG_MAX + 1)
            bins = np.exp(bins - bins.max(axis=1, keepdims=True))
            bins /= bins.sum(axis=1, keepdims=True)
            distance = (bins @ np.arange(DET_REG_MAX + 1)).reshape(-1, 4) * stride
            top = np.argsort(score)[::-1][:DET_CANDIDATES]
            boxes.append(centres[top] + np.array([-1, -1, 1, 1]) * distance[top])
            scores.append(score[top])
        boxes_all, scores_all = np.concatenate(boxes), np.concatenate(scores)
        keep = scores_all > DET_SCORE_THRESHOLD
        boxes_all, scores_all = boxes_all[keep], scores_all[keep]
        if not len(scores_all):
            return np.zeros((0, 4), np.int32), np.zeros(0, np.float32)
        picked = hard_nms(boxes_all, scores_all, DET_IOU_THRESHOLD)
        return self._to_frame(boxes_all[picked], np.linalg.inv(matrix), width, height), scores_all[picked]

    @staticmethod
    def _to_frame(boxes: np.ndarray, inverse: np.ndarray, width: int, height: int) -> np.ndarray:
        corners = np.ones((len(boxes) * 4, 3))
        corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 2)
        mapped = corners @ inverse.T
        mapped = (mapped[:, :2] / mapped[:, 2:3]).reshape(len(boxes), 8)
        xs, ys = mapped[:, [0, 2, 4, 6]], mapped[:, [1, 3, 5, 7]]
        out = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
        return out.astype(np.float32).astype(np.int32)


# 2. Landmarks ----------------------------------------------------------------------------------------------------
def rotation_matrix(center: tuple[float, float], angle_deg: float, scale: float) -> np.ndarray:
    return cv2.getRotationMatrix2D((float(center[0]), float(center[1])), float(angle_deg), float(scale))


def transform_points(points: np.ndarray, matrix: np.ndarray, invert: bool = False) -> np.ndarray:
    if invert:
        matrix = cv2.invertAffineTransform(matrix)
    return np.squeeze(cv2.transform(points[:, None, :], matrix))


def crop_from_box(box: np.ndarray, size: int = LANDMARK_SIZE, margin: float = LANDMARK_MARGIN) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    matrix = rotation_matrix((cx, cy), 0.0, size / max(x1 - x0, y1 - y0) * (1 - margin))
    matrix[:, 2] += [size / 2 - cx, size / 2 - cy]
    return matrix


def crop_from_points(
    points: np.ndarray, angle_deg: float, size: int = LANDMARK_SIZE, margin: float = LANDMARK_MARGIN
) -> np.ndarray:
    """Crop around landmarks rotated by ``angle_deg`` (eyes level), scaled to the rotated extent, re-centred."""
    cx = (points[:, 0].min() + points[:, 0].max()) / 2
    cy = (points[:, 1].min() + points[:, 1].max()) / 2
    rotated = transform_points(points, rotation_matrix((cx, cy), angle_deg, 1.0))
    scale = size / max(np.ptp(rotated[:, 0]), np.ptp(rotated[:, 1])) * (1 - margin)
    scaled = transform_points(points, rotation_matrix((cx, cy), angle_deg, scale))
    matrix = rotation_matrix((cx, cy), angle_deg, scale)
    matrix[:, 2] += [
        size / 2 - (scaled[:, 0].min() + scaled[:, 0].max()) / 2,
        size / 2 - (scaled[:, 1].min() + scaled[:, 1].max()) / 2,
    ]
    return matrix


def eye_roll(points: np.ndarray) -> float:
    left, right = points[LEFT_EYE_CORNER], points[RIGHT_EYE_CORNER]
    return float(np.arctan2(right[1] - left[1], right[0] - left[0] + 1e-8))


@dataclass
class Landmarks:
    points: np.ndarray  # [222, 2] frame pixels
    euler: np.ndarray  # (pitch, yaw, roll) radians
    prob: float


class LandmarkModel:
    """``face_landmark.onnx``: [1, 3, 128, 128] in [0, 1] → landmarks [1, 444], euler [1, ≥2], prob [1, 1]."""

    def __init__(self, path: str | Path, providers: list[str] | None = None):
        self.session = onnx_session(path, providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, frame_bgr: np.ndarray, matrix: np.ndarray) -> Landmarks:
        crop = cv2.warpAffine(frame_bgr, matrix, (LANDMARK_SIZE, LANDMARK_SIZE))
        pixels = crop.transpose(2, 0, 1).astype(np.float32)[None] / 255.0
        landmark, euler, prob = self.session.run(self.output_names, {self.input_name: pixels})
        points = np.reshape(landmark[0], (2, -1)).T * LANDMARK_SIZE
        roll = eye_roll(points)
        points = transform_points(points, matrix, invert=True)
        return Landmarks(points, np.array([euler[0, 0], euler[0, 1], roll], np.float32), float(np.ravel(prob)[0]))

    def align(self, frame_bgr: np.ndarray, box: np.ndarray | None = None, previous: np.ndarray | None = None):
        """Three passes: from ``box`` (or from ``previous`` landmarks, eyes levelled), then twice from the result."""
        if previous is not None:
            matrix = crop_from_points(previous, np.rad2deg(eye_roll(previous)))
        else:
            matrix = crop_from_box(box)
        result = self._run(frame_bgr, matrix)
        for _ in range(LANDMARK_PASSES - 1):
            result = self._run(frame_bgr, crop_from_points(result.points, np.rad2deg(result.euler[2])))
        return result


# 3. Tracking and smoothing ------------------------------------------------------------------------------------------
def _alpha(period: float, cutoff: float) -> float:
    r = 2 * math.pi * cutoff * period
    return r / (r + 1)


@dataclass
class OneEuro:
    """One-Euro filter in the official parameterisation: the region's parameter is both the period and β."""

    dx_prev: float | np.ndarray = 0.0

    def __call__(self, x: np.ndarray, x_prev: np.ndarray, value: float) -> np.ndarray:
        if value <= 0.0:
            # A region that did not move at all: the official code divides by zero here and turns the landmarks
            # (and every later frame's) into NaN; the filter's output would be x_prev = x anyway.
            return x
        dx = (x - x_prev) / value
        dx_hat = _alpha(value, 1.0) * dx + (1 - _alpha(value, 1.0)) * self.dx_prev
        a = _alpha(value, 1.0 + value * np.abs(dx_hat))
        self.dx_prev = dx_hat
        return a * x + (1 - a) * x_prev


@dataclass
class Smoother:
    filters: list[OneEuro] = field(default_factory=lambda: [OneEuro() for _ in SMOOTHING_REGIONS])
    previous: np.ndarray | None = None

    def __call__(self, points: np.ndarray, face_scale: float) -> np.ndarray:
        if self.previous is None:
            self.previous = points.copy()
            return points
        moved = np.linalg.norm(points - self.previous, axis=1) / face_scale
        out = points.copy()
        for filt, (idx, drive, still, base, fast) in zip(self.filters, SMOOTHING_REGIONS):
            idx = list(idx)
            d = float(np.mean(moved[list(drive or idx)]))
            if d < still:
                value = base * d / still
            elif d < FAST_MOTION:
                value = base + (fast - base) * (d - still) / (FAST_MOTION - still)
            else:
                value = fast
            out[idx] = filt(points[idx], self.previous[idx], value)
        self.previous = out
        return out


@dataclass
class TrackedFace:
    rect: np.ndarray  # x0, y0, x1, y1
    face_scale: float
    smoother: Smoother = field(default_factory=Smoother)
    points: np.ndarray | None = None

    @classmethod
    def from_box(cls, box: np.ndarray) -> TrackedFace:
        box = np.asarray(box, dtype=np.float64)
        return cls(box, float(np.hypot(box[2] - box[0], box[3] - box[1])))

    @property
    def area(self) -> float:
        return float((self.rect[3] - self.rect[1]) * (self.rect[2] - self.rect[0]))


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    if inter == 0:
        return 0.0
    area_a = abs((a[2] - a[0]) * (a[3] - a[1]))
    area_b = abs((b[2] - b[0]) * (b[3] - b[1]))
    return float(inter / (area_a + area_b - inter))


class FaceTracker:
    """The official FaceModel: detections + tracked faces → aligned, smoothed, de-duplicated faces per frame."""

    def __init__(self, detector: FaceDetector, landmarks: LandmarkModel):
        self.detector, self.landmarks = detector, landmarks
        self.faces: list[TrackedFace] = []

    def reset(self) -> None:
        self.faces = []

    def step(self, frame_bgr: np.ndarray, first_box: np.ndarray | None = None) -> TrackedFace | None:
        """Track one frame; ``first_box`` replaces the detector while no face is tracked. Returns the largest face."""
        if not self.faces and first_box is not None:
            boxes = [first_box]
        else:
            boxes = list(self.detector.detect(frame_bgr)[0])
        self.faces.extend(TrackedFace.from_box(b) for b in boxes)
        dropped: set[int] = set()
        for i, face in enumerate(self.faces):
            result = self.landmarks.align(frame_bgr, box=face.rect, previous=face.points)
            if result.prob < MIN_FACE_PROB:
                dropped.add(i)
                continue
            points = face.smoother(result.points, face.face_scale)
            face.points = points
            face.rect = np.array([points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max()])
            if face.rect[2] - face.rect[0] < MIN_FACE_PX or face.rect[3] - face.rect[1] < MIN_FACE_PX:
                dropped.add(i)
            pitch, yaw = np.rad2deg(result.euler[0]), np.rad2deg(result.euler[1])
            face.face_scale = float(np.linalg.norm(points[0] - points[32])) * (1 + (abs(pitch) + 0.6 * abs(yaw)) / 18)
        for i, face in enumerate(self.faces):  # overlapping faces: keep the larger (ties: the earlier)
            if i in dropped:
                continue
            for j, other in enumerate(self.faces):
                if i == j or j in dropped:
                    continue
                if _box_iou(face.rect, other.rect) > DUPLICATE_IOU:
                    dropped.add(i if face.area - other.area < 0 else j)
        self.faces = [f for i, f in enumerate(self.faces) if i not in dropped]
        return max(self.faces, key=lambda f: f.area) if self.faces else None


def track_landmarks(
    frames_bgr: Iterable[np.ndarray], detector: FaceDetector, landmarks: LandmarkModel
) -> Iterator[np.ndarray | None]:
    """Smoothed 222 landmarks per frame (None where no face was found), both official passes in lockstep."""
    first_pass, second_pass = FaceTracker(detector, landmarks), FaceTracker(detector, landmarks)
    for frame in frames_bgr:
        face = first_pass.step(frame)
        if face is None:
            yield None
            continue
        result = second_pass.step(frame, first_box=face.rect.copy())
        yield None if result is None else result.points
