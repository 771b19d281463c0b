"""video_io.py with the real ffmpeg binary: encode, probe, decode, resample, and failures that leave nothing behind."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from flashportrait.infra import video_io
from flashportrait.testing import warped_driving_frames


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
    return float(10 * np.log10(255.0**2 / mse)) if mse > 0 else float("inf")


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


def _encode_raw(
    path: Path, frames: list[np.ndarray], fps: float, *codec: str, pre_input: tuple[str, ...] = ()
) -> Path:
    """Encode RGB frames with the ffmpeg CLI and any codec options: inputs our own encoder never writes."""
    height, width = frames[0].shape[:2]
    command = [
        video_io.ffmpeg_executable(), "-hide_banner", "-loglevel", "error", "-y", *pre_input,
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(fps), "-i", "pipe:",
        *codec, str(path),
    ]  # fmt: skip
    subprocess.run(command, input=b"".join(f.tobytes() for f in frames), check=True)
    return path


def _audio(path: Path) -> tuple[np.ndarray, float, int]:
    """Decoded mono samples of the first audio track, the track's duration from the container, its sample rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(stream)])
        return samples, float(stream.duration * stream.time_base), stream.rate


def _burst(path: Path, *, video_seconds: float, burst_at: float, audio_delay: float = 0.0) -> Path:
    """A 12 fps video with a silent audio track except a 440 Hz burst starting ``burst_at`` s into the audio."""
    tone = f"if(between(t\\,{burst_at}\\,{burst_at + 0.2})\\,sin(2*PI*440*t)\\,0)"
    command = [
        video_io.ffmpeg_executable(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size=64x48:rate=12:duration={video_seconds}",
        "-itsoffset", str(audio_delay), "-f", "lavfi", "-i", f"aevalsrc=exprs='{tone}':d={video_seconds}:s=48000",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    return path


def _onset(samples: np.ndarray, rate: int = 48000) -> float:
    return float(np.flatnonzero(np.abs(samples) > 0.05)[0] / rate)


class TestRoundTrip:
    def test_synthetic_clip_psnr_frame_count_and_fps(self, tmp_path: Path) -> None:
        frames, _ = warped_driving_frames(21, 192, seed=0, fps=25)
        path = tmp_path / "clip.mp4"
        assert video_io.encode_video(path, frames, fps=25) == 21  # default crf 18, preset medium
        info = video_io.probe_video(path)
        assert (info.num_frames, info.fps, info.duration) == (21, 25.0, pytest.approx(21 / 25))
        decoded = list(video_io.iter_frames(path))
        assert len(decoded) == 21
        assert min(psnr(a, b) for a, b in zip(decoded, frames)) >= 35.0

    def test_ntsc_rate_is_kept_exactly(self, tmp_path: Path) -> None:
        path = tmp_path / "ntsc.mp4"
        video_io.encode_video(path, moving_gradient(10), fps=30000 / 1001, preset="ultrafast")
        with av.open(str(path)) as container:
            assert container.streams.video[0].average_rate == Fraction(30000, 1001)
        assert len(list(video_io.iter_frames(path))) == 10

    def test_output_is_tagged_bt709_with_the_index_up_front(self, tmp_path: Path) -> None:
        path = tmp_path / "tagged.mp4"
        video_io.encode_video(path, moving_gradient(3), fps=12, preset="ultrafast")
        with av.open(str(path)) as container:
            context = container.streams.video[0].codec_context
            assert (context.pix_fmt, context.colorspace, context.color_range) == ("yuv420p", 1, 1)  # 1 = BT.709, TV
        data = path.read_bytes()
        assert data.index(b"moov") < data.index(b"mdat")  # faststart: playable while downloading

    def test_bad_crf_and_offset_are_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"crf must be in 0\.\.51 .* got 60"):
            video_io.VideoEncoder(tmp_path / "v.mp4", WIDTH, HEIGHT, 12, crf=60)
        with pytest.raises(ValueError, match=r"audio_offset must be >= 0 s .* got -1"):
            video_io.VideoEncoder(
                tmp_path / "v.mp4", WIDTH, HEIGHT, 12, audio_source=tmp_path / "a.m4a", audio_offset=-1
            )


class TestAudio:
    @pytest.mark.parametrize(("audio_seconds", "frames"), [(3, 24), (1, 25), (1, 37)])
    def test_audio_lasts_exactly_as_long_as_the_video(self, tmp_path: Path, audio_seconds: float, frames: int) -> None:
        audio = _sine(tmp_path / "tone.m4a", seconds=audio_seconds)  # longer than the video, or shorter
        path = tmp_path / "with_audio.mp4"
        video_io.encode_video(path, moving_gradient(frames), fps=12, audio_source=audio, preset="ultrafast")
        info = video_io.probe_video(path)
        assert info.has_audio and info.num_frames == frames
        samples, track_duration, rate = _audio(path)
        assert track_duration == pytest.approx(frames / 12, abs=0.05)
        assert len(samples) / rate == pytest.approx(frames / 12, abs=0.05)  # decoded: one AAC frame (23 ms) more

    @pytest.mark.parametrize("offset", [0.0, 1 / 12, 0.5])
    def test_audio_offset_keeps_sync(self, tmp_path: Path, offset: float) -> None:
        # The burst starts 1.0 s into the source; the output starts ``offset`` s in, so it hears it at 1.0 - offset.
        source = _burst(tmp_path / "driving.mp4", video_seconds=3, burst_at=1.0)
        path = tmp_path / "out.mp4"
        video_io.encode_video(path, moving_gradient(24), fps=12, audio_source=source, audio_offset=offset)
        assert _onset(_audio(path)[0]) == pytest.approx(1.0 - offset, abs=0.005)

    def test_audio_that_starts_after_the_video_is_delayed_not_pulled_forward(self, tmp_path: Path) -> None:
        source = _burst(tmp_path / "late.mp4", video_seconds=3, burst_at=1.0, audio_delay=0.5)  # burst at 1.5 s
        path = tmp_path / "out.mp4"
        video_io.encode_video(path, moving_gradient(24), fps=12, audio_source=source, audio_offset=1 / 12)
        assert _onset(_audio(path)[0]) == pytest.approx(1.5 - 1 / 12, abs=0.005)

    def test_no_side_files_are_left(self, tmp_path: Path) -> None:
        audio = _sine(tmp_path / "tone.m4a", seconds=1)
        video_io.encode_video(tmp_path / "out.mp4", moving_gradient(6), fps=12, audio_source=audio)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "tone.m4a"]
        with pytest.raises(RuntimeError, match="model crashed"):
            with video_io.VideoEncoder(tmp_path / "failed.mp4", WIDTH, HEIGHT, 12, audio_source=audio) as encoder:
                encoder.write(next(moving_gradient(1)))
                raise RuntimeError("model crashed")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "tone.m4a"]  # nor the video-only file


