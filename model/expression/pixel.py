"""Pixel expression extractor: a coarse, download-free stand-in for PD-FGC, computed from the frames' pixels alone.

WHAT IT IS. A deliberately simple but real measurement of how each driving frame differs from the FIRST frame
(taken as the subject's own neutral), laid out like PD-FGC's 554-d vector so the PortraitEncoder and everything
downstream run unchanged. It needs no face detector and no weights, so tests and demos run anywhere.

WHAT IT IS NOT. It is a coarse, identity-dependent proxy: it assumes a roughly centred, face-filling portrait
framing (eyes in the band at 25-45 % of the height, mouth at 60-92 %), it confuses lighting changes with
expression, and its numbers mean nothing to the released PortraitEncoder weights (trained on PD-FGC features).
It is used until the landmark-based extractor lands; use PD-FGC for the released checkpoint.

Method. Every frame is converted to luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B) in [0, 1] and
area-averaged to a 64×64 analysis grid ``g`` (any frame size ≥ 16×16; smaller frames have too little to
measure). ``g0`` is the first frame's grid. Every component is 0 when the frame equals the first frame, so a
static video gives all-zero features. Image axes: x to the right, y down; "left" is the image's left.

Components (554 = 6 + 6 + 30 + 512), in order:

- headpose (6), from the intensity-weighted moments of ``g`` (weights = luma + 1e-6, so a black frame is uniform):
    0. centroid x shift, (cx - cx0) / 64, fraction of the frame width, in [-1, 1] (positive = content moved right);
    1. centroid y shift, (cy - cy0) / 64, in [-1, 1] (positive = down);
    2. orientation change of the second-moment ellipse, radians, wrapped to [-pi/2, pi/2) (positive = clockwise on
       screen); set to 0 when either ellipse is nearly a circle (anisotropy < 1e-3), where the angle is noise;
    3. log spread change, log(s / s0) with s = sqrt(mu20 + mu02), in about [-4, 4] (positive = content spread out);
    4. mean brightness change, mean(g) - mean(g0), in [-1, 1];
    5. left/right asymmetry change, (mean left half - mean right half) minus the same for g0, in [-2, 2].
- eye (6), on the band of grid rows 16-28 (25-45 % of the height), left half then right half, each:
    mean |g - g0| in [0, 1]; change of the RMS vertical gradient (eyelids are horizontal edges) in [-1, 1];
    mean intensity change in [-1, 1].
- emotion (30): mean |g - g0| over a 5 (rows) × 6 (cols) grid of equal cells, row-major, each in [0, 1].
- mouth (512): the region rows 60-92 %, cols 25-75 % of the full-resolution frame, area-averaged to 16×32,
  minus the first frame's, times MOUTH_SCALE = 4, row-major, each in [-4, 4]. An opening mouth darkens this region
  by ~0.1-0.4 in luma, so typical values are O(1).

Deterministic: plain numpy arithmetic, no randomness. Frames are streamed: only the first frame's grid is kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache

import numpy as np


GRID_SIZE = 64
MIN_FRAME_SIZE = 16
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0
EYE_ROWS = slice(round(0.25 * GRID_SIZE), round(0.45 * GRID_SIZE))  # grid rows 16..28
EMOTION_CELLS = (5, 6)
MOUTH_ROWS = (0.60, 0.92)
MOUTH_COLS = (0.25, 0.75)
MOUTH_SHAPE = (16, 32)
# Luma changes of an opening mouth are ~0.1-0.4; ×4 brings them to O(1), the scale the encoder's Linears expect.
MOUTH_SCALE = 4.0
# Below this anisotropy the second-moment ellipse is a circle and its orientation is numerical noise.
MIN_ANISOTROPY = 1e-3
# Keeps the moments defined for an all-black frame (it then weighs every cell equally).
MASS_EPS = 1e-6


@lru_cache(maxsize=32)
def _area_matrix(n_in: int, n_out: int, lo: float, hi: float) -> np.ndarray:
    """[n_out, n_in] weights that area-average the span [lo, hi) (fractions of n_in) into n_out equal cells.

    Input pixel k covers [k, k+1); output cell j covers its equal share of [lo*n_in, hi*n_in); each weight is
    the overlap divided by the cell length, so every row sums to 1 (exact area averaging, also when upsampling).
    """
    edges = np.linspace(lo * n_in, hi * n_in, n_out + 1)
    pixel = np.arange(n_in)
    overlap = np.minimum(edges[1:, None], pixel[None] + 1) - np.maximum(edges[:-1, None], pixel[None])
    weights = np.clip(overlap, 0.0, None) / np.diff(edges)[:, None]
    weights = weights.astype(np.float32)
    weights.flags.writeable = False
    return weights


def _area_resize(
    image: np.ndarray,
    shape: tuple[int, int],
    rows: tuple[float, float] = (0.0, 1.0),
    cols: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Area-average the region rows × cols (fractions) of a 2-D image to ``shape``."""
    height, width = image.shape
    row_weights = _area_matrix(height, shape[0], *rows)  # [h, H]
    col_weights = _area_matrix(width, shape[1], *cols)  # [w, W]
    return row_weights @ image @ col_weights.T  # [h, w]


