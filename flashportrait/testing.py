"""Synthetic, public-domain test inputs: the astronaut portrait and driving videos made from it with known expressions.

The only face we ship is scikit-image's ``astronaut`` (Eileen Collins, a NASA photograph in the public domain).
Driving videos are synthesised from it with per-frame ground truth (mouth opening, blink, head roll), so tests of
the expression extractors and of the whole pipeline can check that what went in comes out, without photos of real
people and without downloads.

Two generators:

- :func:`warped_driving_frames` (the realistic one, for landmark extractors, benchmarks and demos): a
  landmark-driven piecewise-affine warp of the portrait. The astronaut's 68 facial landmarks (iBUG 300-W order) are
  moved to their expressed positions — lower lip and jaw down for the mouth, upper eyelids down onto the lower ones
  for a blink, a 3-D rotation of the face points for yaw, an in-plane rotation of the head for roll — and every
  triangle of a mesh over face, head and background is mapped affinely, so the face keeps its real texture. A
  second "identity" is the same face reshaped (:class:`FaceShape`: eye distance, face width). Any length, fps,
  resolution and aspect ratio.
- :func:`synthetic_driving_frames` (the original, kept bit-for-bit for the pixel extractor's tests): a dark ellipse
  painted over the lips, an eyelid-coloured ellipse sliding over each eye, and the whole picture rotated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image


# The face in skimage.data.astronaut() (512×512): a square from forehead-hair to just below the chin, chosen by
# eye so that the eyes sit at ~42 % and the mouth at ~68 % of the height (the framing the pixel extractor assumes).
ASTRONAUT_FACE_BOX = (30, 137, 170)  # (top, left, side) in pixels of the 512×512 image

# Face geometry in the portrait, as fractions (row, col) of its side; measured on the crop above.
MOUTH_CENTER = (0.67, 0.505)
MOUTH_HALF_WIDTH = 0.085
MOUTH_MAX_HALF_HEIGHT = 0.06
MOUTH_COLOR = (35.0, 12.0, 18.0)  # an open mouth's dark interior
EYE_CENTERS = ((0.418, 0.400), (0.418, 0.643))  # image-left eye, image-right eye
EYE_HALF_SIZE = (0.03, 0.06)  # (half-height, half-width)
CHEEK_BOX = (0.50, 0.58, 0.33, 0.40)  # (top, bottom, left, right): bare skin, the eyelid colour's source
EYELID_SHADE = 0.75  # an eyelid is a little darker than the cheek
ROLL_CENTER = (0.55, 0.51)  # the nose
MAX_ROLL_DEG = 5.0
MAX_YAW_DEG = 8.0

# Motion speeds (Hz) of the seeded curves, and the blink timing: a blink every ~3 s, lasting ~0.2 s.
MOUTH_FREQ_HZ = (0.3, 1.5)
ROLL_FREQ_HZ = (0.1, 0.5)
BLINK_PERIOD_S = 3.0
BLINK_DURATION_S = 0.2


@dataclass(frozen=True)
class SyntheticExpression:
    """Per-frame ground truth of a synthetic driving video; each array has shape [N], float64.

    Attributes:
        mouth_open: mouth opening in [0, 1]; 0 = the portrait's own mouth (closed lips, teeth just showing).
            Painted generator: 1 = the dark ellipse at its full height (2 × 6 % of the frame). Warped generator:
            1 = lower lip dropped by MOUTH_MAX_DROP_IOD interocular distances, jaw following.
        blink: eye closure in [0, 1]; 0 = open (the portrait's eyes), 1 = closed.
        roll_deg: head roll in degrees; positive = counter-clockwise on screen, about the nose.
        yaw_deg: head yaw in degrees; positive = the face turns towards the image's right (the nose moves right).
            Always 0 for the painted generator.
    """

    mouth_open: np.ndarray
    blink: np.ndarray
    roll_deg: np.ndarray
    yaw_deg: np.ndarray
    # Curves only the training data generator draws (None = 0 on every frame): brow raise in [-1, 1] (1 = brows up
    # by BROW_MAX_RAISE_IOD), smile in [-1, 1] (1 = mouth corners out and up, -1 = pursed), pitch in degrees
    # (positive = the face tilts up), and a head translation in interocular distances (right / down positive).
    brow: np.ndarray | None = None
    smile: np.ndarray | None = None
    pitch_deg: np.ndarray | None = None
    shift_x: np.ndarray | None = None
    shift_y: np.ndarray | None = None

    def frame_parameters(self) -> Iterator[dict[str, float]]:
        """Per frame, the keyword arguments of :func:`render_warped_frame` (absent curves are 0)."""
        zeros = np.zeros(len(self.mouth_open))
        columns = {
            "mouth_open": self.mouth_open,
            "blink": self.blink,
            "roll_deg": self.roll_deg,
            "yaw_deg": self.yaw_deg,
            "brow": zeros if self.brow is None else self.brow,
            "smile": zeros if self.smile is None else self.smile,
            "pitch_deg": zeros if self.pitch_deg is None else self.pitch_deg,
            "shift_x": zeros if self.shift_x is None else self.shift_x,
            "shift_y": zeros if self.shift_y is None else self.shift_y,
        }
        for index in range(len(zeros)):
            yield {name: float(values[index]) for name, values in columns.items()}


@lru_cache(maxsize=8)
def _portrait(size: int) -> np.ndarray:
    from skimage import data

    top, left, side = ASTRONAUT_FACE_BOX
    face = data.astronaut()[top : top + side, left : left + side]  # [170, 170, 3]
    portrait = np.asarray(Image.fromarray(face).resize((size, size), Image.Resampling.LANCZOS))
    portrait.flags.writeable = False
    return portrait


def astronaut_portrait(size: int = 128) -> np.ndarray:
    """The astronaut's face, square, resized (Lanczos) to [size, size, 3] uint8 RGB; a fresh, writable copy.

    Raises:
        ValueError: if ``size`` < 16.
    """
    if size < 16:
        raise ValueError(f"`size` must be >= 16 (got {size}); smaller portraits have no usable face")
    return _portrait(size).copy()


def expression_curves(
    num_frames: int,
    *,
    seed: int = 0,
    fps: float = 25.0,
    max_roll_deg: float = MAX_ROLL_DEG,
    max_yaw_deg: float = MAX_YAW_DEG,
) -> SyntheticExpression:
    """Seeded ground-truth curves for ``num_frames`` frames at ``fps``: what a synthetic driving video will show.

    Mouth opening follows a smooth curve in [0, 1] (sum of sinusoids of 0.3-1.5 Hz), blinks are triangular
    (0 → 1 → 0 over ~0.2 s, about one per 3 s, at least one when the video is long enough), roll and yaw follow slow
    curves (0.1-0.5 Hz) bounded by ``max_roll_deg`` / ``max_yaw_deg``. The random draws for mouth, blink and roll
    come first and in that order whatever the yaw, so a seed gives the same three curves as before yaw existed.

    Raises:
        ValueError: if ``num_frames`` < 1, ``fps`` <= 0 or a bound is negative.
    """
    if num_frames < 1:
        raise ValueError(f"`num_frames` must be >= 1 (got {num_frames})")
    if fps <= 0:
        raise ValueError(f"`fps` must be > 0 (got {fps}); driving videos are typically 25 fps")
    if max_roll_deg < 0 or max_yaw_deg < 0:
        raise ValueError(f"roll/yaw bounds must be >= 0 (got {max_roll_deg}, {max_yaw_deg})")
    rng = np.random.default_rng(seed)
    times = np.arange(num_frames) / fps
    mouth_open = 0.5 + 0.5 * _smooth_curve(rng, times, MOUTH_FREQ_HZ)
    blink = _blink_curve(rng, num_frames, fps)
    roll_deg = max_roll_deg * _smooth_curve(rng, times, ROLL_FREQ_HZ)
    yaw_deg = max_yaw_deg * _smooth_curve(rng, times, ROLL_FREQ_HZ) if max_yaw_deg else np.zeros(num_frames)
    return SyntheticExpression(mouth_open=mouth_open, blink=blink, roll_deg=roll_deg, yaw_deg=yaw_deg)


def _smooth_curve(rng: np.random.Generator, times: np.ndarray, freq_hz: tuple[float, float]) -> np.ndarray:
    """Sum of three seeded sinusoids, normalised by the sum of amplitudes so the curve stays in [-1, 1]."""
    freqs = rng.uniform(*freq_hz, size=3)
    phases = rng.uniform(0.0, 2 * np.pi, size=3)
    amplitudes = rng.uniform(0.5, 1.0, size=3)
    waves = amplitudes[:, None] * np.sin(2 * np.pi * freqs[:, None] * times[None, :] + phases[:, None])  # [3, N]
    return waves.sum(axis=0) / amplitudes.sum()


def _blink_curve(rng: np.random.Generator, num_frames: int, fps: float) -> np.ndarray:
    """Triangular blinks (0 → 1 → 0) at seeded frames, about one per BLINK_PERIOD_S, at least one per video."""
    length = max(3, round(BLINK_DURATION_S * fps) | 1)  # odd, so the peak is one frame at exactly 1
    blink = np.zeros(num_frames)
    if num_frames < length:
        return blink
    half = length // 2
    profile = 1.0 - np.abs(np.arange(length) - half) / (half + 1)  # e.g. [1/3, 2/3, 1, 2/3, 1/3]
    count = max(1, round(num_frames / fps / BLINK_PERIOD_S))
    for start in rng.integers(0, num_frames - length + 1, size=count):
        blink[start : start + length] = np.maximum(blink[start : start + length], profile)
    return blink


def _ellipse_coverage(size: int, center: tuple[float, float], half_axes: tuple[float, float]) -> np.ndarray:
    """[size, size] anti-aliased coverage in [0, 1] of an axis-aligned ellipse given in fractions of ``size``."""
    ys, xs = (np.indices((size, size)) + 0.5) / size
    half_h, half_w = max(half_axes[0], 1e-6), max(half_axes[1], 1e-6)
    radius = np.sqrt(((ys - center[0]) / half_h) ** 2 + ((xs - center[1]) / half_w) ** 2)
    # (1 - radius) × the short half-axis in pixels ≈ signed distance to the edge; a 1-pixel ramp anti-aliases it.
    return np.clip((1.0 - radius) * min(half_h, half_w) * size + 0.5, 0.0, 1.0)


def _render_frame(
    base: np.ndarray, eyelid: np.ndarray, mouth_open: float, blink: float, roll_deg: float
) -> np.ndarray:
    """One driving frame: blink, then mouth, then roll about the nose; [S, S, 3] uint8."""
    size = base.shape[0]
    frame = base.astype(np.float32)
    if blink > 0:
        rows = (np.arange(size)[:, None] + 0.5) / size  # [S, 1]
        for eye_row, eye_col in EYE_CENTERS:
            eye_top = eye_row - EYE_HALF_SIZE[0]
            # The lid slides down from the top of the eye: it covers rows above eye_top + blink × eye height.
            lid_edge = np.clip((eye_top + blink * 2 * EYE_HALF_SIZE[0] - rows) * size + 0.5, 0.0, 1.0)
            cover = (_ellipse_coverage(size, (eye_row, eye_col), EYE_HALF_SIZE) * lid_edge)[..., None]
            frame = frame * (1 - cover) + eyelid * cover
    if mouth_open > 0:
        half_axes = (mouth_open * MOUTH_MAX_HALF_HEIGHT, MOUTH_HALF_WIDTH)
        cover = _ellipse_coverage(size, MOUTH_CENTER, half_axes)[..., None]
        frame = frame * (1 - cover) + np.asarray(MOUTH_COLOR, dtype=np.float32) * cover
    drawn = Image.fromarray(np.clip(np.rint(frame), 0, 255).astype(np.uint8))
    # Rotate with an alpha channel and paste over the unrotated frame, so the corners the rotation uncovers show
    # the picture's own background instead of a fill colour.
    center = (ROLL_CENTER[1] * size, ROLL_CENTER[0] * size)
    rotated = drawn.convert("RGBA").rotate(roll_deg, resample=Image.Resampling.BICUBIC, center=center)
    drawn.paste(rotated, (0, 0), rotated)
    return np.asarray(drawn)


def synthetic_driving_frames(
    num_frames: int, size: int = 128, *, seed: int = 0, fps: float = 25.0
) -> tuple[np.ndarray, SyntheticExpression]:
    """A driving video of the astronaut with known, seeded expressions: ([N, size, size, 3] uint8, ground truth).

    Per frame: a mouth opening following a smooth seeded curve in [0, 1] (sinusoids of 0.3-1.5 Hz), triangular
    blinks lasting ~0.2 s about every 3 s (at least one when the video is long enough), and a head roll following
    a slow seeded curve (0.1-0.5 Hz) with |roll| ≤ 5°. The same (num_frames, size, seed, fps) gives the same bits.

    Raises:
        ValueError: if ``num_frames`` < 1, ``size`` < 16 or ``fps`` <= 0.
    """
    base = astronaut_portrait(size)
    truth = expression_curves(num_frames, seed=seed, fps=fps, max_yaw_deg=0.0)
    top, bottom, left, right = (round(f * size) for f in CHEEK_BOX)
    eyelid = base[top:bottom, left:right].reshape(-1, 3).mean(axis=0).astype(np.float32) * EYELID_SHADE  # [3]
    frames = np.stack(
        [
            _render_frame(base, eyelid, mouth, blink, roll)
            for mouth, blink, roll in zip(truth.mouth_open, truth.blink, truth.roll_deg)
        ]
    )  # [N, size, size, 3]
    return frames, truth


# ---- landmark-driven piecewise-affine warps ----------------------------------------------------------------------

# The astronaut's 68 landmarks (iBUG 300-W order: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, outer lips 48-59,
# inner lips 60-67) as (x, y) pixel centres of skimage.data.astronaut() (512×512). Measured once with dlib's HOG
# detector + 68-point shape predictor on the image upscaled 2×, 3× and 4× (bicubic) and averaged; the three runs
# agree to within 0.8 px. They are data about the public-domain image, so generating needs no face detector.
ASTRONAUT_LANDMARKS = np.array(
    [
        (179.4, 104.1), (179.7, 115.7), (180.8, 126.9), (181.9, 138.3),
        (184.8, 149.6), (190.9, 160.0), (199.8, 168.2), (209.0, 175.4),
        (220.1, 178.2), (231.8, 176.8), (242.6, 171.2), (252.6, 163.6),
        (260.0, 154.0), (264.7, 143.1), (267.6, 131.5), (270.0, 120.1),
        (271.7, 108.0), (186.0, 94.2), (191.9, 88.3), (200.3, 87.1),
        (208.8, 88.8), (216.5, 92.3), (235.9, 93.6), (243.9, 90.8),
        (252.1, 90.5), (260.1, 92.4), (265.2, 98.8), (225.8, 102.2),
        (225.5, 110.7), (225.3, 118.7), (225.0, 127.2), (214.1, 131.0),
        (219.1, 132.6), (224.2, 134.2), (229.5, 133.0), (234.3, 131.9),
        (195.0, 101.1), (200.3, 97.8), (206.8, 98.6), (212.3, 103.9),
        (206.2, 104.2), (199.8, 103.8), (237.5, 105.2), (243.3, 100.3),
        (249.7, 100.5), (255.1, 104.1), (250.1, 106.3), (243.7, 106.1),
        (200.2, 138.8), (208.9, 139.0), (217.7, 139.4), (223.2, 140.8),
        (229.5, 139.9), (237.4, 140.2), (245.8, 140.6), (237.4, 150.8),
        (229.0, 154.8), (222.1, 155.5), (215.9, 154.4), (207.4, 149.4),
        (203.0, 140.2), (217.2, 142.8), (223.0, 144.1), (229.3, 143.2),
        (242.7, 141.7), (229.0, 149.7), (222.7, 150.3), (216.7, 149.3),
    ]
)  # fmt: skip
ASTRONAUT_LANDMARKS.flags.writeable = False
ASTRONAUT_SIZE = 512
# Interocular distance (eye centre to eye centre) in source pixels: the unit of every expression displacement.
ASTRONAUT_IOD = float(np.linalg.norm(ASTRONAUT_LANDMARKS[42:48].mean(0) - ASTRONAUT_LANDMARKS[36:42].mean(0)))

MOUTH_MAX_DROP_IOD = 0.35  # mouth_open = 1 drops the lower lip by 0.35 IOD (~17 px in the 512² image)
# Fraction of the lower-lip drop each mouth point follows (upper lip rises a little; corners half-way and inwards).
_MOUTH_DROP = {**dict.fromkeys((55, 56, 57, 58, 59, 65, 66, 67), 1.0), 48: 0.4, 54: 0.4, 60: 0.5, 64: 0.5}
_MOUTH_DROP.update(dict.fromkeys((49, 50, 51, 52, 53, 61, 62, 63), -0.08))
_MOUTH_NARROW = 0.1  # mouth corners move inwards by 0.1 × drop
# The jaw (contour points 3..13) follows the chin: weight 1 at the chin (8), cosine falloff to 0.15 at 3 and 13.
_JAW = {i: 0.15 + 0.85 * np.cos((i - 8) / 5 * np.pi / 2) ** 2 for i in range(3, 14)}
_UPPER_TO_LOWER_LID = ((37, 41), (38, 40), (43, 47), (44, 46))
_BLINK_CLOSURE = 0.95  # blink = 1 leaves 5 % of the lid gap: triangles never fold over
BROW_MAX_RAISE_IOD = 0.15  # brow = 1 raises the brows by 0.15 IOD
SMILE_MAX_IOD = 0.12  # smile = 1 pulls each mouth corner 0.12 IOD outwards (and half that upwards)
_MOUTH_INTERIOR = np.array((35.0, 12.0, 18.0), dtype=np.float32)  # an open mouth's dark interior, RGB
_INTERIOR_FULL_AT = 0.25  # the interior paint fades in over mouth_open 0 → 0.25 (continuous at 0)
# Depth (towards the camera) for yaw: a cylinder of radius = half the jaw width, plus the nose's protrusion.
_NOSE_DEPTH_IOD = {27: 0.15, 28: 0.25, 29: 0.35, 30: 0.45, 31: 0.2, 32: 0.25, 33: 0.3, 34: 0.25, 35: 0.2}


@dataclass(frozen=True)
class FaceShape:
    """A synthetic identity: the astronaut's face reshaped about its vertical midline (the nose bridge).

    ``eye_distance`` scales the horizontal distance of each eye (and its brow) from the midline; ``face_width``
    scales the jaw contour's. The training data's pseudo-identities also use: ``chin_length`` (the lower jaw's
    distance below the mouth), ``nose_length`` (nose tip and nostrils below the bridge), ``mouth_width`` (the lips
    about their centre, horizontally), ``eye_size`` (each eye about its centre) and ``brow_height`` (the brows'
    distance above the eyes). All 1.0 is the astronaut herself.
    """

    eye_distance: float = 1.0
    face_width: float = 1.0
    chin_length: float = 1.0
    nose_length: float = 1.0
    mouth_width: float = 1.0
    eye_size: float = 1.0
    brow_height: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "eye_distance",
            "face_width",
            "chin_length",
            "nose_length",
            "mouth_width",
            "eye_size",
            "brow_height",
        ):
            value = getattr(self, name)
            if not 0.7 <= value <= 1.3:
                raise ValueError(f"FaceShape.{name} must be in [0.7, 1.3] (got {value}); larger changes fold the mesh")


ASTRONAUT = FaceShape()
RESHAPED_ASTRONAUT = FaceShape(eye_distance=1.15, face_width=0.9)


def _mesh_points(landmarks: np.ndarray) -> np.ndarray:
    """[68 + 6 + 16 + 8, 2] control points: landmarks, forehead, a ring around the head, far static anchors.

    The forehead points (brows raised by 0.8 IOD) and the ring (an ellipse 1.45× the landmarks' extent) move with
    the head, so roll and yaw turn the head rather than only its features; the anchors lie far outside the image,
    so every output pixel is inside the mesh and the background between ring and anchors bends smoothly.
    """
    forehead = landmarks[[17, 19, 21, 22, 24, 26]] - np.array([0.0, 0.8 * ASTRONAUT_IOD])
    head = np.concatenate([landmarks, forehead])
    centre, half = (head.max(0) + head.min(0)) / 2, (head.max(0) - head.min(0)) / 2 * 1.45
    angles = np.linspace(0.0, 2 * np.pi, 16, endpoint=False)
    ring = centre + half * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    lo, hi = -0.5 * ASTRONAUT_SIZE, 1.5 * ASTRONAUT_SIZE
    anchors = np.array([(lo, lo), (ASTRONAUT_SIZE / 2, lo), (hi, lo), (hi, ASTRONAUT_SIZE / 2)])
    anchors = np.concatenate([anchors, ASTRONAUT_SIZE - anchors])
    return np.concatenate([head, ring, anchors])


_HEAD_POINTS = 68 + 6 + 16  # mesh points that move with the head (all but the 8 anchors)


@lru_cache(maxsize=1)
def _triangles() -> np.ndarray:
    """[T, 3] vertex indices: the Delaunay triangulation of the astronaut's own mesh, shared by every identity."""
    from scipy.spatial import Delaunay

    triangles = Delaunay(_mesh_points(ASTRONAUT_LANDMARKS)).simplices.astype(np.int64)
    triangles.flags.writeable = False
    return triangles


def _reshape(face: FaceShape) -> np.ndarray:
    """The identity's neutral landmarks [68, 2] in source pixels."""
    landmarks = ASTRONAUT_LANDMARKS.copy()
    midline = landmarks[27, 0]
    for eye, brow in ((slice(36, 42), slice(17, 22)), (slice(42, 48), slice(22, 27))):
        shift = (face.eye_distance - 1.0) * (landmarks[eye, 0].mean() - midline)
        landmarks[eye, 0] += shift
        landmarks[brow, 0] += shift
    landmarks[0:17, 0] = midline + face.face_width * (landmarks[0:17, 0] - midline)
    if face.eye_size != 1.0:
        for eye in (slice(36, 42), slice(42, 48)):
            centre = landmarks[eye].mean(0)
            landmarks[eye] = centre + face.eye_size * (landmarks[eye] - centre)
    if face.brow_height != 1.0:
        for eye, brow in ((slice(36, 42), slice(17, 22)), (slice(42, 48), slice(22, 27))):
            eye_row = landmarks[eye, 1].mean()
            landmarks[brow, 1] = eye_row + face.brow_height * (landmarks[brow, 1] - eye_row)
    if face.nose_length != 1.0:
        bridge = landmarks[27, 1]
        landmarks[28:36, 1] = bridge + face.nose_length * (landmarks[28:36, 1] - bridge)
    if face.mouth_width != 1.0:
        centre_x = landmarks[48:68, 0].mean()
        landmarks[48:68, 0] = centre_x + face.mouth_width * (landmarks[48:68, 0] - centre_x)
    if face.chin_length != 1.0:
        mouth_row = landmarks[48:68, 1].mean()
        lower = [i for i in range(4, 13) if landmarks[i, 1] > mouth_row]
        landmarks[lower, 1] = mouth_row + face.chin_length * (landmarks[lower, 1] - mouth_row)
    return landmarks


def _express(
    neutral: np.ndarray, mouth_open: float, blink: float, brow: float = 0.0, smile: float = 0.0
) -> np.ndarray:
    """Landmarks [68, 2] with the mouth opened, the eyes closed, the brows raised and the mouth corners pulled."""
    points = neutral.copy()
    if brow:
        points[17:27, 1] -= brow * BROW_MAX_RAISE_IOD * ASTRONAUT_IOD
    if smile:
        reach = smile * SMILE_MAX_IOD * ASTRONAUT_IOD
        for corner, outward in ((48, -1.0), (60, -1.0), (54, 1.0), (64, 1.0)):
            points[corner, 0] += outward * reach
            points[corner, 1] -= 0.5 * reach
        for side, outward in ((49, -1.0), (59, -1.0), (53, 1.0), (55, 1.0)):
            points[side, 0] += 0.5 * outward * reach
    drop = mouth_open * MOUTH_MAX_DROP_IOD * ASTRONAUT_IOD
    for index, weight in _MOUTH_DROP.items():
        points[index, 1] += weight * drop
    for corner, inward in ((48, 1.0), (60, 1.0), (54, -1.0), (64, -1.0)):
        points[corner, 0] += inward * _MOUTH_NARROW * drop
    for index, weight in _JAW.items():
        points[index, 1] += weight * drop
    for upper, lower in _UPPER_TO_LOWER_LID:
        points[upper] += _BLINK_CLOSURE * blink * (neutral[lower] - neutral[upper])
    return points


def _turn_head(
    mesh: np.ndarray,
    roll_deg: float,
    yaw_deg: float,
    pitch_deg: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Yaw and pitch (3-D rotations of the head points), roll (in-plane, about the nose tip), then a shift."""
    moved = mesh.copy()
    head = moved[:_HEAD_POINTS]
    midline, radius = head[27, 0], (head[16, 0] - head[0, 0]) / 2
    offset = head[:, 0] - midline
    depth = np.sqrt(np.clip(radius**2 - offset**2, 0.0, None))
    for index, nose in _NOSE_DEPTH_IOD.items():
        depth[index] += nose * ASTRONAUT_IOD
    yaw = np.deg2rad(yaw_deg)
    head[:, 0] = midline + offset * np.cos(yaw) + depth * np.sin(yaw)
    if pitch_deg:
        # Tilting up moves points in front of the pivot (the nose) upwards: y' = c + (y − c) cos − depth sin.
        pitch, centre_y = np.deg2rad(pitch_deg), head[30, 1]
        head[:, 1] = centre_y + (head[:, 1] - centre_y) * np.cos(pitch) - depth * np.sin(pitch)
    roll = np.deg2rad(roll_deg)
    pivot = head[30].copy()
    dx, dy = head[:, 0] - pivot[0], head[:, 1] - pivot[1]
    # Counter-clockwise on screen with y pointing down: x' = x cos + y sin, y' = -x sin + y cos.
    head[:, 0] = pivot[0] + dx * np.cos(roll) + dy * np.sin(roll)
    head[:, 1] = pivot[1] - dx * np.sin(roll) + dy * np.cos(roll)
    if shift != (0.0, 0.0):
        head += np.asarray(shift) * ASTRONAUT_IOD
    return moved


def framing_box(width: int, height: int) -> tuple[float, float, float, float]:
    """(left, top, box width, box height) of the astronaut image shown in a width × height frame.

    A square frame shows ASTRONAUT_FACE_BOX (the crop of :func:`astronaut_portrait`); other aspect ratios widen or
    heighten that box around the same centre, shrinking it if needed to stay inside the 512² image.
    """
    top, left, side = ASTRONAUT_FACE_BOX
    centre_x, centre_y = left + side / 2, top + side / 2
    box_w, box_h = side * max(1.0, width / height), side * max(1.0, height / width)
    shrink = min(1.0, ASTRONAUT_SIZE / box_w, ASTRONAUT_SIZE / box_h)
    box_w, box_h = box_w * shrink, box_h * shrink
    box_left = float(np.clip(centre_x - box_w / 2, 0.0, ASTRONAUT_SIZE - box_w))
    box_top = float(np.clip(centre_y - box_h / 2, 0.0, ASTRONAUT_SIZE - box_h))
    return box_left, box_top, box_w, box_h


@lru_cache(maxsize=4)
def _source(blur_sigma: float) -> np.ndarray:
    """The astronaut image as float32, low-pass filtered when the frame is smaller than the box (no aliasing)."""
    import cv2
    from skimage import data

    image = data.astronaut().astype(np.float32)
    if blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), blur_sigma)
    image.flags.writeable = False
    return image


def _piecewise_affine(dst: np.ndarray, src: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel, the source position: (map_x, map_y) [H, W] float32 for ``cv2.remap``.

    ``dst`` are the mesh points in output pixels, ``src`` the same points in source pixels. Each triangle is
    rasterised into an index map, and each pixel is sent through its triangle's affine map (solved from the three
    vertex pairs) — exact piecewise-affine interpolation, about a millisecond per 256² frame.
    """
    import cv2

    height, width = shape
    triangles = _triangles()
    index = np.full((height, width), -1, dtype=np.int32)
    subpixel = 16  # fillConvexPoly's shift=4: vertices at 1/16 px
    for number, triangle in enumerate(triangles):
        corners = np.rint(dst[triangle] * subpixel).astype(np.int32)
        cv2.fillConvexPoly(index, corners, int(number), lineType=cv2.LINE_8, shift=4)
    # Affine per triangle: [x_src, y_src] = M @ [u, v, 1], from M @ D = S with D = [dst^T; 1].
    dst_h = np.concatenate([dst[triangles], np.ones((len(triangles), 3, 1))], axis=2)  # [T, 3, 3]
    matrices = np.einsum("tkc,tkd->tcd", src[triangles], np.linalg.pinv(dst_h).transpose(0, 2, 1))  # [T, 2, 3]
    matrices = matrices.transpose(0, 2, 1)  # [T, 3, 2]: rows act on u, v, 1
    per_pixel = matrices[np.clip(index, 0, None)]  # [H, W, 3, 2]
    v, u = np.indices((height, width), dtype=np.float64)
    mapped = u[..., None] * per_pixel[..., 0, :] + v[..., None] * per_pixel[..., 1, :] + per_pixel[..., 2, :]
    return mapped[..., 0].astype(np.float32), mapped[..., 1].astype(np.float32)


def render_warped_frame(
    mouth_open: float = 0.0,
    blink: float = 0.0,
    roll_deg: float = 0.0,
    yaw_deg: float = 0.0,
    *,
    size: int | tuple[int, int] = 256,
    face: FaceShape = ASTRONAUT,
    brow: float = 0.0,
    smile: float = 0.0,
    pitch_deg: float = 0.0,
    shift_x: float = 0.0,
    shift_y: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One warped frame and where its 68 landmarks are: ([H, W, 3] uint8 RGB, [68, 2] (x, y) in frame pixels).

    ``size`` is a side or (width, height). The frame shows :func:`framing_box` of the astronaut image with the face
    of ``face`` making the expression; all parameters 0 on :data:`ASTRONAUT` reproduce the portrait itself.
    """
    import cv2

    width, height = (size, size) if isinstance(size, int) else size
    if width < 16 or height < 16:
        raise ValueError(f"`size` must be at least 16×16 (got {width}×{height}); smaller frames have no usable face")
    left, top, box_w, box_h = framing_box(width, height)
    scale = np.array([width / box_w, height / box_h])
    neutral = _reshape(face)
    expressed = _express(neutral, mouth_open, blink, brow, smile)
    moved = _turn_head(_mesh_points(expressed), roll_deg, yaw_deg, pitch_deg, (shift_x, shift_y))
    # Source pixel centre x ↔ frame pixel centre u: u + 0.5 = (x + 0.5 - left) × scale.
    to_frame = (moved + 0.5 - np.array([left, top])) * scale - 0.5
    map_x, map_y = _piecewise_affine(to_frame, _mesh_points(ASTRONAUT_LANDMARKS), (height, width))
    blur = max(0.0, 0.5 / float(scale.min()) - 0.5)  # only when shrinking; ~0.67 px for the 170-px box in 128 px
    frame = cv2.remap(_source(round(blur, 2)), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    alpha = min(1.0, mouth_open / _INTERIOR_FULL_AT)
    if alpha > 0:
        mask = np.zeros((height, width), dtype=np.uint8)
        lips = np.rint(to_frame[60:68] * 16).astype(np.int32)
        cv2.fillPoly(mask, [lips], 255, lineType=cv2.LINE_AA, shift=4)
        cover = (mask.astype(np.float32) / 255.0 * alpha)[..., None]
        frame = frame * (1 - cover) + _MOUTH_INTERIOR * cover
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8), to_frame[:68].copy()


def iter_warped_frames(
    truth: SyntheticExpression, size: int | tuple[int, int] = 256, *, face: FaceShape = ASTRONAUT
) -> Iterator[np.ndarray]:
    """The frames of ``truth`` one at a time (any length without holding the video): [H, W, 3] uint8 RGB each."""
    for parameters in truth.frame_parameters():
        yield render_warped_frame(**parameters, size=size, face=face)[0]


def warped_driving_frames(
    num_frames: int,
    size: int | tuple[int, int] = 256,
    *,
    seed: int = 0,
    fps: float = 25.0,
    face: FaceShape = ASTRONAUT,
    max_roll_deg: float = MAX_ROLL_DEG,
    max_yaw_deg: float = MAX_YAW_DEG,
) -> tuple[np.ndarray, SyntheticExpression]:
    """A landmark-warped driving video with seeded, known expressions: ([N, H, W, 3] uint8, ground truth).

    The curves are :func:`expression_curves` (same seed, same curves whatever the face or size), so two identities
    rendered with one seed make exactly the same expressions. ``size`` is a side or (width, height).

    Raises:
        ValueError: if ``num_frames`` < 1, ``fps`` <= 0, a bound is negative or the size is below 16×16.
    """
    truth = expression_curves(num_frames, seed=seed, fps=fps, max_roll_deg=max_roll_deg, max_yaw_deg=max_yaw_deg)
    return np.stack(list(iter_warped_frames(truth, size, face=face))), truth
