"""Untrusted media is inspected in a sandboxed subprocess, against the limits, before anything decodes it here.

Pillow and libav (PyAV) are C code with a long CVE history in exactly the parsers user files reach; a crafted file
can crash, hang or exhaust memory. So probing (and the reference image's decode) runs in a child process
(``python -m flashportrait.infra.media_worker``) under ``RLIMIT_AS`` / ``RLIMIT_FSIZE`` / ``RLIMIT_CPU`` and a
wall-clock timeout; a crash or hang there fails that row with a clear reason and never the worker or the flow.
The checks (container allow-list, header dimensions, frame rate and duration sanity) are decided from headers, so
a decompression bomb or an 8K frame is refused before a single pixel is decoded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .limits import Limits
from .video_io import VideoInfo


logger = logging.getLogger(__name__)


class MediaRejected(ValueError):
    """The input file is unusable or outside the limits; the message names the field, the value and the fix."""


@dataclass(frozen=True)
class ImageInspection:
    width: int
    height: int
    format: str
    mode: str
    normalised: list[str]  # what was done to make it plain 8-bit RGB (e.g. "exif-rotated", "alpha flattened")


@dataclass(frozen=True)
class VideoInspection:
    width: int
    height: int
    fps: float
    num_frames: int
    duration: float
    container: str
    codec: str
    has_audio: bool
    rotation: int
    probe: dict  # the full VideoInfo from the sandboxed probe

    def video_info(self) -> VideoInfo:
        """The probe as ``video_io.VideoInfo``, so decoding need not probe the untrusted file again in-process."""
        return VideoInfo(**self.probe)


def inspect_image(
    path: str | Path, out_npy: str | Path, limits: Limits, *, field_name: str = "reference"
) -> tuple[np.ndarray, ImageInspection]:
    """Check the image's header against ``limits``, then decode it to 8-bit RGB — all in the sandbox."""
    result = _run_worker(["image", str(path), str(out_npy), json.dumps(asdict(limits))], limits, field_name)
    pixels = np.load(out_npy, allow_pickle=False)
    return pixels, ImageInspection(**result)


def inspect_video(path: str | Path, limits: Limits, *, field_name: str = "driving") -> VideoInspection:
    """Probe the video's container and stream headers in the sandbox and check them against ``limits``."""
    result = _run_worker(["video", str(path), json.dumps(asdict(limits))], limits, field_name)
    return VideoInspection(**result)


def output_fps(row_fps: float | None, source_fps: float, limits: Limits) -> float:
    """The rate a row renders at: its ``fps``, else the driving video's own rate — except that a source above
    ``max_fps`` (a 240 fps slow-motion clip) renders at the largest whole fraction of its rate within ``max_fps``
    (240 → 120, 1000 → 111.1), so the decoder keeps every k-th frame instead of refusing the row.

    Only the default moves: a row that asks for more than ``max_fps`` is still refused by the output-fps check.
    """
    if row_fps:
        return float(row_fps)
    if not source_fps > 0:
        raise MediaRejected(f"driving: no usable frame rate ({source_fps:g} fps); set the row's fps or re-encode it")
    if source_fps <= limits.max_fps:
        return float(source_fps)
    return source_fps / math.ceil(source_fps / limits.max_fps)


def sandbox_limits(limits: Limits) -> callable:
    """A ``preexec_fn`` applying the decode rlimits (also used for the ffmpeg decoder subprocess)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limits.decode_memory_bytes, limits.decode_memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.decode_file_bytes, limits.decode_file_bytes))
        cpu = int(limits.probe_timeout_s) + 5
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full scratch disk is an error to report, not a kill

    return apply


def _run_worker(args: list[str], limits: Limits, field_name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the sandbox needs no credentials
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "flashportrait.infra.media_worker", *args],
            capture_output=True,  # both pipes drained by communicate(): a chatty decoder cannot deadlock us
            timeout=limits.probe_timeout_s,
            preexec_fn=sandbox_limits(limits),
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise MediaRejected(
            f"{field_name}: inspecting the file took longer than probe_timeout_s ({limits.probe_timeout_s:g} s); "
            "the file is likely corrupt or crafted — re-encode it, or raise --probe-timeout-s"
        ) from None
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise MediaRejected(
            f"{field_name}: the media inspector crashed ({name}) on this file; it is corrupt, crafted or needs more "
            "than decode_memory_bytes — re-encode it (e.g. to H.264 MP4 / PNG)"
        )
    lines = [line for line in proc.stdout.decode(errors="replace").splitlines() if line.strip()]
    try:
        message = json.loads(lines[-1]) if lines else {}
    except ValueError:
        message = {}
    if proc.returncode != 0 or "error" in message:
        reason = message.get("error") or proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or "unknown"
        raise MediaRejected(f"{field_name}: {reason if isinstance(reason, str) else reason[0]}")
    return message["result"]
