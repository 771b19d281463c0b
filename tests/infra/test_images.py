"""Reference fitting: centred crop without a face box; face-centred crop, slide, shrink and pad with one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flashportrait.infra.images import (
    FACE_SCALE,
    FittedImage,
    face_crop_box,
    fit_image,
    fit_reference,
    load_rgb,
)
from flashportrait.testing import ASTRONAUT_FACE_BOX, ASTRONAUT_LANDMARKS


def ramp(width: int, height: int) -> Image.Image:
    """Red grows with x, green with y: every pixel says where it came from."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x % 256, y % 256, np.full_like(x, 100)], axis=-1).astype(np.uint8))


def test_without_a_face_box_the_centred_crop_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    ramp(300, 100).save(path)
    fitted = fit_reference(path, 64, 64)
    assert isinstance(fitted, FittedImage)
    assert (fitted.crop_box, fitted.source_size, fitted.face_box, fitted.padded) == (
        (100, 0, 200, 100),
        (300, 100),
        None,
        False,
    )
    assert fitted.pixels.shape == (64, 64, 3) and fitted.pixels.dtype == np.uint8


def test_face_centred_square_crop() -> None:
    # Face 40 × 50 at (300, 200)-(340, 250) in a 1000 × 600 photo: crop side 1.85 × 50 = 92.5 → 92 (rounded),
    # centred at x = 320, y = 225 - 0.2 × 50 = 215: left = 320 - 46.25 = 273.75 → 274, top = 215 - 46.25 → 169.
    box = face_crop_box((1000, 600), (512, 512), (300, 200, 340, 250))
    assert box == (274, 169, 274 + round(FACE_SCALE * 50), 169 + round(FACE_SCALE * 50))


def test_portrait_target_keeps_its_aspect_and_the_face_inside() -> None:
    face = (300, 200, 340, 250)
    left, top, right, bottom = face_crop_box((1000, 600), (480, 832), face)
    assert (right - left) / (bottom - top) == pytest.approx(480 / 832, abs=0.01)
    assert right - left == round(FACE_SCALE * 50)  # the shorter side (width) is 1.85 × the face
    assert left <= face[0] and top <= face[1] and right >= face[2] and bottom >= face[3]


def test_face_at_the_edge_slides_the_crop_inside_instead_of_padding() -> None:
    box = face_crop_box((400, 300), (256, 256), (0, 100, 60, 160))  # face touching the left edge
    assert box[0] == 0 and box[2] == round(FACE_SCALE * 60)
    fitted = fit_image(ramp(400, 300), 64, 64, face_box=(0, 100, 60, 160))
    assert not fitted.padded


def test_face_filling_the_photo_shrinks_then_pads_with_edge_pixels() -> None:
    image = ramp(100, 120)
    fitted = fit_image(image, 50, 50, face_box=(5, 10, 95, 110))  # face 90 × 100: 1.2 × 100 = 120 > 100 wide
    left, top, right, bottom = fitted.crop_box
    assert (right - left, bottom - top) == (120, 120)  # shrunk from 185 to the 1.2 × face minimum
    assert fitted.padded and left == -10 and right == 110  # the 20-px overhang split evenly
    full = fit_image(image, 120, 120, face_box=(5, 10, 95, 110)).pixels
    np.testing.assert_array_equal(full[:, :10, 0], 0)  # columns left of the image repeat column 0 (red = x = 0)
    np.testing.assert_array_equal(full[:, -10:, 0], 99)  # and right of it column 99


def test_the_astronaut_framing_is_reproduced(tmp_path: Path) -> None:
    # The landmark box of the astronaut gives (nearly) the crop of the shipped portrait, ASTRONAUT_FACE_BOX.
    from skimage import data

    path = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    face = (*np.floor(ASTRONAUT_LANDMARKS.min(0)).astype(int), *(np.ceil(ASTRONAUT_LANDMARKS.max(0)).astype(int) + 1))
    fitted = fit_reference(path, 128, 128, face_box=tuple(int(v) for v in face))  # type: ignore[arg-type]
    top, left, side = ASTRONAUT_FACE_BOX
    assert np.abs(np.subtract(fitted.crop_box, (left, top, left + side, top + side))).max() <= 6
    assert load_rgb(path).size == fitted.source_size == (512, 512)


@pytest.mark.parametrize("face_box", [(10, 10, 10, 50), (-5, 0, 20, 20), (0, 0, 20, 500)])
def test_bad_face_box_names_the_fix(face_box: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError, match=r"face box .* is empty or outside the 100x100 image"):
        fit_image(ramp(100, 100), 32, 32, face_box=face_box)


def test_unreadable_reference(tmp_path: Path) -> None:
    path = tmp_path / "face.png"
    path.write_text("not an image")
    with pytest.raises(ValueError, match=r"face\.png: not a readable image"):
        fit_reference(path, 32, 32)
