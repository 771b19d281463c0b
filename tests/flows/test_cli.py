"""The installed `flashportrait` command, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest


pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "flashportrait"


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run([str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_render_produces_a_playable_mp4(tmp_path):
    out = tmp_path / "clip.mp4"
    proc = run(
        "render",
        "--reference",
        "examples/reference.png",
        "--driving",
        "examples/driving_short.mp4",
        "--out",
        str(out),
        "--steps",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "renders noise" not in proc.stderr  # the default is the trained demo preset, not the random tiny one
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert sum(1 for _ in container.decode(stream)) == 16
    sidecar = json.loads((tmp_path / "clip.json").read_text())
    assert sidecar["result"]["frames"] == 16 and sidecar["parameters"]["steps"] == 2


def test_help_documents_every_option():
    proc = run("batch", "--help")
    assert proc.returncode == 0
    for option in ("--out", "--workers", "--ray-address", "--preset", "--steps", "--extractor", "--crf"):
        assert option in proc.stdout


def test_unusable_arguments_exit_2(tmp_path):
    assert run("batch", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)).returncode == 2
    assert run("render", "--reference", "x.png").returncode == 2  # argparse: --driving/--out missing
    proc = run("batch", "examples/manifest.jsonl", "--out", str(tmp_path), "--workers", "-1")
    assert proc.returncode == 2 and "--workers: Input should be ≥ 0" in proc.stderr
    proc = run("render", "--reference", "x.png", "--driving", "y.mp4", "--out", "z.mp4", "--crf", "60")
    assert proc.returncode == 2 and "--crf: Input should be ≤ 51" in proc.stderr


def test_batch_exit_code_1_when_a_row_fails(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps(
            {
                "id": "ok",
                "reference": str(ROOT / "examples/reference.png"),
                "driving": str(ROOT / "examples/driving_short.mp4"),
            }
        )
        + "\n"
        + json.dumps({"id": "bad", "reference": str(ROOT / "examples/reference.png"), "driving": "missing.mp4"})
        + "\n"
    )
    proc = run(
        "batch",
        str(manifest),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "0",
        "--steps",
        "1",
        "--allow-local-root",
        str(ROOT / "examples"),
    )
    assert proc.returncode == 1, proc.stderr
    assert (tmp_path / "out" / "ok.mp4").exists() and not (tmp_path / "out" / "bad.mp4").exists()
    assert "failed] bad" in proc.stdout


def test_render_of_a_broken_input_exits_1_and_writes_nothing(tmp_path):
    bad = tmp_path / "not-a-video.mp4"
    bad.write_bytes(b"this is not a video")
    out = tmp_path / "clip.mp4"
    proc = run("render", "--reference", "examples/reference.png", "--driving", str(bad), "--out", str(out))
    assert proc.returncode == 1 and "render failed" in proc.stderr
    assert not out.exists() and not (tmp_path / "clip.json").exists()
