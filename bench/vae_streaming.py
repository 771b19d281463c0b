"""Peak memory and time of the whole-video VAE decode against the streaming one, for 1- and 10-minute videos.

Why: the whole decode (``decode_latents``: diffusers' ``AutoencoderKLWan.decode``) concatenates every decoded frame
into one float32 tensor, so its memory grows with the video's length; ``iter_decode_latents`` yields chunks and
should hold the same memory for 10 minutes as for 1. This measures both at the tiny preset's size (64×64 frames,
8×8 latents) on random latents at 12 fps, cut to 4k+1 frames as the project cuts driving videos: 1 minute = 720 →
717 frames = 180 latent frames, 10 minutes = 7200 → 7197 frames = 1800 latent frames.

Every configuration runs in a fresh subprocess (one torch thread by default), so each peak RSS (the kernel's
high-water mark, ``ru_maxrss`` = VmHWM) is that decode's alone on top of the same start-up (imports, the tiny model,
the latents). The consumer hashes every frame as it arrives and drops it, as an encoder would; the 1-minute hashes
of both decodes are compared (they must be identical).

The whole 10-minute decode is slow on a CPU (diffusers' ``_decode`` re-concatenates the growing output after every
latent frame: quadratic copying, ≈ 320 GB by arithmetic) and big (≈ 350 MB of float32 frames, plus the
conversion's copies),
so it runs under a time limit; if it hits it, the output says so and gives the high-water mark it had reached
(a lower bound) and a linear extrapolation from the 1-minute whole decode.

    .venv/bin/python bench/vae_streaming.py                         # ≈ 3 min on a shared 2-core CPU
    .venv/bin/python bench/vae_streaming.py --whole-10min-timeout 0   # skip the whole 10-minute decode (reported)
    .venv/bin/python bench/vae_streaming.py --mmap-threshold 131072   # fixed glibc mmap threshold (see below)

Allocator note: with glibc's default (dynamic) mmap threshold, buffers of a few MB that torch frees stay in the
heap and count in RSS; the streaming decode's RSS then sits ≈ 100 MB above its start-up at this size, constant in
length. ``--mmap-threshold`` sets ``MALLOC_MMAP_THRESHOLD_`` in the children, so freed buffers go back to the
kernel and the peak shows what is live (≈ 22 MB over start-up at both lengths, measured here), at the cost of
mmap/munmap calls (the 10-minute stream took ≈ 2.5× as long here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


FPS = 12
LENGTHS = {"1min": 60, "10min": 600}  # seconds of video


def latent_frames_for(seconds: int, fps: int = FPS) -> int:
    """The largest 4k+1 frame count in the clip, as latent frames: (N − 1)/4 + 1."""
    return (seconds * fps - 1) // 4 + 1


def _proc_status_mb(pid: int | str, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB → MiB
    except (OSError, ValueError):
        return None
    return None


# Child: one decode ----------------------------------------------------------------------------------------------
def run_child(mode: str, num_latent_frames: int, chunk: int, threads: int) -> dict:
    import numpy as np
    import torch

    from flashportrait.model.components import build_components, decode_latents
    from flashportrait.model.presets import TINY
    from flashportrait.model.vae_streaming import iter_decode_latents

    torch.set_num_threads(threads)
    components = build_components(TINY)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, TINY.vae["z_dim"], num_latent_frames, 8, 8, generator=generator)  # [1, z, F, h, w]
    # Warm-up on 2 latent frames (oneDNN primitives, thread buffers), so both modes start from the same state.
    list(iter_decode_latents(components, latents[:, :, :2]))
    rss_before = _proc_status_mb("self", "VmRSS")
    digest = hashlib.sha256()
    frames = 0
    started = time.perf_counter()
    if mode == "whole":
        video = decode_latents(components, latents)  # [N, H, W, 3]
        for frame in video:
            digest.update(np.ascontiguousarray(frame).tobytes())
        frames = video.shape[0]
        del video
    else:
        for batch in iter_decode_latents(components, latents, chunk_latent_frames=chunk):  # [n, H, W, 3]
            for frame in batch:
                digest.update(frame.tobytes())
            frames += batch.shape[0]
            del batch
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB → MiB
    return {
        "frames": frames,
        "seconds": round(seconds, 2),
        "rss_before_decode_mb": round(rss_before, 1) if rss_before is not None else None,
        "peak_rss_mb": round(peak, 1),
        "peak_over_start_mb": round(peak - rss_before, 1) if rss_before is not None else None,
        "sha256": digest.hexdigest(),
    }


# Parent: one fresh subprocess per configuration ------------------------------------------------------------------
def measure(mode: str, length: str, chunk: int, threads: int, timeout: float, env: dict[str, str]) -> dict:
    """Run one configuration in a fresh interpreter, watching its VmHWM so a timed-out run still reports a bound."""
    num_latent_frames = latent_frames_for(LENGTHS[length])
    row = {"mode": mode, "length": length, "latent_frames": num_latent_frames}
    if mode == "chunked":
        row["chunk_latent_frames"] = chunk
    if timeout <= 0:
        return row | {"status": "skipped", "reason": "time limit 0 (--whole-10min-timeout 0)"}
    cmd = [sys.executable, __file__, "--child", mode, str(num_latent_frames), str(chunk), str(threads)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    hwm = 0.0
    while proc.poll() is None:
        hwm = max(hwm, _proc_status_mb(proc.pid, "VmHWM") or 0.0)
        if time.perf_counter() - started > timeout:
            proc.kill()
            proc.wait()
            return row | {
                "status": "timed out",
                "time_limit_s": timeout,
                "peak_rss_mb_at_kill": round(hwm, 1),
                "reason": "peak_rss_mb_at_kill is a lower bound: the decode was still running",
            }
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        return row | {"status": f"failed (exit {proc.returncode})", "stderr_tail": stderr[-2000:]}
    return row | {"status": "ok"} | json.loads(stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk", type=int, default=8, help="latent frames per streamed chunk")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is steadiest shared)")
    parser.add_argument("--timeout", type=float, default=300, help="time limit (s) for every other run")
    parser.add_argument(
        "--whole-10min-timeout", type=float, default=75, help="time limit (s) for the whole 10-minute decode; 0 skips"
    )
    parser.add_argument(
        "--mmap-threshold", type=int, default=None, help="MALLOC_MMAP_THRESHOLD_ (bytes) for the runs; default glibc's"
    )
    parser.add_argument("--child", nargs=4, metavar=("MODE", "F", "CHUNK", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, num_latent_frames, chunk, threads = args.child
        print(json.dumps(run_child(mode, int(num_latent_frames), int(chunk), int(threads))))
        return

    started = time.perf_counter()
    env = dict(os.environ)
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    runs = [
        measure("whole", "1min", args.chunk, args.threads, args.timeout, env),
        measure("chunked", "1min", args.chunk, args.threads, args.timeout, env),
        measure("chunked", "10min", args.chunk, args.threads, args.timeout, env),
        measure("whole", "10min", args.chunk, args.threads, args.whole_10min_timeout, env),
    ]
    by = {(r["mode"], r["length"]): r for r in runs}
    summary: dict = {}
    if all(by[("chunked", n)]["status"] == "ok" for n in LENGTHS):
        one, ten = by[("chunked", "1min")], by[("chunked", "10min")]
        summary["chunked_peak_rss_10min_over_1min"] = round(ten["peak_rss_mb"] / one["peak_rss_mb"], 3)
        summary["chunked_decode_growth_10min_over_1min_mb"] = round(
            ten["peak_over_start_mb"] - one["peak_over_start_mb"], 1
        )
    if by[("whole", "1min")]["status"] == "ok" and by[("chunked", "1min")]["status"] == "ok":
        summary["bit_identical_1min"] = by[("whole", "1min")]["sha256"] == by[("chunked", "1min")]["sha256"]
    whole_one, whole_ten = by[("whole", "1min")], by[("whole", "10min")]
    if whole_ten["status"] == "ok" and by[("chunked", "10min")]["status"] == "ok":
        summary["bit_identical_10min"] = whole_ten["sha256"] == by[("chunked", "10min")]["sha256"]
    elif whole_one["status"] == "ok":
        # The whole decode's extra memory is its float32 frames and conversion copies: linear in frames.
        scale = whole_ten["latent_frames"] / whole_one["latent_frames"]
        summary["whole_10min_peak_rss_mb_extrapolated"] = round(
            whole_one["rss_before_decode_mb"] + whole_one["peak_over_start_mb"] * scale, 1
        )
        summary["whole_10min_note"] = (
            f"whole 10-minute decode {whole_ten['status']}; extrapolated linearly from the 1-minute whole decode "
            f"(its peak over start × {whole_ten['latent_frames']}/{whole_one['latent_frames']})"
        )
    print(
        json.dumps(
            {
                "bench": "vae_streaming",
                "preset": "tiny (64×64 frames, 8×8×16 latents)",
                "fps": FPS,
                "torch_threads": args.threads,
                "malloc_mmap_threshold": args.mmap_threshold or "glibc default (dynamic)",
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), CPU only",
                "runs": runs,
                "summary": summary,
                "seconds_total": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
