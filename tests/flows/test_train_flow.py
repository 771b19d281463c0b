"""The `train` Prefect flow runs a recipe's stages on a Ray worker and records the summary."""

from __future__ import annotations

import pytest

from flashportrait.flows.training import train


pytestmark = pytest.mark.slow


def test_train_flow_runs_the_stages_on_a_ray_worker(tmp_path, ray_cluster, prefect_harness):
    config = tmp_path / "toy.toml"
    config.write_text(
        f'preset = "tiny"\nout = "{tmp_path / "out"}"\nthreads = 1\n'
        "[data]\nidentities = 2\nheld_out = 1\nframes = 13\nsize = 64\nfps = 12.0\n"
        "[vae]\nclip_frames = 5\ncrop = 32\n[vae.optim]\nsteps = 2\nbatch = 1\ncheckpoint_every = 1\n"
    )
    summary = train(str(config), stages=["data", "vae"], ray_address=ray_cluster)
    assert summary["data"]["train_clips"] == 2
    assert summary["vae"]["finished"] and summary["vae"]["step"] == 2
    assert sorted(p.name for p in (tmp_path / "out" / "vae").glob("checkpoint-*")) == [
        "checkpoint-0000001.safetensors",
        "checkpoint-0000002.safetensors",
    ]


def test_train_flow_refuses_an_unknown_stage(tmp_path, prefect_harness):
    with pytest.raises(ValueError, match=r"unknown training stage\(s\) \['fit'\]"):
        train(str(tmp_path / "x.toml"), stages=["fit"])
