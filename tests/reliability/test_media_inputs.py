"""Reference images and driving videos: hostile files are refused from the sandbox with a reason; odd but legal
files are normalised."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flashportrait.infra.limits import Limits
from flashportrait.infra.media_guard import MediaRejected, inspect_image, inspect_video, output_fps
from flashportrait.infra.video_io import DecodeReport, FFmpegError, iter_frames

from . import media_factory as mf


LIMITS = Limits()


def put(path, data: bytes | str):
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def image(path, limits: Limits = LIMITS):
    return inspect_image(path, path.with_suffix(".npy"), limits)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: put(p, "not an image at all"), "not an image Pillow can identify"),
        (lambda p: put(p, b""), "not an image Pillow can identify"),
        (lambda p: mf.truncated_copy(mf.portrait(p.with_name("full.png")), p, 0.3), "truncated or corrupt"),
        (lambda p: put(p, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), "not an image|unreadable"),
        (lambda p: Image.new("1", (20000, 20000)).save(p) or p, r"20000x20000 exceeds max_image_pixels \(50.0 Mpx\)"),
        (lambda p: mf.png_header_lie(p), r"65535x65535 exceeds max_image_pixels"),
        (lambda p: mf.png_header_lie(p, 10000, 5001), r"10000x5001 exceeds max_image_pixels \(50.0 Mpx\)"),
        (lambda p: mf.portrait(p, size=32), r"32x32 is smaller than min_input_side \(64 px\)"),
        (lambda p: put(p, '<svg xmlns="http://www.w3.org/2000/svg"/>'), "not an image Pillow can identify"),
    ],
    ids=["text", "empty", "truncated", "corrupt", "bomb", "header-lie", "header-lie-50mpx", "too-small", "svg"],
)
def test_bad_reference_images_are_refused(tmp_path, make, message):
    path = make(tmp_path / "ref.png")
    with pytest.raises(MediaRejected, match=message):
        image(path)


@pytest.mark.parametrize(
    ("size", "fmt", "orientation", "expected"),
    [
        ((4000, 3000), "JPEG", 0, (3325, 2494)),  # 12 Mpx phone photo
        ((3000, 4000), "PNG", 0, (2494, 3325)),  # 12 Mpx, a format without reduced-scale decoding
        ((4032, 3024), "JPEG", 6, (2494, 3325)),  # 12 Mpx portrait shot held upright: EXIF-rotated, then fitted
        ((8000, 6000), "JPEG", 0, (3325, 2494)),  # 48 Mpx
    ],
    ids=["12mpx-jpeg", "12mpx-png", "12mpx-exif-rotated", "48mpx-jpeg"],
)
def test_phone_photos_are_downscaled_to_the_working_size(tmp_path, size, fmt, orientation, expected):
    path = mf.phone_photo(tmp_path / f"photo.{fmt.lower()}", size, fmt=fmt, exif_orientation=orientation)
    pixels, info = image(path)
    assert pixels.shape == (expected[1], expected[0], 3)
    assert pixels.shape[0] * pixels.shape[1] <= LIMITS.max_input_pixels
    assert f"downscaled from {size[0]}x{size[1]} to {expected[0]}x{expected[1]}" in " ".join(info.normalised)
    assert abs(pixels.shape[1] / pixels.shape[0] - expected[0] / expected[1]) < 1e-3  # aspect kept
    assert 60 < pixels.mean() < 200  # real content, not a blank or black decode


def test_a_48_megapixel_jpeg_decodes_at_reduced_scale(tmp_path, monkeypatch):
    """libjpeg's 1/2-1/8 scaled decode: the 144 MB full-size RGB image is never made, so 512 MiB of address space
    (the interpreter with numpy and Pillow takes about 300) is enough; a full-size decode needs about 650."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # BLAS thread stacks would count against RLIMIT_AS
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = mf.phone_photo(tmp_path / "photo.jpg", (8000, 6000))
    pixels, _ = image(path, Limits(decode_memory_bytes=512 << 20))
    assert pixels.shape == (2494, 3325, 3)


def test_images_within_the_working_size_are_untouched(tmp_path):
    path = mf.phone_photo(tmp_path / "photo.png", (3840, 2160), fmt="PNG")  # exactly max_input_pixels
    pixels, info = image(path)
    assert pixels.shape == (2160, 3840, 3) and not any("downscaled" in n for n in info.normalised)
    assert (pixels == np.asarray(Image.open(path).convert("RGB"))).all()  # bit-exact: earlier job hashes hold


@pytest.mark.parametrize(
    ("mode", "fmt", "note"),
    [
        ("CMYK", "JPEG", "CMYK converted to RGB"),
        ("I;16", "PNG", "I;16 scaled to 8-bit"),
        ("RGBA", "PNG", "alpha flattened on mid-grey"),
        ("P", "PNG", "P converted to RGB"),
        ("L", "PNG", "L converted to RGB"),
    ],
)
def test_odd_but_legal_images_are_normalised(tmp_path, mode, fmt, note):
    pixels, info = image(mf.portrait(tmp_path / f"ref.{fmt.lower()}", mode=mode, fmt=fmt))
    assert pixels.shape == (96, 96, 3) and pixels.dtype.name == "uint8"
    assert note in info.normalised


