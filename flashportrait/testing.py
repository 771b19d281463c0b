"""Synthetic, public-domain test inputs: the astronaut portrait and driving videos made from it with known expressions.

The only face we ship is scikit-image's ``astronaut`` (Eileen Collins, a NASA photograph in the public domain).
Driving videos are synthesised from it with per-frame ground truth (mouth opening, blink, head roll), so tests of
the expression extractors and of the whole pipeline can check that what went in comes out, without photos of real
people and without downloads.

This is a deliberately simple stand-in (numpy + PIL drawing and a rotation) until a landmark-driven piecewise-affine
generator lands: the "mouth" is a dark ellipse painted over the lips, a "blink" is an eyelid-coloured ellipse
sliding down over each eye, and roll rotates the whole picture about the nose.
"""

from __future__ import annotations

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

# Motion speeds (Hz) of the seeded curves, and the blink timing: a blink every ~3 s, lasting ~0.2 s.
MOUTH_FREQ_HZ = (0.3, 1.5)
ROLL_FREQ_HZ = (0.1, 0.5)
BLINK_PERIOD_S = 3.0
BLINK_DURATION_S = 0.2


@dataclass(frozen=True)
class SyntheticExpression:
    """Per-frame ground truth of a synthetic driving video; each array has shape [N], float64.

    Attributes:
        mouth_open: mouth opening in [0, 1]; 0 = closed (the portrait's own lips), 1 = the dark ellipse at its
            full height (2 × 6 % of the frame).
        blink: eye closure in [0, 1]; 0 = open, 1 = each eye fully covered by an eyelid-coloured ellipse.
        roll_deg: head roll in degrees, |roll| ≤ 5; positive = counter-clockwise on screen, about the nose.
    """

    mouth_open: np.ndarray
    blink: np.ndarray
    roll_deg: np.ndarray


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
    if num_frames < 1:
        raise ValueError(f"`num_frames` must be >= 1 (got {num_frames})")
    if fps <= 0:
        raise ValueError(f"`fps` must be > 0 (got {fps}); driving videos are typically 25 fps")
    base = astronaut_portrait(size)
    rng = np.random.default_rng(seed)
    times = np.arange(num_frames) / fps
    truth = SyntheticExpression(
        mouth_open=0.5 + 0.5 * _smooth_curve(rng, times, MOUTH_FREQ_HZ),
        blink=_blink_curve(rng, num_frames, fps),
        roll_deg=MAX_ROLL_DEG * _smooth_curve(rng, times, ROLL_FREQ_HZ),
    )
    top, bottom, left, right = (round(f * size) for f in CHEEK_BOX)
    eyelid = base[top:bottom, left:right].reshape(-1, 3).mean(axis=0).astype(np.float32) * EYELID_SHADE  # [3]
    frames = np.stack(
        [
            _render_frame(base, eyelid, mouth, blink, roll)
            for mouth, blink, roll in zip(truth.mouth_open, truth.blink, truth.roll_deg)
        ]
    )  # [N, size, size, 3]
    return frames, truth
