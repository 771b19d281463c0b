"""Peak memory of one render as the video gets longer: it must stay flat (goal: 10 min ≤ 1.1 × 1 min).

Run: .venv/bin/python bench/memory.py [--seconds 60 600] [--steps 2]

Each length renders in a fresh subprocess through the whole job path (fetch, sandboxed probe, streamed decode of
the driving video, expression features, windows, streamed VAE decode, streamed encode, publish) on a preset (``tiny``
unless ``--preset`` names another), in-process (no Ray), and reports the child's peak RSS (VmHWM). The driving video
is ffmpeg's test pattern at 64×64, 12 fps, and the extractor is ``pixel`` (the pattern has no face for ``landmark`` to
track).
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from flashportrait.flows.manifest import Job
from flashportrait.flows.publishing import JobOutputs
from flashportrait.flows.render import open_backend, render_job
from flashportrait.flows.settings import RenderSettings
job = Job(id="memory", reference=sys.argv[1], driving=sys.argv[2], steps=int(sys.argv[4]), line=1)
settings = RenderSettings(workers=0, extractor="pixel", encoder_preset="veryfast", preset=sys.argv[5],
                          limits={"max_duration_s": 7200.0, "max_frames": 200000})
started = time.perf_counter()
with open_backend(settings) as backend:
    result = render_job(job, JobOutputs(sys.argv[3] + "/memory.mp4", sys.argv[3] + "/memory.json"), backend, settings)
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"frames": result.frames, "windows": result.windows, "seconds": time.perf_counter() - started,
                  "seconds_denoising": result.seconds_denoising, "seconds_decoding": result.seconds_decoding,
                  "peak_rss_mb": peak_kb / 1024}))
"""


def driving_video(path: Path, seconds: float, fps: float = 12.0) -> Path:
    from flashportrait.infra.video_io import ffmpeg_executable

    subprocess.run(
        [
            ffmpeg_executable(),
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"testsrc2=size=64x64:rate={fps:g}",
            "-t",
            f"{seconds:g}",
            "-pix_fmt",
            "yuv420p",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            str(path),
        ],
        check=True,
    )
    return path


def measure(seconds: float, steps: int, workdir: Path, preset: str = "tiny") -> dict:
    video = driving_video(workdir / f"driving-{seconds:g}s.mp4", seconds)
    out = workdir / f"out-{seconds:g}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(ROOT / "examples" / "reference.png"),
            str(video),
            str(out),
            str(steps),
            preset,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"render of {seconds:g} s failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(video_seconds=seconds, wall_s=time.perf_counter() - started)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[60.0, 600.0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--preset", default="tiny", help="model preset to render with (default: tiny)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fp-memory-") as tmp:
        runs = [measure(s, args.steps, Path(tmp), args.preset) for s in args.seconds]
    report = {
        "machine": f"{os.cpu_count()} CPU cores, no GPU; {args.preset} preset, 12 fps 64x64 driver, pixel extractor, "
        "in-process",
        "runs": runs,
        "peak_ratio_longest_to_shortest": runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"],
        "goal": "longest ≤ 1.1 × shortest",
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
