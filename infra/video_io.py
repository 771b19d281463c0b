"""Video in and out as streams of HxWx3 uint8 RGB frames, so no step ever holds a whole video in memory.

ffmpeg (the static binary shipped in the imageio-ffmpeg wheel, graphs built with ffmpeg-python) runs in a child
process: a crash on hostile or corrupt media kills the child, not the worker. PyAV is used only for probing, because
that binary comes without ``ffprobe``. Two rules keep the pipes from hanging: ffmpeg's stderr is always drained by a
thread (an unread stderr pipe fills up and blocks ffmpeg), and a consumer that stops early kills the decoder.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import av
import ffmpeg
import imageio_ffmpeg
import numpy as np


logger = logging.getLogger(__name__)

_QUIET = ("-hide_banner", "-nostdin", "-loglevel", "error")


class FFmpegError(RuntimeError):
    """ffmpeg exited with an error; the message carries the file, the exit code and the end of ffmpeg's stderr."""


def ffmpeg_executable() -> str:
    """The ffmpeg binary: the one bundled with imageio-ffmpeg (pinned, known codecs), else ``ffmpeg`` on PATH."""
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as error:
        found = shutil.which("ffmpeg")
        if found:
            return found
        raise RuntimeError(
            "No ffmpeg binary found: reinstall the imageio-ffmpeg wheel for this platform or put ffmpeg on PATH."
        ) from error


# ---- probing ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds. ``width``/``height`` are the *displayed* size (rotation applied), like the frames."""

    width: int
    height: int
    fps: float
    num_frames: int | None
    duration: float | None
    has_audio: bool
    codec: str
    rotation: int = 0


def probe_video(path: str | Path) -> VideoInfo:
    """Probe ``path`` with PyAV; ``ValueError`` (naming the file and what it holds) if it has no decodable video."""
    try:
        container = av.open(str(path))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"Video {path} does not exist.") from error
    except av.FFmpegError as error:
        raise ValueError(f"{path} is not a readable video ({error}); check that it is a complete video.") from error
    with container:
        if not container.streams.video:
            found = ", ".join(f"{s.type}/{s.codec_context.name}" for s in container.streams) or "no streams"
            raise ValueError(f"{path} has no video stream (found: {found}); a driving video is required.")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise ValueError(f"{path} does not declare a frame rate; re-encode it with a constant frame rate.")
        rotation = _rotation(container, stream, path)
        width, height = stream.codec_context.width, stream.codec_context.height
        if rotation % 180:
            width, height = height, width
        return VideoInfo(
            width=width,
            height=height,
            fps=float(rate),
            num_frames=stream.frames or None,
            duration=_duration(container, stream),
            has_audio=bool(container.streams.audio),
            codec=stream.codec_context.name,
            rotation=rotation,
        )


def _rotation(container: Any, stream: Any, path: str | Path) -> int:
    """The display rotation lives in per-frame side data in PyAV 18, so decode the first frame to read it."""
    try:
        frame = next(container.decode(stream))
    except (StopIteration, av.FFmpegError) as error:
        raise ValueError(f"{path}: its first video frame cannot be decoded ({error!r}); it is damaged.") from error
    return int(round(frame.rotation)) % 360


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _has_audio(path: str | Path) -> bool:
    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio)
    except (FileNotFoundError, av.FFmpegError) as error:
        raise ValueError(f"Audio source {path} cannot be opened ({error}); pass a readable media file.") from error


# ---- ffmpeg child processes ---------------------------------------------------------------------------------------


class _StderrTail:
    """Drains a child's stderr on a thread (so ffmpeg never blocks on a full pipe) and keeps the last lines."""

    def __init__(self, pipe: IO[bytes], keep: int = 40) -> None:
        self._lines: deque[str] = deque(maxlen=keep)
        self._thread = threading.Thread(target=self._drain, args=(pipe,), name="ffmpeg-stderr", daemon=True)
        self._thread.start()

    def _drain(self, pipe: IO[bytes]) -> None:
        with pipe:
            for raw in iter(pipe.readline, b""):
                self._lines.append(raw.decode("utf-8", "replace").rstrip())

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "\n".join(self._lines) or "(ffmpeg printed nothing)"