class TestRealInputs:
    def test_variable_frame_rate_is_resampled_to_a_constant_rate(self, tmp_path: Path) -> None:
        # Frames shown at irregular times (ms); frame i has grey level 20 + 20 i.
        shown_at = [0, 100, 150, 400, 420, 440, 800, 1000, 1030, 1300]
        path = tmp_path / "vfr.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=1000, options={"bf": "0"})
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            stream.time_base = Fraction(1, 1000)
            for index, ms in enumerate(shown_at):
                frame = av.VideoFrame.from_ndarray(np.full((HEIGHT, WIDTH, 3), 20 + 20 * index, np.uint8), "rgb24")
                frame.pts, frame.time_base = ms, stream.time_base
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        levels = [round((float(f.mean()) - 20) / 20) for f in video_io.iter_frames(path, fps=10)]
        # 1.301 s (the last frame lasts 1 ms) at 10 fps = 13 frames; output frame k (t = k/10 s) shows the last source
        # frame whose time rounds to slot k: 0.40/0.42/0.44 s all round to slot 4, so frame 5 wins it.
        assert levels == [0, 1, 2, 2, 5, 5, 5, 5, 6, 6, 8, 8, 8]
        # Without fps: the average rate (10 frames / 1.301 s), still one frame per constant step.
        assert len(list(video_io.iter_frames(path))) == 10

    def test_rotation_metadata_is_applied(self, tmp_path: Path, clip_12fps_2s: Path) -> None:
        rotated = tmp_path / "rotated.mp4"
        command = [
            video_io.ffmpeg_executable(), "-hide_banner", "-loglevel", "error", "-display_rotation", "90",
            "-i", str(clip_12fps_2s), "-c", "copy", str(rotated),
        ]  # fmt: skip
        subprocess.run(command, check=True)
        info = video_io.probe_video(rotated)
        assert (info.width, info.height, info.rotation) == (HEIGHT, WIDTH, 90)
        upright, turned = next(video_io.iter_frames(clip_12fps_2s)), next(video_io.iter_frames(rotated))
        np.testing.assert_array_equal(turned, np.rot90(upright))  # 90° counter-clockwise, as displayed

    @pytest.mark.parametrize(
        ("name", "codec", "size", "pix_fmt"),
        [
            ("odd.mkv", ("-c:v", "ffv1"), (63, 47), "bgr0"),
            ("ten_bit.mp4", ("-c:v", "libx264", "-pix_fmt", "yuv420p10le", "-crf", "12"), (64, 48), "yuv420p10le"),
            ("full_chroma.mp4", ("-c:v", "libx264", "-pix_fmt", "yuv444p", "-crf", "12"), (64, 48), "yuv444p"),
        ],
    )
    def test_odd_sizes_10_bit_and_444_decode(
        self, tmp_path: Path, name: str, codec: tuple[str, ...], size: tuple[int, int], pix_fmt: str
    ) -> None:
        frames = list(moving_gradient(6, *size))
        path = _encode_raw(tmp_path / name, frames, 12, *codec)
        info = video_io.probe_video(path)
        assert (info.width, info.height, info.pix_fmt) == (*size, pix_fmt)
        decoded = list(video_io.iter_frames(path))
        assert len(decoded) == 6 and decoded[0].shape == (size[1], size[0], 3)
        assert min(psnr(a, b) for a, b in zip(decoded, frames)) >= 35.0

    def test_cover_art_is_not_a_video(self, tmp_path: Path) -> None:
        audio = _sine(tmp_path / "tone.m4a", seconds=1)
        cover = _encode_raw(tmp_path / "cover.png", list(moving_gradient(1)), 1, "-frames:v", "1")
        song = tmp_path / "song.m4a"
        command = [
            video_io.ffmpeg_executable(), "-hide_banner", "-loglevel", "error", "-i", str(audio), "-i", str(cover),
            "-map", "0", "-map", "1", "-c:a", "copy", "-c:v", "mjpeg", "-disposition:v:0", "attached_pic", str(song),
        ]  # fmt: skip
        subprocess.run(command, check=True)
        with pytest.raises(
            ValueError, match=r"song\.m4a has no video stream \(found: audio/aac, video/mjpeg cover art\)"
        ):
            video_io.probe_video(song)

    def test_max_side_only_shrinks_and_keeps_even_sides(self, clip_12fps_2s: Path) -> None:
        assert video_io.fit_within(1920, 1080, 640) == (640, 360)
        assert video_io.fit_within(1080, 1920, 641) == (360, 640)  # 360.6 → 360, 641 → 640: even
        assert video_io.fit_within(64, 48, 640) == (64, 48)
        frame = next(video_io.iter_frames(clip_12fps_2s, max_side=32))
        assert frame.shape == (24, 32, 3)
        with pytest.raises(ValueError, match=r"pass size or max_side .* not both"):
            next(video_io.iter_frames(clip_12fps_2s, max_side=32, size=(8, 8)))
