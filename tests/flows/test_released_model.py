"""The released-model path end to end: `flashportrait render --base … --flashportrait …` on tiny checkpoint files
written in the official layouts (the real 14B files cannot be downloaded here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
from released_files import flashportrait_folder, official_transformer, original_layout_base


pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_render_with_released_files(tmp_path):
    official = official_transformer()
    base = original_layout_base(tmp_path / "Wan2.1-I2V-14B-720P", official)
    files = flashportrait_folder(tmp_path / "FlashPortrait", official)
    out = tmp_path / "clip.mp4"
    cli = Path(sys.executable).parent / "flashportrait"
    proc = subprocess.run(
        [
            str(cli),
            "render",
            "--reference",
            "examples/reference.png",
            "--driving",
            "examples/driving_short.mp4",
            "--out",
            str(out),
            "--base",
            str(base),
            "--flashportrait",
            str(files),
            "--dtype",
            "float32",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--alp",
            "off",
            "--extractor",
            "landmark",
        ],
        cwd=ROOT,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(container.streams.video[0])) == 16
    sidecar = json.loads((tmp_path / "clip.json").read_text())
    assert sidecar["model"]["base"] == str(base) and sidecar["model_preset"] == "flashportrait-14b"
    digests = sidecar["weights_sha256"]
    assert len(digests["transformer.pt"]) == 64 and "portrait_encoder.pt" in digests
    # released defaults: emotion CFG on (2 passes) over the one 5-latent-frame window, 2 steps
    assert sidecar["result"]["transformer_calls"] == 2 * 2


def test_half_a_model_source_is_a_usage_error(tmp_path):
    cli = Path(sys.executable).parent / "flashportrait"
    proc = subprocess.run(
        [str(cli), "batch", "examples/manifest.jsonl", "--out", str(tmp_path), "--base", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "give both --base" in proc.stderr