def _spawn(args: list[str], *, stdin: int, stdout: int) -> tuple[subprocess.Popen[bytes], _StderrTail]:
    logger.debug("running %s", " ".join(args))
    process = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    assert process.stderr is not None
    return process, _StderrTail(process.stderr)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def _rate(fps: float) -> str:
    """A frame rate as the rational ffmpeg expects (29.97 → 30000/1001), so timestamps do not drift."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}.")
    rate = Fraction(fps).limit_denominator(1001)
    return f"{rate.numerator}/{rate.denominator}"


# ---- decoding -----------------------------------------------------------------------------------------------------


def iter_frames(
    path: str | Path,
    *,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
) -> Iterator[np.ndarray]:
    """Decode ``path`` frame by frame as HxWx3 uint8 RGB frames.

    ``fps`` resamples to that constant rate (frames dropped or repeated by ffmpeg's fps filter), ``size`` = (width,
    height) scales. Only one frame is in memory at a time; stopping the iteration early kills ffmpeg.
    """
    info = probe_video(path)
    width, height = size or (info.width, info.height)
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive (width, height), got {size} for {path}.")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames} for {path}.")
    args = _decode_graph(path, fps=fps, size=size, max_frames=max_frames).compile(cmd=ffmpeg_executable())
    process, stderr = _spawn(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert process.stdout is not None
    frame_bytes = width * height * 3
    try:
        count = 0
        while max_frames is None or count < max_frames:
            buffer = _read_frame(process.stdout, frame_bytes)
            if len(buffer) < frame_bytes:  # end of the stream (empty) or, if ffmpeg broke off, inside a frame
                _check_decoder_exit(process, stderr, path, complete=not buffer)
                _check_frame_count(count, _expected_frames(info, fps), stderr, path)
                return
            yield np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3)
            count += 1
    finally:
        _stop(process)  # a consumer that stopped early (or max_frames reached) leaves ffmpeg running: kill it
        process.stdout.close()


def _decode_graph(path: str | Path, *, fps: float | None, size: tuple[int, int] | None, max_frames: int | None) -> Any:
    video = ffmpeg.input(str(path), protocol_whitelist="file")["v:0"]
    if fps is not None:
        video = video.filter("fps", fps=_rate(fps))
    if size is not None:
        video = video.filter("scale", size[0], size[1])
    # passthrough: every decoded (or fps-resampled) frame exactly once, no duplication for variable-rate sources.
    options: dict[str, Any] = {"format": "rawvideo", "pix_fmt": "rgb24", "fps_mode": "passthrough"}
    if max_frames is not None:
        options["frames:v"] = max_frames
    return ffmpeg.output(video, "pipe:", **options).global_args(*_QUIET)


def _read_frame(pipe: IO[bytes], frame_bytes: int) -> bytearray:
    """One frame of raw bytes; shorter (empty at a clean end) only where the stream ended."""
    buffer = bytearray(frame_bytes)
    with memoryview(buffer) as view:
        filled = 0
        while filled < frame_bytes:
            got = pipe.readinto(view[filled:])  # type: ignore[attr-defined]
            if not got:
                break
            filled += got
    del buffer[filled:]
    return buffer


def _check_decoder_exit(
    process: subprocess.Popen[bytes], stderr: _StderrTail, path: str | Path, *, complete: bool
) -> None:
    returncode = process.wait()
    if returncode != 0:
        raise FFmpegError(f"ffmpeg failed decoding {path} (exit code {returncode}):\n{stderr.text()}")
    if not complete:
        raise FFmpegError(f"ffmpeg's output for {path} ended inside a frame:\n{stderr.text()}")


def _expected_frames(info: VideoInfo, fps: float | None) -> float | None:
    if fps is None and info.num_frames:
        return float(info.num_frames)
    if info.duration is None:
        return None
    return info.duration * (fps or info.fps)


def _check_frame_count(count: int, expected: float | None, stderr: _StderrTail, path: str | Path) -> None:
    """ffmpeg exits 0 on a truncated file (it only logs "partial file"), so compare with what the container declares.

    The tolerance (1 frame or 2 %) absorbs where the fps filter rounds at both ends; truncation loses far more.
    """
    if expected is not None and count < expected - max(1.0, 0.02 * expected):
        raise FFmpegError(
            f"{path} decoded to {count} frames, but its header promises about {expected:.0f}: the file is truncated "
            f"or damaged; re-upload or re-encode it.\n{stderr.text()}"
        )


def largest_4k_plus_1(n: int) -> int:
    """The largest count 4k+1 <= n: the Wan VAE compresses time 4x after the first frame, so clips need 4k+1 frames."""
    if n < 1:
        raise ValueError(f"Need at least 1 frame to form a 4k+1 count, got {n}.")
    return n - (n - 1) % 4


def read_frames_4k_plus_1(
    path: str | Path,
    *,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """All frames of a short clip as [N, H, W, 3] uint8, N truncated to the largest 4k+1 count."""
    frames = list(iter_frames(path, fps=fps, size=size, max_frames=max_frames))
    if not frames:
        raise ValueError(f"{path} decoded to no frames; check the file and the requested fps.")
    return np.stack(frames[: largest_4k_plus_1(len(frames))])


# ---- encoding -----------------------------------------------------------------------------------------------------


class VideoEncoder:
    """Streaming H.264 (yuv420p, +faststart) encoder fed frame by frame through ffmpeg's stdin.

    Use it as a context manager: on an exception in the block ffmpeg is killed and the partial file deleted; on normal
    exit the stream is finished and ffmpeg's exit code checked. With ``audio_source``, its audio (if it has any) is
    muxed as AAC, cut to the video's length.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: float,
        *,
        crf: int = 18,
        preset: str = "medium",
        audio_source: str | Path | None = None,
    ) -> None:
        if width < 2 or height < 2 or width % 2 or height % 2:
            raise ValueError(
                f"H.264 yuv420p needs even dimensions, got {width}x{height} for {path}; "
                f"crop or resize to {width - width % 2}x{height - height % 2}."
            )
        self.path = Path(path)
        self.width = width
        self.height = height
        self.frames_written = 0
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with_audio = audio_source is not None and _has_audio(audio_source)
        if audio_source is not None and not with_audio:
            logger.info("%s has no audio track; %s will be silent", audio_source, self.path)
        graph = self._graph(fps, crf, preset, audio_source if with_audio else None)
        self._process, self._stderr = _spawn(
            graph.compile(cmd=ffmpeg_executable()), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
        )

    def _graph(self, fps: float, crf: int, preset: str, audio_source: str | Path | None) -> Any:
        frames = ffmpeg.input(
            "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{self.width}x{self.height}", framerate=_rate(fps)
        )
        streams = [frames["v"]]
        options: dict[str, Any] = {
            "vcodec": "libx264",
            "pix_fmt": "yuv420p",
            "crf": crf,
            "preset": preset,
            "movflags": "+faststart",
        }
        if audio_source is not None:
            # apad + shortest: audio longer than the video is cut, shorter audio is padded with silence, so
            # ``shortest`` can never cut the video itself.
            streams.append(ffmpeg.input(str(audio_source), protocol_whitelist="file")["a:0"].filter("apad"))
            options.update(acodec="aac", shortest=None)
        return ffmpeg.output(*streams, str(self.path), **options).overwrite_output().global_args(*_QUIET)

    def write(self, frame: np.ndarray) -> None:
        """Append one HxWx3 uint8 RGB frame of exactly (height, width)."""
        if self._closed:
            raise ValueError(f"Encoder for {self.path} is closed; open a new VideoEncoder.")
        array = np.asarray(frame)
        if array.shape != (self.height, self.width, 3) or array.dtype != np.uint8:
            raise ValueError(
                f"Frame {self.frames_written} for {self.path} has shape {array.shape} and dtype {array.dtype}; "
                f"expected ({self.height}, {self.width}, 3) uint8 RGB."
            )
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(np.ascontiguousarray(array).data)
        except BrokenPipeError as error:
            raise self._fail(f"ffmpeg stopped accepting frames for {self.path}") from error
        self.frames_written += 1

    def close(self) -> None:
        """Finish the file: end the stream, wait for ffmpeg, raise (and delete the file) if it failed."""
        if self._closed:
            return
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"No frames were written to {self.path}; an empty video is never a valid output.")
        assert self._process.stdin is not None
        try:
            self._process.stdin.close()
        except BrokenPipeError as error:
            raise self._fail(f"ffmpeg died before finishing {self.path}") from error
        if self._process.wait() != 0:
            raise self._fail(f"ffmpeg failed writing {self.path}")
        self._closed = True
        logger.debug("encoded %d frames to %s", self.frames_written, self.path)

    def abort(self) -> None:
        """Kill ffmpeg and delete the partial file: a half-written video must never be mistaken for a result."""
        if self._closed:
            return
        self._closed = True
        _stop(self._process)
        if self._process.stdin is not None:
            try:
                self._process.stdin.close()
            except BrokenPipeError:
                pass  # the buffered tail of a killed pipe has nowhere to go
        self._stderr.text()
        self.path.unlink(missing_ok=True)

    def _fail(self, what: str) -> FFmpegError:
        try:
            returncode: int | None = self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            returncode = None
        self.abort()
        return FFmpegError(f"{what} (exit code {returncode}):\n{self._stderr.text()}")

    def __enter__(self) -> VideoEncoder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def encode_video(path: str | Path, frames: Iterable[np.ndarray], fps: float, **kwargs: Any) -> int:
    """Encode ``frames`` (size taken from the first) to ``path``; returns the number of frames written."""
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError(f"No frames to encode to {path}.")
    height, width = first.shape[:2]
    with VideoEncoder(path, width, height, fps, **kwargs) as encoder:
        encoder.write(first)
        for frame in iterator:
            encoder.write(frame)
    return encoder.frames_written
