"""Video in and out as streams of HxWx3 uint8 RGB frames, so no step ever holds a whole video in memory.

ffmpeg (the static binary shipped in the imageio-ffmpeg wheel, graphs built with ffmpeg-python) runs in a child
process: a crash on hostile or corrupt media kills the child, not the worker. PyAV is used only for probing, because
that binary comes without ``ffprobe`` (bench/video_io.py measured PyAV's in-process decode and encode at about the
same speed as the child process, so the isolation costs nothing). Two rules keep the pipes from hanging: ffmpeg's
stderr is always drained by a thread (an unread stderr pipe fills up and blocks ffmpeg), and a consumer that stops
early kills the decoder.

What real files bring, and what happens to it:

- variable frame rate (phones): always resampled to a constant rate by ffmpeg's ``fps`` filter — the requested
  fps, or the stream's average rate — so decoded frame k is the picture shown at time k / fps after the first;
- rotation metadata (portrait phone video): applied by ffmpeg's autorotate; probed sizes are the displayed ones;
- odd sizes, 10-bit and 4:4:4 inputs: converted to 8-bit RGB by ffmpeg, with the colour matrix of the stream's tags;
- audio-only files and cover art (an "attached picture" video stream in an m4a/mp3): rejected, naming what was found.

Encoding writes H.264 yuv420p (even dimensions) tagged BT.709 TV range — what players assume for HD video, so an
untagged BT.601 file would shift its colours — with the index up front (faststart). With an audio source, its audio
is muxed in a second pass that copies the video and knows the final frame count, so the audio is cut (or padded
with silence) to exactly the video's length and starts ``audio_offset`` seconds after the source's first video
frame; a one-pass ``-shortest`` overshoots by up to ~0.4 s (measured here).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
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
# Decoding also tags each line with its level, so a decoder error ffmpeg conceals (it exits 0 and outputs every frame,
# smearing the damaged blocks) can be told apart and counted.
_DECODE_LOG = ("-hide_banner", "-nostdin", "-loglevel", "level+error")
_ERROR_LINE = re.compile(r"\[(error|fatal|panic)\]")
# BT.709, TV range: the conversion and the tags of every file we write.
_BT709 = {"colorspace": "bt709", "color_primaries": "bt709", "color_trc": "bt709", "color_range": "tv"}


# Containers (libav demuxer names) a driving video may use; playlists, concat scripts, image sequences, lavfi and
# every network demuxer are refused whatever the file is called.
ALLOWED_CONTAINERS = frozenset({"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "mpegts", "avi"})


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
    """What a video file holds. ``width``/``height`` are the *displayed* size (rotation applied), like the frames.

    ``fps`` is the average rate (frames / duration), the rate a variable-rate video is normalised to by default;
    ``stream_index`` is the container's index of the video stream used (cover art skipped); ``start_time`` is
    that stream's first timestamp in seconds (audio is aligned to it).
    """

    width: int
    height: int
    fps: float
    num_frames: int | None
    duration: float | None
    has_audio: bool
    codec: str
    rotation: int = 0
    pix_fmt: str = ""
    stream_index: int = 0
    start_time: float = 0.0


def probe_video(path: str | Path) -> VideoInfo:
    """Probe ``path`` with PyAV; ``ValueError`` (naming the file and what it holds) if it has no decodable video."""
    try:
        container = av.open(str(path))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"Video {path} does not exist.") from error
    except av.FFmpegError as error:
        raise ValueError(f"{path} is not a readable video ({error}); check that it is a complete video.") from error
    with container:
        stream = _video_stream(container, path)
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
            pix_fmt=stream.codec_context.pix_fmt or "",
            stream_index=stream.index,
            start_time=_start_time(stream),
        )


def _video_stream(container: Any, path: str | Path) -> Any:
    """The first real video stream: an "attached picture" (cover art in an m4a/mp3) is one still image, not video."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    found = ", ".join(_describe(s) for s in container.streams) or "no streams"
    raise ValueError(f"{path} has no video stream (found: {found}); a driving video is required.")


def _describe(stream: Any) -> str:
    cover = stream.type == "video" and stream.disposition & av.stream.Disposition.attached_pic
    return f"{stream.type}/{stream.codec_context.name}" + (" cover art" if cover else "")


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


def _start_time(stream: Any) -> float:
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


@dataclass(frozen=True)
class _AudioPlan:
    """Which audio stream of a source to mux, and from which second of it (negative: the audio starts late)."""

    index: int
    start: float


