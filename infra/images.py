"""Reference images: decode any Pillow-readable image to RGB and fit it to the model resolution.

Without a face box the fit is a centred crop to the target aspect ratio followed by a LANCZOS resize, so the face
keeps its shape (the official code stretches by rounding each side up to 16 instead).

With a face box (found by ``flashportrait.model.expression.landmark.detect_face_box``: the bounding box of the
68 landmarks, brows to chin — infra stays a leaf, so it only takes the box) the crop is **face-centred**, whatever
the image's size and aspect ratio:

1. size: the crop's shorter side is FACE_SCALE (1.85) × the face box's longer side, and it has the target's aspect
   ratio — the framing of the shipped portraits, where the face fills about half the width;
2. position: centred on the face box, raised by FACE_RAISE (0.2) × the face height so forehead and hair fit;
3. inside the image: the crop is slid back inside the image where it fits; where it does not (the face fills the
   photo, or sits at its edge) it is first shrunk, down to MIN_FACE_SCALE (1.2) × the face, and only what still
   falls outside is padded by repeating the image's edge pixels (``padded`` is then True);
4. LANCZOS resize of the crop to the target size.

The crop box (source pixels; outside the image where padded) is returned so the sidecar records exactly which
pixels the model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


FACE_SCALE = 1.85
FACE_RAISE = 0.2
MIN_FACE_SCALE = 1.2

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels


@dataclass(frozen=True)
class FittedImage:
    pixels: np.ndarray  # [height, width, 3] uint8
    source_size: tuple[int, int]  # (width, height) after EXIF orientation
    crop_box: Box  # (left, top, right, bottom) in source pixels; beyond the image where padded
    face_box: Box | None = None  # the face box the crop was centred on, if any
    padded: bool = False  # True when part of the crop lies outside the image (filled with its edge pixels)


def load_rgb(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"reference {path}: not a readable image ({exc}); supply a PNG or JPEG portrait") from exc


def centre_crop_box(source: tuple[int, int], target: tuple[int, int]) -> Box:
    """The largest centred box of the target's aspect ratio inside the source."""
    src_w, src_h = source
    tgt_w, tgt_h = target
    if src_w * tgt_h > src_h * tgt_w:  # source is wider: crop left/right
        crop_w = round(src_h * tgt_w / tgt_h)
        left = (src_w - crop_w) // 2
        return left, 0, left + crop_w, src_h
    crop_h = round(src_w * tgt_h / tgt_w)
    top = (src_h - crop_h) // 2
    return 0, top, src_w, top + crop_h


def face_crop_box(source: tuple[int, int], target: tuple[int, int], face_box: Box) -> Box:
    """Steps 1-3 of the module docstring: the face-centred crop of the target's aspect ratio, in source pixels."""
    src_w, src_h = source
    tgt_w, tgt_h = target
    _check_face_box(face_box, source)
    left, top, right, bottom = face_box
    face = max(right - left, bottom - top)
    aspect = tgt_w / tgt_h
    # The largest crop of the target aspect inside the image; never smaller than MIN_FACE_SCALE × the face.
    fits = min(src_w, src_h * aspect) if aspect <= 1 else min(src_h, src_w / aspect)
    short = max(min(FACE_SCALE * face, fits), MIN_FACE_SCALE * face)
    crop_w, crop_h = (short, short / aspect) if aspect <= 1 else (short * aspect, short)
    centre_x = (left + right) / 2
    centre_y = (top + bottom) / 2 - FACE_RAISE * (bottom - top)
    x0 = _slide_inside(centre_x - crop_w / 2, crop_w, src_w)
    y0 = _slide_inside(centre_y - crop_h / 2, crop_h, src_h)
    box_left, box_top = round(x0), round(y0)
    return box_left, box_top, box_left + round(crop_w), box_top + round(crop_h)


def _slide_inside(start: float, length: float, limit: int) -> float:
    """Move a span [start, start + length) inside [0, limit) if it fits; else centre the overhang on both sides."""
    if length <= limit:
        return min(max(start, 0.0), limit - length)
    return min(max(start, limit - length), 0.0)


def _check_face_box(face_box: Box, source: tuple[int, int]) -> None:
    left, top, right, bottom = face_box
    if not (0 <= left < right <= source[0] and 0 <= top < bottom <= source[1]):
        raise ValueError(
            f"face box {face_box} is empty or outside the {source[0]}x{source[1]} image; pass (left, top, right, "
            "bottom) pixels inside it, as detect_face_box returns, or no face box for a centred crop"
        )


def fit_image(image: Image.Image, width: int, height: int, *, face_box: Box | None = None) -> FittedImage:
    """Fit an RGB image to width × height: a centred crop, or a face-centred crop/pad with ``face_box``."""
    if face_box is None:
        box = centre_crop_box(image.size, (width, height))
    else:
        box = face_crop_box(image.size, (width, height), tuple(int(v) for v in face_box))  # type: ignore[arg-type]
    padded = box[0] < 0 or box[1] < 0 or box[2] > image.size[0] or box[3] > image.size[1]
    region = _crop_with_edge_padding(image, box) if padded else image.crop(box)
    fitted = region.resize((width, height), Image.Resampling.LANCZOS)
    return FittedImage(np.asarray(fitted, dtype=np.uint8).copy(), image.size, box, face_box, padded)


def _crop_with_edge_padding(image: Image.Image, box: Box) -> Image.Image:
    """The crop ``box``, where it leaves the image filled with the nearest edge pixel (no black bars, no mirrored
    features)."""
    pixels = np.asarray(image)  # [H, W, 3]
    rows = np.clip(np.arange(box[1], box[3]), 0, pixels.shape[0] - 1)
    cols = np.clip(np.arange(box[0], box[2]), 0, pixels.shape[1] - 1)
    return Image.fromarray(pixels[rows[:, None], cols[None, :]])


def fit_reference(path: str | Path, width: int, height: int, *, face_box: Box | None = None) -> FittedImage:
    """Load the reference image at ``path`` and fit it (:func:`fit_image`)."""
    return fit_image(load_rgb(path), width, height, face_box=face_box)
