"""ffmpeg-python (ffmpeg child process, our infra/video_io.py) against PyAV (in-process libav) on the same work.

Decode an H.264 clip to RGB numpy frames, encode RGB frames to H.264 yuv420p (same CRF and preset), probe a file.
Frames are the landmark-warped astronaut (flashportrait.testing), so the content is a real face, not noise. The
median of ``--repeats`` runs is printed as JSON, with the decision it supports.

    .venv/bin/python bench/video_io.py [--frames 200] [--size 512] [--repeats 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import numpy as np

from flashportrait.infra import video_io
from flashportrait.testing import expression_curves, iter_warped_frames


FPS = 25
CRF = 18


def _median(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _pyav_encode(path: Path, frames: list[np.ndarray], preset: str) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"crf": str(CRF), "preset": preset})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def _pyav_decode(path: Path) -> int:
    count = 0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frame.to_ndarray(format="rgb24")
            count += 1
    return count


def _pyav_probe(path: Path) -> Fraction:
    with av.open(str(path)) as container:
        return container.streams.video[0].average_rate


def run(frames_count: int, size: int, repeats: int) -> dict[str, object]:
    frames = list(iter_warped_frames(expression_curves(frames_count, seed=1, fps=FPS), size))
    with tempfile.TemporaryDirectory() as scratch:
        clip = Path(scratch) / "clip.mp4"
        video_io.encode_video(clip, frames, FPS, crf=CRF)
        results: dict[str, float] = {}
        for preset in ("medium", "veryfast"):
            out = Path(scratch) / f"out-{preset}.mp4"
            ours = partial(video_io.encode_video, out, frames, FPS, crf=CRF, preset=preset)
            results[f"encode_{preset}_ffmpeg_python_s"] = _median(ours, repeats)
            results[f"encode_{preset}_pyav_s"] = _median(partial(_pyav_encode, out, frames, preset), repeats)
        results["decode_ffmpeg_python_s"] = _median(lambda: sum(1 for _ in video_io.iter_frames(clip)), repeats)
        results["decode_pyav_s"] = _median(lambda: _pyav_decode(clip), repeats)
        results["probe_pyav_ms"] = 1e3 * _median(lambda: _pyav_probe(clip), repeats * 5)
        results["probe_video_io_ms"] = 1e3 * _median(lambda: video_io.probe_video(clip), repeats * 5)
    return {
        "benchmark": "video I/O: ffmpeg-python child process vs PyAV in-process",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs (shared), no GPU",
        "frames": frames_count,
        "size": f"{size}x{size}",
        "crf": CRF,
        **{name: round(value, 3) for name, value in results.items()},
        "kept": (
            "ffmpeg-python for decode and encode (a crash on hostile media kills the child, not the worker; the "
            "fps/scale/audio filter graphs are ffmpeg's own), PyAV for probing (no ffprobe in the imageio binary)"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    result = json.dumps(run(args.frames, args.size, args.repeats), indent=2)
    print(result)
    if args.out:
        args.out.write_text(result + "\n")


if __name__ == "__main__":
    main()