def _audio_plan(source: str | Path, offset: float) -> _AudioPlan | None:
    """Where the output's audio comes from: ``offset`` s after the source's first video frame (or its start)."""
    try:
        with av.open(str(source)) as container:
            if not container.streams.audio:
                return None
            audio = container.streams.audio[0]
            videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
            video_start = _start_time(videos[0]) if videos else _start_time(audio)
            return _AudioPlan(audio.index, video_start - _start_time(audio) + offset)
    except (FileNotFoundError, av.FFmpegError) as error:
        raise ValueError(f"Audio source {source} cannot be opened ({error}); pass a readable media file.") from error


# ---- ffmpeg child processes ---------------------------------------------------------------------------------------


class _StderrTail:
    """Drains a child's stderr on a thread (so ffmpeg never blocks on a full pipe) and keeps the last lines."""

    def __init__(self, pipe: IO[bytes], keep: int = 40) -> None:
        self._lines: deque[str] = deque(maxlen=keep)
        self.errors = 0  # lines tagged [error]/[fatal]/[panic] (only with ``-loglevel level+…``)
        self.first_error = ""
        self._thread = threading.Thread(target=self._drain, args=(pipe,), name="ffmpeg-stderr", daemon=True)
        self._thread.start()

    def _drain(self, pipe: IO[bytes]) -> None:
        with pipe:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip()
                self._lines.append(line)
                if _ERROR_LINE.search(line):
                    self.first_error = self.first_error or line
                    self.errors += 1

    def wait(self) -> None:
        """Until ffmpeg closed stderr (call after it exited): every line has been read and counted."""
        self._thread.join(timeout=10)

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "\n".join(self._lines) or "(ffmpeg printed nothing)"


