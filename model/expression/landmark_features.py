"""68 facial landmarks per frame → identity-agnostic 554-d expression vectors (the geometry half of ``landmark``).

Pure geometry on numbers: no images, no detector (that is :mod:`.landmark`), so every formula here can be tested
with hand-made landmark tracks. Landmark numbering is iBUG 300-W / dlib's 68 points: jaw 0-16, brows 17-26, nose
27-35, eyes 36-47, outer lips 48-59, inner lips 60-67. "Image-left" means the left of the picture (the subject's
right eye is landmarks 36-41).

IDENTITY-AGNOSTIC, HOW. Every frame is first *aligned*: a similarity transform (scale, in-plane rotation,
translation; least squares over the rigid ANCHORS: eye corners and nose) maps it onto the subject's own mean face,
so head motion leaves the expression measurements alone. Every component is then the frame's value minus the
subject's **neutral** value, and every length is divided by the subject's own neutral interocular distance ``u``
(eye centre to eye centre) — or for the mouth map by the neutral mouth width — so a wider face, eyes set further
apart or a closer camera change the neutral, not the features. Neutral statistics come from the video itself:
the neutral *shape* is the per-landmark median over the "rest" frames (the quarter of frames with the least open
mouth); the neutral *pose* is the median pose over all frames. A video with a single expression gives all-zero
features.

The 554 = 6 + 6 + 30 + 512 components, in order (typical ranges for real talking heads; values are not clipped):

- headpose (6): 0-2 yaw, pitch, roll in radians minus their medians, from ``cv2.solvePnP`` of a generic 3-D face
  (GENERIC_FACE_MM, pinhole camera with focal length = the longer frame side), typically |·| < 0.5: yaw > 0 = the
  face turns towards the image's right, pitch > 0 = the face tilts up, roll > 0 = counter-clockwise on screen;
  3-4 x, y of the anchors' centre minus its median, in neutral interocular distances (right / down positive),
  typically |·| < 2; 5 log of the face's size over its median size, typically |·| < 0.7.
- eye (6): 0-1 eye openness of the image-left / image-right eye, ``EAR / EAR_neutral - 1`` with the eye aspect
  ratio ``EAR = (|p1 - p5| + |p2 - p4|) / (2 |p0 - p3|)`` over the eye's six points: 0 = as open as neutral,
  -1 = closed, > 0 = wider, in [-1, ~1]; 2-3 inner-brow raise (points 20-21 / 22-23) and 4-5 outer-brow raise
  (17-18 / 25-26), image-left then image-right, upward displacement in ``u``, typically [-0.3, 0.3].
- emotion (30): 0 mouth opening (mean inner-lip gap of the pairs 61-67, 62-66, 63-65), typically [-0.1, 0.8];
  1 mouth width (48-54); 2 outer mouth height (51-57); 3 jaw drop (vertical 33 → 8), each a change in ``u``,
  typically |·| < 0.6; 4-29 displacement (dx, dy) of the 13 points EMOTION_POINTS (the ten brow points, the mouth
  corners 48 and 54, the lower lip's bottom 57), in ``u``, x right / y down, typically |·| < 0.5.
- mouth (512): a 16 × 32 (rows × columns, row-major) soft raster of the aligned mouth in a frame centred on the
  neutral mouth and scaled by the neutral mouth width ``w`` (x in [-0.8, 0.8] w, y in [-0.5, 1.1] w, down
  positive, so a dropping jaw stays inside): each cell holds its area covered by the outer-lip polygon (48-59)
  plus that covered by the inner-lip polygon (60-67) — 0 outside, 1 on the lips, 2 in the opening — minus the
  same raster of the neutral mouth, in [-2, 2]. It carries the whole pose-aligned, scale-normalised mouth shape
  (opening, width, asymmetry, protrusion of the lips) in the 512 slots of PD-FGC's mouth block, in the same 16 × 32
  layout as the pixel extractor's mouth block.

Limits: the 3-D model is generic, so absolute yaw/pitch are approximate (relative motion is what is used); the
similarity alignment does not undo yaw, so beyond ~25° yaw the mouth map foreshortens; 68 landmarks see no gaze,
cheeks or tongue.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from . import EMOTION_DIM, EYE_DIM, FEATURE_DIM, HEADPOSE_DIM, MOUTH_DIM


ANCHORS = (27, 28, 29, 30, 31, 33, 35, 36, 39, 42, 45)  # rigid under expressions: nose and eye corners
# A generic 3-D face (mm; x to the image's right, y down, z away from the camera; origin at the nose tip) for the
# same rigid points, from average adult proportions: eye corners 90 mm (outer) and 28 mm (inner) apart, 40 mm above
# and 30-38 mm behind the nose tip; the bridge rises 45 mm from the tip to the nasion.
GENERIC_FACE_MM = {
    27: (0.0, -45.0, 24.0),
    28: (0.0, -30.0, 16.0),
    29: (0.0, -15.0, 8.0),
    30: (0.0, 0.0, 0.0),
    31: (-13.0, 8.0, 16.0),
    33: (0.0, 10.0, 12.0),
    35: (13.0, 8.0, 16.0),
    36: (-45.0, -40.0, 38.0),
    39: (-14.0, -40.0, 30.0),
    42: (14.0, -40.0, 30.0),
    45: (45.0, -40.0, 38.0),
}
EYES = (tuple(range(36, 42)), tuple(range(42, 48)))  # image-left, image-right; points p0..p5 of the EAR formula
INNER_BROWS = ((20, 21), (22, 23))
OUTER_BROWS = ((17, 18), (25, 26))
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))
EMOTION_POINTS = (*range(17, 27), 48, 54, 57)
MIN_NEUTRAL_EAR = 0.1  # open eyes measure 0.2-0.35
REST_QUANTILE = 0.25  # the neutral shape is the median over the frames whose mouth is this least open
ALIGN_ITERATIONS = 3  # generalised Procrustes: align to frame 0, then twice to the mean aligned anchors
MOUTH_GRID = (16, 32)  # rows, columns
MOUTH_X = (-0.8, 0.8)  # in neutral mouth widths
MOUTH_Y = (-0.5, 1.1)
MOUTH_SUPERSAMPLE = 8  # each raster cell is the mean of 8 × 8 filled sub-pixels

_POSE_INDEX = tuple(GENERIC_FACE_MM)
_POSE_MODEL = np.array([GENERIC_FACE_MM[i] for i in _POSE_INDEX], dtype=np.float64)  # [11, 3]


@dataclass(frozen=True)
class AlignedTrack:
    """A track aligned onto the subject's mean face, with what the alignment removed and the neutral face.

    Attributes:
        aligned: [N, 68, 2] landmarks in the mean face's coordinates (pixels of the first frame's scale).
        neutral: [68, 2] the neutral face: per-landmark median over the rest frames, in the same coordinates.
        scale: [N] how much larger the face is in each frame than the mean face.
        centre: [N, 2] the anchors' centre in frame pixels.
        unit: the neutral interocular distance in aligned coordinates (the length unit ``u``).
    """

    aligned: np.ndarray
    neutral: np.ndarray
    scale: np.ndarray
    centre: np.ndarray
    unit: float


def _fit_similarity(points: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per frame the complex factor ``a`` and offset ``b`` of the least-squares similarity z ↦ a·z + b.

    ``points`` [N, K, 2] → ``target`` [K, 2]; returns [N, 2] complex (a, b). With complex coordinates the 2-D
    Procrustes problem has the closed form a = Σ conj(p̃)·q̃ / Σ|p̃|² on centred points (Umeyama 1991, 2-D case).
    """
    p = points[..., 0] + 1j * points[..., 1]  # [N, K]
    q = target[:, 0] + 1j * target[:, 1]  # [K]
    p_mean, q_mean = p.mean(axis=1, keepdims=True), q.mean()
    p_c, q_c = p - p_mean, q - q_mean
    a = (np.conj(p_c) * q_c).sum(axis=1) / np.maximum((np.abs(p_c) ** 2).sum(axis=1), 1e-12)  # [N]
    b = q_mean - a * p_mean[:, 0]
    return np.stack([a, b], axis=1)


