"""video_io.py with the real ffmpeg binary: encode, probe, decode, resample, and failures that leave nothing behind."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flashportrait.infra import video_io


WIDTH, HEIGHT = 64, 48


def moving_gradient(count: int, width: int = WIDTH, height: int = HEIGHT) -> Iterator[np.ndarray]:
    """Smooth RGB ramps sliding 2 px per frame: easy for H.264, so a good encode is well above 30 dB."""
    y, x = np.mgrid[0:height, 0:width]
    for index in range(count):
        red = 40 + 2 * x + 2 * index  # at most 40 + 126 + 2 * 23 = 212, no wrap-around edge
        green = 60 + 3 * y
        blue = np.full_like(x, 128)
        yield np.stack([red, green, blue], axis=-1).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def clip_12fps_2s(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    video_io.encode_video(path, moving_gradient(24), fps=12, preset="ultrafast")
    return path


def test_ffmpeg_executable_runs() -> None:
    result = subprocess.run([video_io.ffmpeg_executable(), "-version"], capture_output=True, check=True)
    assert result.stdout.startswith(b"ffmpeg version")


def test_encode_probe_decode_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out" / "gradient.mp4"
    written = video_io.encode_video(path, moving_gradient(17), fps=12)
    assert written == 17

    info = video_io.probe_video(path)
    assert (info.width, info.height, info.fps, info.num_frames) == (64, 48, 12.0, 17)
    assert info.codec == "h264" and not info.has_audio
    assert info.duration == pytest.approx(17 / 12, abs=1e-3)

    decoded = list(video_io.iter_frames(path))
    assert len(decoded) == 17
    assert all(frame.shape == (48, 64, 3) and frame.dtype == np.uint8 for frame in decoded)
    assert min(psnr(a, b) for a, b in zip(decoded, moving_gradient(17))) > 30


def test_iter_frames_resamples_to_the_target_fps(clip_12fps_2s: Path) -> None:
    # 2 s at 12 fps resampled to 6 fps: 2 s * 6 = 12 frames.
    assert len(list(video_io.iter_frames(clip_12fps_2s, fps=6))) == 12


def test_iter_frames_scales_to_size(clip_12fps_2s: Path) -> None:
    frames = list(video_io.iter_frames(clip_12fps_2s, size=(32, 32), max_frames=3))
    assert [frame.shape for frame in frames] == [(32, 32, 3)] * 3


def test_iter_frames_kills_ffmpeg_when_the_consumer_stops(clip_12fps_2s: Path) -> None:
    frames = video_io.iter_frames(clip_12fps_2s)
    first = next(frames)
    frames.close()  # must not hang or leave a zombie (the finally block kills and reaps ffmpeg)
    assert first.shape == (HEIGHT, WIDTH, 3)


def test_truncated_video_is_an_error_not_a_short_clip(clip_12fps_2s: Path, tmp_path: Path) -> None:
    data = clip_12fps_2s.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) * 6 // 10])  # +faststart: the index survives, the frames do not
    with pytest.raises(video_io.FFmpegError, match=r"truncated\.mp4 decoded to \d+ frames, but its header promises"):
        list(video_io.iter_frames(truncated))


def test_not_a_video_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("these are not frames")
    with pytest.raises(ValueError, match=r"notes\.mp4 is not a readable video"):
        video_io.probe_video(path)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    audio = _sine(tmp_path / "tone.m4a", seconds=1)
    with pytest.raises(ValueError, match=r"tone\.m4a has no video stream \(found: audio/aac\)"):
        video_io.probe_video(audio)


@pytest.mark.parametrize(("n", "expected"), [(1, 1), (4, 1), (5, 5), (8, 5), (9, 9), (200, 197), (201, 201)])
def test_largest_4k_plus_1(n: int, expected: int) -> None:
    assert video_io.largest_4k_plus_1(n) == expected


def test_largest_4k_plus_1_needs_a_frame() -> None:
    with pytest.raises(ValueError, match="at least 1 frame"):
        video_io.largest_4k_plus_1(0)


def test_read_frames_4k_plus_1_truncates(clip_12fps_2s: Path) -> None:
    frames = video_io.read_frames_4k_plus_1(clip_12fps_2s)  # 24 decoded → 21 = 4 * 5 + 1
    assert frames.shape == (21, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8


def test_odd_width_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"even dimensions, got 63x48 .* resize to 62x48"):
        video_io.VideoEncoder(tmp_path / "odd.mp4", 63, 48, 12)


def test_wrong_frame_shape_names_the_frame(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Frame 1 .* expected \(48, 64, 3\) uint8"):
        with video_io.VideoEncoder(tmp_path / "v.mp4", WIDTH, HEIGHT, 12) as encoder:
            encoder.write(next(moving_gradient(1)))
            encoder.write(np.zeros((48, 64), dtype=np.uint8))
    assert not (tmp_path / "v.mp4").exists()


def test_exception_in_the_block_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "partial.mp4"
    with pytest.raises(RuntimeError, match="model crashed"):
        with video_io.VideoEncoder(path, WIDTH, HEIGHT, 12) as encoder:
            for frame in moving_gradient(10):
                encoder.write(frame)
            raise RuntimeError("model crashed")
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_failure_reports_its_stderr_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.mp4"
    with pytest.raises(video_io.FFmpegError, match="invalid preset 'no-such-preset'"):
        video_io.encode_video(path, moving_gradient(30), fps=12, preset="no-such-preset")
    assert not path.exists()


@pytest.mark.parametrize("audio_seconds", [3, 1], ids=["longer-audio-is-cut", "shorter-audio-never-cuts-video"])
def test_audio_is_muxed_to_the_video_length(tmp_path: Path, audio_seconds: float) -> None:
    audio = _sine(tmp_path / "tone.m4a", seconds=audio_seconds)
    path = tmp_path / "with_audio.mp4"
    video_io.encode_video(path, moving_gradient(24), fps=12, audio_source=audio, preset="ultrafast")
    info = video_io.probe_video(path)
    assert info.has_audio and info.num_frames == 24
    assert info.duration == pytest.approx(2.0, abs=0.05)  # 24 frames / 12 fps


def test_audio_source_without_audio_gives_a_silent_video(clip_12fps_2s: Path, tmp_path: Path) -> None:
    path = tmp_path / "silent.mp4"
    video_io.encode_video(path, moving_gradient(5), fps=12, audio_source=clip_12fps_2s, preset="ultrafast")
    assert not video_io.probe_video(path).has_audio


def _sine(path: Path, *, seconds: float) -> Path:
    command = [
        video_io.ffmpeg_executable(),
        "-hide_banner",
        "-loglevel",
        "error",
        "-f",
        "lavfi",
        "-i",
        f"sine=frequency=440:duration={seconds}",
        "-c:a",
        "aac",
        str(path),
    ]
    subprocess.run(command, check=True)
    return path