def _moments(grid: np.ndarray) -> tuple[float, float, float, float, float]:
    """Intensity-weighted centroid (cx, cy) and central second moments (mu20, mu02, mu11), in grid cells."""
    weights = grid.astype(np.float64) + MASS_EPS
    ys, xs = np.indices(grid.shape, dtype=np.float64)
    total = weights.sum()
    cx, cy = (weights * xs).sum() / total, (weights * ys).sum() / total
    dx, dy = xs - cx, ys - cy
    mu20, mu02, mu11 = (weights * dx * dx).sum(), (weights * dy * dy).sum(), (weights * dx * dy).sum()
    return cx, cy, mu20 / total, mu02 / total, mu11 / total


def _headpose(grid: np.ndarray, ref: np.ndarray) -> list[float]:
    """The 6 headpose components of the module docstring: global geometry and brightness of ``grid`` vs ``ref``."""
    cx, cy, mu20, mu02, mu11 = _moments(grid)
    cx0, cy0, mu20_0, mu02_0, mu11_0 = _moments(ref)
    # The ellipse axis is 0.5·arg(z) with z = (mu20 - mu02) + 2i·mu11, so the change is 0.5·arg(z · conj(z0)).
    z, z0 = complex(mu20 - mu02, 2 * mu11), complex(mu20_0 - mu02_0, 2 * mu11_0)
    spread, spread0 = mu20 + mu02, mu20_0 + mu02_0
    isotropic = abs(z) < MIN_ANISOTROPY * spread or abs(z0) < MIN_ANISOTROPY * spread0
    turn = z * z0.conjugate()
    rotation = 0.0 if isotropic else 0.5 * math.atan2(turn.imag, turn.real)
    if rotation >= math.pi / 2:  # 0.5·atan2 lies in (-pi/2, pi/2]; keep the documented [-pi/2, pi/2)
        rotation -= math.pi
    half = grid.shape[1] // 2
    asymmetry = grid[:, :half].mean() - grid[:, half:].mean()
    asymmetry0 = ref[:, :half].mean() - ref[:, half:].mean()
    return [
        (cx - cx0) / grid.shape[1],
        (cy - cy0) / grid.shape[0],
        rotation,
        0.5 * math.log(spread / spread0),  # log(s / s0) with s = sqrt(mu20 + mu02)
        float(grid.mean() - ref.mean()),
        float(asymmetry - asymmetry0),
    ]