def _spawn(
    args: list[str], *, stdin: int, stdout: int, preexec_fn: Callable[[], None] | None = None
) -> tuple[subprocess.Popen[bytes], _StderrTail]:
    logger.debug("running %s", " ".join(args))
    process = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
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


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down (never up) so the longer side is at most ``max_side``, aspect kept, sides even."""
    if max_side < 2:
        raise ValueError(f"max_side must be at least 2 px, got {max_side}.")
    scale = min(1.0, max_side / max(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def iter_frames(
    path: str | Path,
    *,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_side: int | None = None,
    max_frames: int | None = None,
    info: VideoInfo | None = None,
    preexec_fn: Callable[[], None] | None = None,
    lenient: DecodeReport | None = None,
) -> Iterator[np.ndarray]:
    """Decode ``path`` frame by frame as HxWx3 uint8 RGB frames, at a constant frame rate.

    ``fps`` is the output rate (default: the stream's average rate): ffmpeg's fps filter drops or repeats frames so
    frame k shows what the source shows at k / fps, also for variable-rate sources. ``size`` = (width, height)
    scales to exactly that size; ``max_side`` instead only shrinks, keeping the aspect ratio (:func:`fit_within`).
    Only one frame is in memory at a time; stopping the iteration early kills ffmpeg. ``info`` skips the probe
    (pass what a sandboxed probe returned for untrusted files); ``preexec_fn`` runs in the ffmpeg child before exec
    (resource limits). Only the demuxers in ``ALLOWED_CONTAINERS`` and the ``file`` protocol are enabled.

    Fail closed: at the end of the stream, a truncated file, or any error the decoder reported (corrupt packets,
    which ffmpeg conceals and exits 0 on), raises :class:`FFmpegError`. With ``lenient`` the frames are kept and
    the report records what was dropped and concealed.
    """
    info = info or probe_video(path)
    if size is not None and max_side is not None:
        raise ValueError(f"pass size or max_side for {path}, not both.")
    if max_side is not None:
        size = fit_within(info.width, info.height, max_side)
    width, height = size or (info.width, info.height)
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive (width, height), got {size} for {path}.")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames} for {path}.")
    rate = fps or info.fps
    args = _decode_graph(path, info.stream_index, rate, size, max_frames).compile(cmd=ffmpeg_executable())
    process, stderr = _spawn(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, preexec_fn=preexec_fn)
    assert process.stdout is not None
    frame_bytes = width * height * 3
    try:
        count = 0
        while max_frames is None or count < max_frames:
            buffer = _read_frame(process.stdout, frame_bytes)
            if len(buffer) < frame_bytes:  # end of the stream (empty) or, if ffmpeg broke off, inside a frame
                expected = _expected_frames(info, rate)
                problems = []
                try:
                    _check_decoder_exit(process, stderr, path, complete=not buffer)
                    _check_frame_count(count, expected, stderr, path)
                except FFmpegError as error:
                    if lenient is None:
                        raise  # fail closed: a damaged file is an error unless the caller opted into leniency
                    problems.append(str(error).splitlines()[0])
                stderr.wait()
                if stderr.errors:
                    if lenient is None:
                        raise FFmpegError(_damage_message(path, stderr))
                    problems.append(f"the decoder concealed {stderr.errors} error(s), first: {stderr.first_error}")
                if lenient is not None and problems:
                    lenient.record(count, expected, "; ".join(problems), decoder_errors=stderr.errors)
                    logger.warning("lenient decode of %s: kept %d frame(s): %s", path, count, lenient.problem)
                return
            yield np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3)
            count += 1
    finally:
        _stop(process)  # a consumer that stopped early (or max_frames reached) leaves ffmpeg running: kill it
        process.stdout.close()


def _decode_graph(
    path: str | Path, stream_index: int, fps: float, size: tuple[int, int] | None, max_frames: int | None
) -> Any:
    # Demuxer and protocol allow-lists: a playlist or concat script named .mp4 cannot make ffmpeg open anything else.
    video = ffmpeg.input(str(path), protocol_whitelist="file", format_whitelist=",".join(sorted(ALLOWED_CONTAINERS)))[
        str(stream_index)
    ]
    video = video.filter("fps", fps=_rate(fps))  # constant rate, whatever the source's timestamps
    if size is not None:
        video = video.filter("scale", size[0], size[1])
    # passthrough: the fps filter's frames exactly once (its output is already constant-rate).
    options: dict[str, Any] = {"format": "rawvideo", "pix_fmt": "rgb24", "fps_mode": "passthrough"}
    if max_frames is not None:
        options["frames:v"] = max_frames
    return ffmpeg.output(video, "pipe:", **options).global_args(*_DECODE_LOG)


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


@dataclass
class DecodeReport:
    """Filled by a lenient decode (``iter_frames(lenient=report)``): what was kept and what was dropped, for the
    sidecar. Without it, a truncated or damaged file raises instead (fail closed)."""

    damaged: bool = False
    frames_kept: int = 0
    frames_expected: float | None = None
    problem: str = ""
    decoder_errors: int = 0  # errors the decoder reported and concealed (corrupt packets)

    def record(self, kept: int, expected: float | None, problem: str, *, decoder_errors: int = 0) -> None:
        self.damaged, self.frames_kept, self.frames_expected, self.problem = True, kept, expected, problem
        self.decoder_errors = decoder_errors

    @property
    def frames_dropped(self) -> int:
        return max(0, round(self.frames_expected or 0) - self.frames_kept) if self.damaged else 0


def _check_decoder_exit(
    process: subprocess.Popen[bytes], stderr: _StderrTail, path: str | Path, *, complete: bool
) -> None:
    returncode = process.wait()
    if returncode != 0:
        raise FFmpegError(f"ffmpeg failed decoding {path} (exit code {returncode}):\n{stderr.text()}")
    if not complete:
        raise FFmpegError(f"ffmpeg's output for {path} ended inside a frame:\n{stderr.text()}")


def _damage_message(path: str | Path, stderr: _StderrTail) -> str:
    return (
        f"{path}: the decoder reported {stderr.errors} error(s), first: {stderr.first_error.strip()}. The file is "
        "damaged (corrupt packets), which ffmpeg hides by smearing or repeating picture parts; re-upload or "
        f"re-encode it, or set --lenient-decode to render it anyway and record what was concealed.\n{stderr.text()}"
    )


def _expected_frames(info: VideoInfo, fps: float) -> float | None:
    if info.duration is None:
        return float(info.num_frames) if info.num_frames and fps == info.fps else None
    return info.duration * fps


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
    """Streaming H.264 (yuv420p, BT.709, +faststart) encoder fed frame by frame through ffmpeg's stdin.

    Use it as a context manager: on an exception in the block ffmpeg is killed and the partial files deleted; on
    normal exit the stream is finished and ffmpeg's exit code checked. ``crf`` (0-51, lower = better) and ``preset``
    (x264's speed/size trade-off, ``ultrafast`` … ``veryslow``) are x264's. With ``audio_source``, its first audio
    track (if it has one) is muxed as AAC: from ``audio_offset`` seconds after the source's first video frame, cut
    or padded with silence to exactly the video's duration. The frames go to a video-only file next to ``path``
    first; ``close`` then copies that video and adds the audio into ``path``.
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
        audio_offset: float = 0.0,
        audio_bitrate: str = "128k",
    ) -> None:
        if width < 2 or height < 2 or width % 2 or height % 2:
            raise ValueError(
                f"H.264 yuv420p needs even dimensions, got {width}x{height} for {path}; "
                f"crop or resize to {width - width % 2}x{height - height % 2}."
            )
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51 (x264's quality scale; 18 is visually lossless), got {crf}.")
        if audio_offset < 0:
            raise ValueError(f"audio_offset must be >= 0 s (seconds into {audio_source}), got {audio_offset}.")
        self.path = Path(path)
        self.width = width
        self.height = height
        self.fps = Fraction(_rate(fps))
        self.frames_written = 0
        self._closed = False
        self._audio_bitrate = audio_bitrate
        self._audio = _audio_plan(audio_source, audio_offset) if audio_source is not None else None
        self._audio_source = audio_source
        if audio_source is not None and self._audio is None:
            logger.info("%s has no audio track; %s will be silent", audio_source, self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # With audio, the video goes to a side file first: only close() knows the length the audio must have.
        self._video_path = self.path.with_name(f".{self.path.name}.video.mp4") if self._audio else self.path
        graph = self._graph(crf, preset)
        self._process, self._stderr = _spawn(
            graph.compile(cmd=ffmpeg_executable()), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
        )

    def _graph(self, crf: int, preset: str) -> Any:
        frames = ffmpeg.input(
            "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{self.width}x{self.height}", framerate=str(self.fps)
        )
        # Convert with the BT.709 matrix into TV range ourselves, so the tags below describe the pixels.
        video = frames["v"].filter("scale", out_color_matrix="bt709", out_range="tv").filter("format", "yuv420p")
        options = {"vcodec": "libx264", "pix_fmt": "yuv420p", "crf": crf, "preset": preset, **_BT709}
        if self._video_path == self.path:
            options["movflags"] = "+faststart"
        return ffmpeg.output(video, str(self._video_path), **options).overwrite_output().global_args(*_QUIET)

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
        """Finish the file: end the stream, wait for ffmpeg, mux the audio; raise (deleting all files) on failure."""
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
        if self._audio is not None:
            self._mux_audio(self._audio)
        self._closed = True
        logger.debug("encoded %d frames to %s", self.frames_written, self.path)

    def _mux_audio(self, audio: _AudioPlan) -> None:
        """Copy the video and add the audio, trimmed (atrim) and padded (apad) to exactly N / fps seconds."""
        duration = f"{float(self.frames_written / self.fps):.6f}"
        sound = ffmpeg.input(str(self._audio_source), protocol_whitelist="file")[str(audio.index)]
        sound = sound.filter("asetpts", "PTS-STARTPTS")  # the track's first sample is t = 0
        if audio.start > 0:
            sound = sound.filter("atrim", start=f"{audio.start:.6f}").filter("asetpts", "PTS-STARTPTS")
        elif audio.start < 0:  # the audio begins after the first video frame: delay it
            sound = sound.filter("adelay", delays=f"{-audio.start * 1000:.3f}", all=1)
        sound = sound.filter("apad", whole_dur=duration).filter("atrim", duration=duration)
        video = ffmpeg.input(str(self._video_path))["v:0"]
        graph = ffmpeg.output(
            video,
            sound,
            str(self.path),
            vcodec="copy",
            acodec="aac",
            audio_bitrate=self._audio_bitrate,
            movflags="+faststart",
        )
        args = graph.overwrite_output().global_args(*_QUIET).compile(cmd=ffmpeg_executable())
        process, stderr = _spawn(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        returncode = process.wait()
        self._video_path.unlink(missing_ok=True)
        if returncode != 0:
            self._closed = True
            self.path.unlink(missing_ok=True)
            raise FFmpegError(
                f"ffmpeg failed muxing the audio of {self._audio_source} into {self.path} "
                f"(exit code {returncode}):\n{stderr.text()}"
            )

    def abort(self) -> None:
        """Kill ffmpeg and delete the partial files: a half-written video must never be mistaken for a result."""
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
        self._video_path.unlink(missing_ok=True)
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
    """Encode ``frames`` (size taken from the first) to ``path``; returns the number of frames written.

    ``kwargs`` go to :class:`VideoEncoder` (``crf``, ``preset``, ``audio_source``, ``audio_offset``, …).
    """
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