def _apply(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply per-frame similarities [N, 2] complex to points [N, P, 2]."""
    z = points[..., 0] + 1j * points[..., 1]
    mapped = transform[:, :1] * z + transform[:, 1:]
    return np.stack([mapped.real, mapped.imag], axis=-1)


def _inner_lip_gap(points: np.ndarray) -> np.ndarray:
    """[..., 68, 2] → [...] mean distance between the inner lips' facing points."""
    return np.mean([np.linalg.norm(points[..., a, :] - points[..., b, :], axis=-1) for a, b in INNER_LIP_PAIRS], 0)


def _eye_aspect(points: np.ndarray, eye: tuple[int, ...]) -> np.ndarray:
    """[..., 68, 2] → [...] eye aspect ratio (Soukupová & Čech 2016): eyelid gap over eye width."""
    p = [points[..., i, :] for i in eye]
    height = np.linalg.norm(p[1] - p[5], axis=-1) + np.linalg.norm(p[2] - p[4], axis=-1)
    return height / np.maximum(2 * np.linalg.norm(p[0] - p[3], axis=-1), 1e-9)


def align(landmarks: np.ndarray) -> AlignedTrack:
    """Align every frame's landmarks [N, 68, 2] onto the subject's mean face and find its neutral face."""
    anchors = list(ANCHORS)
    target = landmarks[0, anchors]
    for _ in range(ALIGN_ITERATIONS):
        transform = _fit_similarity(landmarks[:, anchors], target)
        aligned = _apply(transform, landmarks)  # [N, 68, 2]
        target = aligned[:, anchors].mean(axis=0)
    gap = _inner_lip_gap(aligned)  # [N]
    rest = gap <= np.quantile(gap, REST_QUANTILE)
    neutral = np.median(aligned[rest], axis=0)  # [68, 2]
    unit = float(np.linalg.norm(neutral[42:48].mean(0) - neutral[36:42].mean(0)))
    if unit <= 1e-6:
        raise ValueError("the neutral face has both eyes at the same place; the landmark track is degenerate")
    return AlignedTrack(
        aligned=aligned,
        neutral=neutral,
        scale=1.0 / np.abs(transform[:, 0]),
        centre=landmarks[:, anchors].mean(axis=1),
        unit=unit,
    )


def head_angles(landmarks: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """[N, 68, 2] image landmarks → [N, 3] (yaw, pitch, roll) in radians from solvePnP on GENERIC_FACE_MM.

    Signs as in the module docstring. The camera is a pinhole with focal length = the longer frame side (≈ 53°
    field of view) and the principal point at the frame centre; lens distortion is ignored.
    """
    width, height = frame_size
    focal = float(max(width, height))
    camera = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=np.float64)
    angles = np.zeros((len(landmarks), 3))
    rvec, tvec = None, None
    for index, points in enumerate(landmarks):
        image_points = np.ascontiguousarray(points[list(_POSE_INDEX)], dtype=np.float64)
        if rvec is None:
            ok, rvec, tvec = cv2.solvePnP(_POSE_MODEL, image_points, camera, None, flags=cv2.SOLVEPNP_EPNP)
        # Refine from the previous frame's pose: consecutive frames are close, so this converges in a few steps.
        ok, rvec, tvec = cv2.solvePnP(
            _POSE_MODEL, image_points, camera, None, rvec, tvec, useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE
        )
        if not ok:
            raise ValueError(f"solvePnP found no head pose for frame {index}; its landmarks are degenerate")
        angles[index] = _euler(cv2.Rodrigues(rvec)[0])
    return angles


def _euler(rotation: np.ndarray) -> tuple[float, float, float]:
    """Model → camera rotation as (yaw, pitch, roll) with R = Rz(-roll) · Ry(-yaw) · Rx(pitch).

    Camera axes: x right, y down, z forward. A face turning to the image's right rotates its nose (at -z) towards
    +x: that is a negative rotation about y, hence -yaw; a counter-clockwise turn on screen is a negative rotation
    about the forward z axis (with y down), hence -roll; tilting up moves the nose towards -y: +pitch about x.
    """
    yaw = np.arcsin(np.clip(rotation[2, 0], -1.0, 1.0))
    pitch = np.arctan2(rotation[2, 1], rotation[2, 2])
    roll = -np.arctan2(rotation[1, 0], rotation[0, 0])
    return float(yaw), float(pitch), float(roll)


def _mouth_raster(mouth: np.ndarray) -> np.ndarray:
    """[20, 2] mouth points (48-67) in mouth-frame units → [16, 32] outer-lip + inner-lip coverage in [0, 2]."""
    rows, cols = MOUTH_GRID
    ss = MOUTH_SUPERSAMPLE
    # Mouth-frame units → sub-pixel canvas coordinates, at 1/16 of a sub-pixel (fillPoly's shift=4).
    span = np.array([MOUTH_X[1] - MOUTH_X[0], MOUTH_Y[1] - MOUTH_Y[0]])
    canvas = (mouth - np.array([MOUTH_X[0], MOUTH_Y[0]])) / span * np.array([cols * ss, rows * ss])
    fixed = np.rint(np.clip(canvas, -1e4, 1e4) * 16).astype(np.int32)
    coverage = np.zeros((rows * ss, cols * ss), dtype=np.float32)
    for polygon in (fixed[:12], fixed[12:]):
        layer = np.zeros_like(coverage, dtype=np.uint8)
        cv2.fillPoly(layer, [polygon], 1, lineType=cv2.LINE_8, shift=4)
        coverage += layer
    return coverage.reshape(rows, ss, cols, ss).mean(axis=(1, 3))  # [16, 32]


def expression_features(landmarks: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """Landmarks [N, 68, 2] (frame pixels, every frame filled) → float32 [N, 554] as in the module docstring."""
    track = align(landmarks)
    features = np.concatenate(
        [_headpose(track, landmarks, frame_size), _eye(track), _emotion(track), _mouth(track)], axis=1
    )
    assert features.shape[1] == FEATURE_DIM  # the four blocks are built with their documented widths
    return features.astype(np.float32)


def _headpose(track: AlignedTrack, landmarks: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    angles = head_angles(landmarks, frame_size)  # [N, 3]
    angles = angles - np.median(angles, axis=0)
    unit_px = track.unit * np.median(track.scale)  # neutral interocular distance in frame pixels
    shift = (track.centre - np.median(track.centre, axis=0)) / unit_px  # [N, 2]
    log_scale = np.log(track.scale) - np.median(np.log(track.scale))
    out = np.concatenate([angles, shift, log_scale[:, None]], axis=1)
    assert out.shape[1] == HEADPOSE_DIM
    return out


def _eye(track: AlignedTrack) -> np.ndarray:
    # A neutral EAR below MIN_NEUTRAL_EAR (eyes shut in most rest frames) would blow the ratio up: floor it.
    columns = [
        _eye_aspect(track.aligned, eye) / max(float(_eye_aspect(track.neutral, eye)), MIN_NEUTRAL_EAR) - 1.0
        for eye in EYES
    ]
    for brows in (INNER_BROWS, OUTER_BROWS):
        for points in brows:
            height = track.aligned[:, list(points), 1].mean(axis=1)
            columns.append((track.neutral[list(points), 1].mean() - height) / track.unit)  # up = positive
    out = np.stack(columns, axis=1)
    assert out.shape[1] == EYE_DIM
    return out


def _emotion(track: AlignedTrack) -> np.ndarray:
    def measures(points: np.ndarray) -> np.ndarray:  # [..., 68, 2] → [..., 4]
        return np.stack(
            [
                _inner_lip_gap(points),
                np.linalg.norm(points[..., 54, :] - points[..., 48, :], axis=-1),
                np.linalg.norm(points[..., 57, :] - points[..., 51, :], axis=-1),
                points[..., 8, 1] - points[..., 33, 1],
            ],
            axis=-1,
        )

    scalars = (measures(track.aligned) - measures(track.neutral)) / track.unit  # [N, 4]
    chosen = list(EMOTION_POINTS)
    moves = (track.aligned[:, chosen] - track.neutral[chosen]) / track.unit  # [N, 13, 2]
    out = np.concatenate([scalars, moves.reshape(len(moves), -1)], axis=1)
    assert out.shape[1] == EMOTION_DIM
    return out


def _mouth(track: AlignedTrack) -> np.ndarray:
    centre = track.neutral[48:68].mean(axis=0)
    width = float(np.linalg.norm(track.neutral[54] - track.neutral[48]))
    if width <= 1e-6:
        raise ValueError("the neutral mouth has zero width; the landmark track is degenerate")
    neutral = _mouth_raster((track.neutral[48:68] - centre) / width)
    rasters = [(_mouth_raster((frame[48:68] - centre) / width) - neutral).reshape(-1) for frame in track.aligned]
    out = np.stack(rasters)  # [N, 512]
    assert out.shape[1] == MOUTH_DIM
    return out