def test_exif_orientation_and_wrong_extension(tmp_path):
    path = tmp_path / "portrait.jpg"  # a PNG named .jpg, and a JPEG rotated by EXIF
    mf.portrait(path, fmt="PNG")
    pixels, info = image(path)
    assert info.format == "PNG" and any("whatever the file name says" in n for n in info.normalised)
    rotated = mf.portrait(tmp_path / "rot.jpg", fmt="JPEG", size=96, exif_orientation=6)
    Image.open(rotated).crop((0, 0, 96, 80)).save(rotated, exif=Image.open(rotated).getexif())  # 96x80, EXIF 6
    pixels, info = image(rotated)
    assert pixels.shape == (96, 80, 3) and "exif-rotated" in info.normalised  # 90° turn swaps the sides


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return mf.test_clip(tmp_path_factory.mktemp("clips") / "clip.mp4")


@pytest.mark.parametrize(
    ("make", "message", "limits"),
    [
        (lambda p, c: put(p, b""), "not a readable video", LIMITS),
        (lambda p, c: put(p, "hello"), "not a readable video", LIMITS),
        (lambda p, c: mf.audio_only(p.with_suffix(".m4a")), r"no video stream \(it has only audio\)", LIMITS),
        (lambda p, c: mf.truncated_copy(c, p, 0.5), "not a readable video|truncated|moov", LIMITS),
        (lambda p, c: mf.test_clip(p, frames=1), r"only 1 frame\(s\)", LIMITS),
        (lambda p, c: mf.test_clip(p, size="4000x2500", frames=2), r"4000x2500 exceeds max_input_pixels", LIMITS),
        (lambda p, c: c, r"duration 1 s exceeds max_duration_s \(0.5 s\)", Limits(max_duration_s=0.5)),
        (lambda p, c: mf.hls_playlist(p, c), "not a readable video|not an accepted video container", LIMITS),
        (lambda p, c: mf.ffconcat(p), "not a readable video|not an accepted video container", LIMITS),
        (lambda p, c: mf.portrait(p.with_suffix(".png")), "not an accepted video container|not a readable", LIMITS),
    ],
    ids=["empty", "text", "audio-only", "truncated", "one-frame", "8k-ish", "too-long", "hls", "ffconcat", "image"],
)
def test_bad_driving_videos_are_refused(tmp_path, clip, make, message, limits):
    path = make(tmp_path / "drv.mp4", clip)
    with pytest.raises(MediaRejected, match=message):
        inspect_video(path, limits)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("moov at end.mp4", {}, (96, 96, 12.0)),
        ("faststart #1 é.mp4", {"extra": ("-movflags", "+faststart")}, (96, 96, 12.0)),
        ("clip.mkv", {}, (96, 96, 12.0)),
        ("high-fps.mp4", {"fps": 120, "frames": 30}, (96, 96, 120.0)),
        ("odd-444.mp4", {"extra": ("-vf", "scale=131:97", "-pix_fmt", "yuv444p")}, (131, 97, 12.0)),
    ],
)
def test_odd_but_legal_videos_pass_inspection(tmp_path, name, kwargs, expected):
    info = inspect_video(mf.test_clip(tmp_path / name, **kwargs), LIMITS)
    assert (info.width, info.height, info.fps) == expected and info.num_frames >= 5


@pytest.fixture(scope="module")
def corrupt_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupt")
    clip = mf.test_clip(folder / "clip.mp4", size="128x128", frames=48, extra=("-g", "12", "-movflags", "+faststart"))
    return clip, mf.corrupt_packets(clip, folder / "corrupt.mp4")


def test_corrupt_packets_fail_the_decode(corrupt_clip):
    clip, corrupt = corrupt_clip
    assert len(list(iter_frames(clip))) == 48  # the intact clip decodes without a word
    info = inspect_video(corrupt, LIMITS)  # headers intact: only the decoder can tell
    assert info.num_frames == 48
    with pytest.raises(
        FFmpegError,
        match=r"corrupt\.mp4: the decoder reported \d+ error\(s\), first: .*\[error\].*damaged.*--lenient-decode",
    ):
        list(iter_frames(corrupt, info=info.video_info()))


def test_corrupt_packets_under_lenient_decode_render_and_say_what_was_concealed(corrupt_clip):
    _, corrupt = corrupt_clip
    report = DecodeReport()
    frames = list(iter_frames(corrupt, lenient=report))
    assert len(frames) == 48 and report.damaged and report.frames_kept == 48 and report.frames_dropped == 0
    assert report.decoder_errors > 0 and "the decoder concealed" in report.problem and "[error]" in report.problem


@pytest.mark.parametrize(
    ("row_fps", "source_fps", "expected"),
    [
        (None, 240.0, 120.0),  # slow motion: every 2nd frame
        (None, 960.0, 120.0),
        (None, 1000.0, 1000 / 9),  # the largest whole fraction within max_fps
        (None, 119.88, 119.88),
        (None, 29.97, 29.97),
        (24.0, 240.0, 24.0),  # the row's fps wins
    ],
)
def test_output_fps_of_fast_driving_videos(row_fps, source_fps, expected):
    assert output_fps(row_fps, source_fps, LIMITS) == pytest.approx(expected)


def test_a_240_fps_slow_motion_clip_is_resampled_not_refused(tmp_path):
    info = inspect_video(mf.test_clip(tmp_path / "slomo.mp4", fps=240, frames=96), LIMITS)  # 0.4 s
    fps = output_fps(None, info.fps, LIMITS)
    assert info.fps == 240.0 and fps == 120.0 and LIMITS.min_fps <= fps <= LIMITS.max_fps
    assert len(list(iter_frames(tmp_path / "slomo.mp4", fps=fps, info=info.video_info()))) == 48
