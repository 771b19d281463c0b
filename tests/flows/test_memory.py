"""Peak memory of a render does not grow with the video's length (a bounded check, not a timing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[2] / "bench" / "memory.py"


def test_peak_rss_flat_from_10_to_60_seconds():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--seconds", "10", "60", "--steps", "1"])
    short, long = report["runs"]
    assert long["frames"] > 5 * short["frames"]  # 6× the video: 10 s → 116 frames, 60 s → 716
    # Holding the 60-s video's decoded frames alone would add 716·64·64·3 B ≈ 8.8 MB uint8 (35 MB as float32 on
    # the way); what may grow is the latents and per-frame features (≈ 2.2 KB per driving frame) — a few MB.
    assert long["peak_rss_mb"] <= 1.05 * short["peak_rss_mb"], report
