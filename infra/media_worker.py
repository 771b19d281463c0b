"""The sandboxed side of ``media_guard``: run as ``python -m flashportrait.infra.media_worker`` under rlimits.

Prints one JSON line, ``{"result": {...}}`` or ``{"error": "..."}``, and exits 0 / 3. Never imported by the
parent process for parsing untrusted files itself.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np


ALLOWED_IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "MPO"})
# Source frame rates beyond this are metadata nonsense, not video (a zero timescale reads as 1/512 fps, etc.).
MAX_SOURCE_FPS = 1000.0
MIN_DRIVING_FRAMES = 5
EXTENSION_FORMATS = {
    "png": "PNG",
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "webp": "WEBP",
    "bmp": "BMP",
    "tif": "TIFF",
    "tiff": "TIFF",
    "gif": "GIF",
    "mpo": "MPO",
}  # 4k+1 ≥ 5: one latent frame beyond the reference


class Rejected(Exception):
    pass


def mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx"


def check_size(width: int, height: int, limits: dict, what: str, limit: str = "max_input_pixels") -> None:
    """A frame size against a pixel limit and ``min_input_side``. Videos are held to ``max_input_pixels``; a still
    image's header to ``max_image_pixels``: phone photos (12-50 Mpx) pass and are downscaled after decoding, and a
    decompression bomb (a 20000² PNG of a few kB) is refused before a pixel is decoded."""
    if width * height > limits[limit]:
        raise Rejected(
            f"{width}x{height} exceeds {limit} ({mpx(limits[limit])}); downscale the {what} or raise "
            f"--{limit.replace('_', '-')}"
        )
    if min(width, height) < limits["min_input_side"]:
        raise Rejected(
            f"{width}x{height} is smaller than min_input_side ({limits['min_input_side']} px); a usable face needs "
            "more pixels"
        )


def working_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down (never up), aspect kept, to at most ``max_pixels`` pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def inspect_image(path: str, out_npy: str, limits: dict) -> dict:
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # our own limit is checked from the header below, before any decode
    try:
        image = Image.open(path)  # reads the header only
    except UnidentifiedImageError:
        raise Rejected("not an image Pillow can identify (PNG, JPEG, WebP, BMP, TIFF or GIF expected)") from None
    except OSError as error:
        raise Rejected(f"unreadable image: {error}") from None
    with image:
        if image.format not in ALLOWED_IMAGE_FORMATS:
            raise Rejected(f"image format {image.format} is not accepted; use PNG or JPEG")
        check_size(*image.size, limits, "image", limit="max_image_pixels")
        header_size = image.size
        target = working_size(*header_size, limits["max_input_pixels"])
        if target != header_size:
            # JPEG: decode at 1/2, 1/4 or 1/8 scale in libjpeg (a 48 Mpx photo never exists at full size here),
            # never below the working size; other formats decode in full (at most max_image_pixels) and are reduced.
            image.draft(None, target)
        try:
            image.load()
        except OSError as error:
            raise Rejected(f"the image is truncated or corrupt ({error}); re-export it") from None
        notes: list[str] = []
        oriented = ImageOps.exif_transpose(image)
        if oriented.size != image.size or oriented is not image and image.getexif().get(0x0112, 1) != 1:
            notes.append("exif-rotated")
        rgb = to_rgb8(oriented, notes)
        if target != header_size:
            fitted = working_size(*rgb.size, limits["max_input_pixels"])
            if rgb.size != fitted:
                rgb = rgb.resize(fitted, Image.Resampling.LANCZOS, reducing_gap=3.0)
            notes.append(
                f"downscaled from {header_size[0]}x{header_size[1]} to {rgb.size[0]}x{rgb.size[1]} "
                f"(max_input_pixels {mpx(limits['max_input_pixels'])})"
            )
    named = EXTENSION_FORMATS.get(Path(path).suffix.lower().lstrip("."))
    if named is not None and named != image.format:
        notes.append(f"content is {image.format} whatever the file name says")
    pixels = np.asarray(rgb, dtype=np.uint8)
    np.save(out_npy, pixels, allow_pickle=False)
    return {
        "width": rgb.size[0],
        "height": rgb.size[1],
        "format": image.format,
        "mode": image.mode,
        "normalised": notes,
    }


def to_rgb8(image, notes: list[str]):
    """Any Pillow mode → plain 8-bit RGB: 16-bit scaled, alpha flattened on mid-grey, CMYK/palette converted."""
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        notes.append(f"{mode} scaled to 8-bit")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        background = Image.new("RGBA", image.size, (128, 128, 128, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
        notes.append("alpha flattened on mid-grey")
    if image.mode != "RGB":
        notes.append(f"{image.mode} converted to RGB")
        image = image.convert("RGB")
    return image


def inspect_video(path: str, limits: dict) -> dict:
    import av

    from flashportrait.infra.video_io import ALLOWED_CONTAINERS, probe_video

    try:
        with av.open(path, metadata_errors="ignore") as container:
            names = set(container.format.name.split(","))
            if not names & ALLOWED_CONTAINERS:
                raise Rejected(
                    f"container {container.format.name!r} is not an accepted video container (MP4/MOV, MKV/WebM, "
                    "MPEG-TS, AVI); playlists, concat scripts and image sequences are refused"
                )
            if not container.streams.video:
                audio = " (it has only audio)" if container.streams.audio else ""
                raise Rejected(f"no video stream{audio}; supply a video of the driving face")
            container_name = container.format.name
    except av.error.FFmpegError as error:
        raise Rejected(f"not a readable video ({error}); re-encode it to H.264 MP4") from None
    try:
        info = probe_video(path)
        probe = asdict(info)
    except (ValueError, RuntimeError) as error:
        raise Rejected(str(error)) from None
    check_size(info.width, info.height, limits, "video")
    fps = float(info.fps or 0.0)
    if not 0.0 < fps <= MAX_SOURCE_FPS:
        raise Rejected(f"no usable frame rate ({fps:g} fps in the headers); re-encode with a constant frame rate")
    duration = info.duration if info.duration and info.duration > 0 else (info.num_frames or 0) / fps
    if duration > limits["max_duration_s"]:
        raise Rejected(
            f"duration {duration:.0f} s exceeds max_duration_s ({limits['max_duration_s']:g} s); cut the video or "
            "raise --max-duration-s"
        )
    frames = info.num_frames or int(round(duration * fps))
    if frames < MIN_DRIVING_FRAMES:
        raise Rejected(f"only {frames} frame(s); a driving video needs at least {MIN_DRIVING_FRAMES}")
    return {
        "width": info.width,
        "height": info.height,
        "fps": fps,
        "num_frames": frames,
        "duration": duration,
        "container": container_name,
        "codec": info.codec,
        "has_audio": info.has_audio,
        "rotation": info.rotation,
        "probe": probe,
    }


def main(argv: list[str]) -> int:
    try:
        if argv[0] == "image":
            result = inspect_image(argv[1], argv[2], json.loads(argv[3]))
        elif argv[0] == "video":
            result = inspect_video(argv[1], json.loads(argv[2]))
        else:
            raise Rejected(f"unknown inspection {argv[0]!r}")
    except Rejected as rejection:
        print(json.dumps({"error": str(rejection)}))
        return 3
    except MemoryError:
        print(json.dumps({"error": "inspecting the file needed more than decode_memory_bytes; it is likely crafted"}))
        return 3
    print(json.dumps({"result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
