"""Reference images: decode any Pillow-readable image to RGB and fit it to the model resolution.

The fit is a centred crop to the target aspect ratio followed by a LANCZOS resize, so the face keeps its shape
(the official code stretches by rounding each side up to 16 instead). The crop box is returned so the sidecar can
record exactly which pixels the model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


@dataclass(frozen=True)
class FittedImage:
    pixels: np.ndarray  # [height, width, 3] uint8
    source_size: tuple[int, int]  # (width, height) after EXIF orientation
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in source pixels


def load_rgb(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"reference {path}: not a readable image ({exc}); supply a PNG or JPEG portrait") from exc


def centre_crop_box(source: tuple[int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
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


def fit_reference(path: str | Path, width: int, height: int) -> FittedImage:
    image = load_rgb(path)
    box = centre_crop_box(image.size, (width, height))
    fitted = image.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    return FittedImage(np.asarray(fitted, dtype=np.uint8).copy(), image.size, box)