def _eye(grid: np.ndarray, ref: np.ndarray) -> list[float]:
    """The 6 eye components: per half of the eye band, mean |change|, RMS-vertical-gradient change, mean change."""
    band, band0 = grid[EYE_ROWS], ref[EYE_ROWS]
    half = grid.shape[1] // 2
    features: list[float] = []
    for cols in (slice(0, half), slice(half, None)):
        region, region0 = band[:, cols], band0[:, cols]
        gradient = np.sqrt(np.mean(np.diff(region, axis=0) ** 2))
        gradient0 = np.sqrt(np.mean(np.diff(region0, axis=0) ** 2))
        features += [
            float(np.abs(region - region0).mean()),
            float(gradient - gradient0),
            float(region.mean() - region0.mean()),
        ]
    return features


class PixelExpressionExtractor:
    """Per-frame expression features from pixel differences to the first frame; see the module docstring."""

    name = "pixel"

    def extract(self, frames: Iterable[np.ndarray], *, source: str = "the driving video") -> np.ndarray:
        """Frames (HxWx3 uint8 RGB, all the same size, ≥ 16×16) → float32 [N, 554], row 0 all zeros.

        Raises:
            ValueError: if there are no frames, a frame is not HxWx3 uint8, is smaller than 16×16, or differs in
                size from frame 0 (the message names the frame index).
        """
        rows: list[np.ndarray] = []
        ref_grid: np.ndarray | None = None
        ref_mouth: np.ndarray | None = None
        first_shape: tuple[int, ...] | None = None
        for index, frame in enumerate(frames):
            shape = _check_frame(frame, index)
            first_shape = first_shape or shape
            if shape != first_shape:
                raise ValueError(
                    f"frame {index} has shape {frame.shape} but frame 0 has {first_shape}; "
                    "all frames of one driving video must have the same size"
                )
            luma = frame.astype(np.float32) @ LUMA_WEIGHTS  # [H, W] in [0, 1]
            grid = _area_resize(luma, (GRID_SIZE, GRID_SIZE))  # [64, 64]
            mouth = _area_resize(luma, MOUTH_SHAPE, MOUTH_ROWS, MOUTH_COLS)  # [16, 32]
            if ref_grid is None or ref_mouth is None:
                ref_grid, ref_mouth = grid, mouth
            rows.append(self._features(grid, mouth, ref_grid, ref_mouth))
        if not rows:
            raise ValueError("`frames` is empty; the pixel extractor needs at least one frame (the neutral one)")
        return np.stack(rows)  # [N, 554]

    @staticmethod
    def _features(grid: np.ndarray, mouth: np.ndarray, ref_grid: np.ndarray, ref_mouth: np.ndarray) -> np.ndarray:
        """One frame's 554-d vector: [headpose 6, eye 6, emotion 30, mouth 512]."""
        change = np.abs(grid - ref_grid)  # [64, 64]
        emotion = _area_resize(change, EMOTION_CELLS)  # [5, 6]: mean |change| per cell
        return np.concatenate(
            [
                np.asarray(_headpose(grid, ref_grid), dtype=np.float32),  # [6]
                np.asarray(_eye(grid, ref_grid), dtype=np.float32),  # [6]
                emotion.reshape(-1),  # [30]
                ((mouth - ref_mouth) * MOUTH_SCALE).reshape(-1),  # [512]
            ]
        ).astype(np.float32)  # [554]


def _check_frame(frame: np.ndarray, index: int) -> tuple[int, ...]:
    """Validate frame ``index`` (HxWx3 uint8, ≥ 16×16) and return its shape."""
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        described = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"frame {index} must be an HxWx3 uint8 RGB array (got {described})")
    height, width = frame.shape[:2]
    if height < MIN_FRAME_SIZE or width < MIN_FRAME_SIZE:
        raise ValueError(
            f"frame {index} is {height}x{width}; the pixel extractor needs at least "
            f"{MIN_FRAME_SIZE}x{MIN_FRAME_SIZE} (upscale the driving video)"
        )
    return frame.shape
