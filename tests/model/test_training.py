"""The trainer: data whose ground truth our extractor reads back, a loss that falls, bit-exact resume, the recipe
end to end through the CLI, and the committed demo weights."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flashportrait.model.components import (
    build_components,
    preset_weights_file,
    safetensors_metadata,
    sha256_file,
)
from flashportrait.model.pipeline_flashportrait import FlashPortraitPipeline, GenerationRequest
from flashportrait.model.presets import DEMO, TINY
from flashportrait.model.training.data import DataConfig, render_clip
from flashportrait.model.training.dit_stage import (
    DitStageConfig,
    TrainableParts,
    dit_loss_fn,
    precompute,
    prompt_table,
)
from flashportrait.model.training.identities import held_out_identities, pseudo_identity, training_identities
from flashportrait.model.training.loop import OptimConfig, TrainingRun, step_generator
from flashportrait.model.training.recipe import TrainConfig, load_config
from flashportrait.model.training.vae_stage import VaeStageConfig


DATA = DataConfig(identities=2, held_out=1, frames=13, size=64, fps=12.0)


@pytest.fixture(scope="module")
def clips():
    return [render_clip(pseudo_identity(i), 0, DATA) for i in (0, 3)]


def test_held_out_identities_are_never_training_identities():
    train = {identity.index for identity in training_identities(300)}
    held = {identity.index for identity in held_out_identities()}
    assert not train & held
    assert all(identity.held_out for identity in held_out_identities())
    assert pseudo_identity(5) == pseudo_identity(5)  # seeded: the same identity on every machine


def test_extractor_reads_the_generators_mouth():
    """The features the model is trained on follow the ground truth the frames were rendered from (at the demo's
    size; identities 0 and 3 have moving mouths in these 33 frames and no glasses)."""
    config = dataclasses.replace(DATA, frames=33, size=96)
    for identity in (0, 3):
        clip = render_clip(pseudo_identity(identity), 0, config)
        assert clip.feature_agreement() >= 0.9, f"identity {identity}: mouth r = {clip.feature_agreement():.3f}"


def _tiny_parts(clips):
    components = build_components(TINY)
    config = DitStageConfig(window=3)
    latent_clips = [precompute(components, clip, config) for clip in clips]
    parts = TrainableParts(components).requires_grad_(True)
    tau = TINY.portrait_encoder.tokens_per_frame
    return parts, latent_clips, prompt_table(components), config, tau


def test_a_few_steps_on_a_toy_batch_lower_the_loss(clips, tmp_path):
    parts, latent_clips, prompts, config, tau = _tiny_parts(clips)
    loss = dit_loss_fn(parts, latent_clips, prompts, config, batch=2, seed=0, tokens_per_frame=tau)

    def same_batch(step: int, generator: torch.Generator) -> torch.Tensor:
        return loss(0, step_generator(0, 0))  # one fixed batch, noise and timestep: overfitting it must work

    run = TrainingRun("dit", parts, same_batch, OptimConfig(steps=25, batch=2, lr=2e-3, warmup_steps=1), tmp_path)
    losses = run.run(show_progress=False)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    assert (tmp_path / "loss.csv").read_text().count("\n") == 26  # header + 25 steps
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_save_and_resume_continue_bit_identically(clips, tmp_path):
    def make_run(folder: Path) -> TrainingRun:
        parts, latent_clips, prompts, config, tau = _tiny_parts(clips)
        loss = dit_loss_fn(parts, latent_clips, prompts, config, batch=2, seed=3, tokens_per_frame=tau)
        return TrainingRun("dit", parts, loss, OptimConfig(steps=4, batch=2, lr=1e-3, checkpoint_every=2), folder)

    straight = make_run(tmp_path / "straight")
    straight.run(show_progress=False)
    first = make_run(tmp_path / "resumed")
    first.run(until=2, show_progress=False)
    second = make_run(tmp_path / "resumed")
    assert second.resume() and second.step == 2
    second.run(show_progress=False)
    for name, param in straight.params.items():
        assert torch.equal(param, second.params[name]), name
        assert torch.equal(straight.ema[name], second.ema[name]), name
    assert (tmp_path / "straight" / "loss.csv").read_text() == (tmp_path / "resumed" / "loss.csv").read_text()


def test_resume_refuses_a_checkpoint_of_another_model(clips, tmp_path):
    parts, latent_clips, prompts, config, tau = _tiny_parts(clips)
    folder = tmp_path / "run"
    folder.mkdir()
    other = torch.nn.Linear(2, 2)
    TrainingRun("other", other, lambda s, g: other.weight.sum(), OptimConfig(steps=1), folder).run(show_progress=False)
    run = TrainingRun("dit", parts, lambda s, g: torch.zeros(()), OptimConfig(steps=1), folder)
    with pytest.raises(ValueError, match="does not match the dit model"):
        run.resume()


def test_vae_phases_switch_to_long_clips_at_their_step():
    config = VaeStageConfig(clip_frames=9, crop=64, long_clips_from_step=100, long_clip_frames=17, long_crop=48)
    assert config.at_step(99) == (9, 64) and config.at_step(100) == (17, 48)
    assert VaeStageConfig().at_step(10**6) == (9, 64)  # one phase unless asked


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[vae]\ncrop = 60\n")
    with pytest.raises(ValueError, match=r"bad.toml: vae.crop must be a multiple of 8 \(got 60\)"):
        load_config(path)
    path.write_text("[dit.optim]\nstep = 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['step'\] in \[dit.optim\]"):
        load_config(path)


def test_learning_rate_warms_up_then_stays_or_decays_by_cosine():
    constant = OptimConfig(steps=1000, lr=1e-3, warmup_steps=100)
    assert constant.lr_at(0) == pytest.approx(1e-5) and constant.lr_at(100) == constant.lr_at(999) == 1e-3
    decayed = OptimConfig(steps=1000, lr=1e-3, warmup_steps=100, lr_final=1e-5)
    assert decayed.lr_at(100) == pytest.approx(1e-3)
    assert decayed.lr_at(550) == pytest.approx((1e-3 + 1e-5) / 2)  # halfway through the decay
    assert decayed.lr_at(1000) == pytest.approx(1e-5) and decayed.lr_at(5000) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="lr_final must be in"):
        OptimConfig(lr=1e-3, lr_final=1e-2)


def test_a_continuation_must_pin_the_weights_it_continues():
    with pytest.raises(ValueError, match="init_from = 'a.safetensors' needs init_sha256"):
        TrainConfig(init_from="a.safetensors")


@pytest.mark.slow
def test_recipe_end_to_end_through_the_cli(tmp_path):
    """Every stage of a toy recipe through `flashportrait train`, then the exported file renders through the preset
    loader; a second run of the same command resumes (nothing is redone)."""
    config = tmp_path / "toy.toml"
    config.write_text(
        f'preset = "tiny"\nout = "{tmp_path / "out"}"\nweights_out = "{tmp_path / "tiny.safetensors"}"\n'
        "threads = 1\n"
        "[data]\nidentities = 2\nheld_out = 1\nframes = 13\nsize = 64\nfps = 12.0\n"
        "[vae]\nclip_frames = 5\ncrop = 32\n[vae.optim]\nsteps = 2\nbatch = 1\ncheckpoint_every = 1\n"
        "[dit]\nwindow = 3\n[dit.optim]\nsteps = 2\nbatch = 1\ncheckpoint_every = 1\n"
    )
    cli = Path(sys.executable).with_name("flashportrait")
    stages = ["--stage", "data", "--stage", "vae", "--stage", "dit", "--stage", "export"]
    proc = subprocess.run([str(cli), "train", str(config), *stages], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["vae"]["finished"] and summary["dit"]["finished"]
    assert summary["export"]["sha256"] == sha256_file(tmp_path / "tiny.safetensors")
    tensors = load_file(str(tmp_path / "tiny.safetensors"))
    assert {k.split(".")[0] for k in tensors} == {"vae", "transformer", "portrait_encoder"}
    preset = dataclasses.replace(
        TINY, weights=str(tmp_path / "tiny.safetensors"), weights_sha256=summary["export"]["sha256"]
    )
    components = build_components(preset)
    assert torch.equal(components.transformer.proj_out.weight, tensors["transformer.proj_out.weight"])
    again = subprocess.run([str(cli), "train", str(config), *stages], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["dit"]["step"] == 2  # resumed at the end: no step was run twice
    assert json.loads(again.stdout)["export"]["sha256"] == summary["export"]["sha256"]  # byte-reproducible export

    # A continuation recipe: it starts from the export (digest pinned), reuses its VAE frozen, counts its steps on.
    first = tmp_path / "tiny.safetensors"
    continued = tmp_path / "continued.toml"
    continued.write_text(
        f'preset = "tiny"\nversion = "tiny-v2"\nout = "{tmp_path / "out2"}"\n'
        f'weights_out = "{tmp_path / "tiny-v2.safetensors"}"\ninit_from = "{first}"\n'
        f'init_sha256 = "{summary["export"]["sha256"]}"\nthreads = 1\n'
        "[data]\nidentities = 2\nheld_out = 1\nframes = 13\nsize = 64\nfps = 12.0\n"
        "[dit]\nwindow = 3\n[dit.optim]\nsteps = 1\nbatch = 1\ncheckpoint_every = 1\nlr = 1e-3\nlr_final = 0.0\n"
        "warmup_steps = 0\nema_decay = 0.0\n"
    )
    proc = subprocess.run([str(cli), "train", str(continued), *stages], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["vae"]["from"] == str(first)  # no VAE training
    second = load_file(str(tmp_path / "tiny-v2.safetensors"))
    assert all(torch.equal(second[k], v) for k, v in tensors.items() if k.startswith("vae."))
    meta = safetensors_metadata(tmp_path / "tiny-v2.safetensors")
    assert meta["version"] == "tiny-v2" and meta["dit_steps"] == "3"
    assert meta["continues"].endswith(summary["export"]["sha256"])
    moved = max((second[k] - tensors[k]).abs().max().item() for k in tensors if k.startswith("transformer."))
    assert 0 < moved < 0.05  # one small step from the first export's weights, not from the seeded initialisation


def test_the_committed_demo_weights_match_their_digest_and_render():
    path = preset_weights_file(DEMO)
    assert DEMO.weights_sha256 is not None, "the demo preset must pin its weights' SHA-256"
    assert sha256_file(path) == DEMO.weights_sha256
    assert path.stat().st_size <= 30 * 2**20
    pipeline = FlashPortraitPipeline(build_components(DEMO))
    clip = render_clip(held_out_identities(1)[0], 0, dataclasses.replace(DATA, size=96, frames=9))
    request = GenerationRequest(clip.reference, clip.features, num_inference_steps=2, seed=1)
    frames = pipeline(request).frames
    assert frames.shape == (8, 96, 96, 3)


def test_a_damaged_demo_weights_file_is_refused(tmp_path):
    damaged = tmp_path / "demo.safetensors"
    damaged.write_bytes(preset_weights_file(DEMO).read_bytes()[:-1] + b"\0")
    preset = dataclasses.replace(DEMO, weights=str(damaged))
    with pytest.raises(ValueError, match="the file is damaged or from another training run"):
        build_components(preset)
