"""Parity with the official FlashPortrait implementation (commit c72d9de), on the recorded fixture.

tests/fixtures/parity/ holds tiny random weights in the official layouts and what the official modules computed from
them (README.md there says how). Here our loaders read those files and our code must reproduce every recorded
output: the transformer forward at ip_scale 1 and 0 (and with the negative prompt), the portrait-encoder tokens, the
per-latent-frame split, the window lists, a 2-step sampling run with text + emotion CFG and overlap blending, and
the base Wan2.1 text/image encoders and VAE read from Wan's original files. fp32 throughout; tolerance 1e-4.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flashportrait.model.checkpoints import load_flashportrait_transformer, load_portrait_encoder
from flashportrait.model.components import FlashPortraitComponents, build_components
from flashportrait.model.loading import BaseLayout, load_image_encoder, load_text_encoder, load_vae
from flashportrait.model.portrait_encoder import split_expression_tokens
from flashportrait.model.presets import TINY
from flashportrait.model.sampling import (
    JobConditioningInputs,
    SamplingConfig,
    WindowDenoiser,
    grid_for,
    step_windows,
)
from flashportrait.model.windows import blend_sequential_official, plan_windows


FIXTURE = Path(__file__).parents[1] / "fixtures" / "parity"
TOL = 1e-4
TEXT_LEN = 512


@pytest.fixture(scope="module")
def recorded() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "parity.safetensors")


@pytest.fixture(scope="module")
def transformer():
    return load_flashportrait_transformer(FIXTURE / "transformer.pt", dtype=torch.float32)


@pytest.fixture(scope="module")
def portrait_encoder():
    return load_portrait_encoder(FIXTURE / "portrait_encoder.pt")


def padded_context(embeds: torch.Tensor) -> torch.Tensor:
    """The official transformer zero-pads the T5 output to text_len; our encode_prompt zeroes past the prompt."""
    context = torch.zeros(1, TEXT_LEN, embeds.shape[-1])
    context[0, : embeds.shape[0]] = embeds
    return context


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize(
    ("name", "ip_scale", "negative"), [("posi", 1.0, False), ("noemo", 0.0, False), ("neg", 0.0, True)]
)
def test_transformer_forward_matches_official(recorded, transformer, name, ip_scale, negative):
    context = padded_context(recorded["negative_embeds" if negative else "prompt_embeds"])
    hidden = torch.cat([recorded[f"forward.{name}.x"], recorded["y"]], dim=1)  # [1, 36, F, h, w]
    with torch.no_grad():
        out = transformer(
            hidden,
            recorded[f"forward.{name}.t"],
            context,
            recorded["clip_context"],
            expression_tokens=recorded["window0.groups"],
            ip_scale=ip_scale,
            return_dict=False,
        )[0]
    assert max_error(out, recorded[f"forward.{name}.out"]) < TOL


def test_expression_branch_changes_the_output(recorded):
    # Guards the fixture itself: ip_scale 1 and 0 must differ, or the two forward checks above test one thing.
    assert max_error(recorded["forward.posi.out"], recorded["forward.noemo.out"]) > 1e-2


@pytest.mark.parametrize("window", [0, 1, 2])
def test_portrait_tokens_and_split_match_official(recorded, portrait_encoder, window):
    features = recorded[f"window{window}.features"]
    with torch.no_grad():
        tokens = portrait_encoder(features)
    assert max_error(tokens, recorded[f"window{window}.tokens"]) < TOL
    tau = portrait_encoder.config.tokens_per_frame
    # The split is pure indexing: on the official tokens it must give the official groups bit for bit.
    groups = split_expression_tokens(recorded[f"window{window}.tokens"], features.shape[1], tau)
    assert torch.equal(groups, recorded[f"window{window}.groups"])
    # Official context lens: τ for latent 0 (then 3τ+1 zero rows), 4τ+1 afterwards; the rows beyond are zeros.
    lens = recorded[f"window{window}.context_lens"].tolist()
    assert lens == [tau] + [4 * tau + 1] * (groups.shape[1] - 1)
    assert not groups[0, 0, tau:].any()


def test_window_lists_match_official_exactly():
    for case in json.loads((FIXTURE / "windows.json").read_text()):
        plan = plan_windows(case["num_latent_frames"], case["context_size"], case["overlap"])
        ours = [list(range(w.start, w.stop)) for w in plan.windows]
        assert ours == case["windows"], case


class RecordedDenoiser(WindowDenoiser):
    """The real CFG + Euler code, conditioned with the recorded text/image/I2V inputs instead of our encoders' (the
    tiny preset's random T5/CLIP/VAE run once in ``__init__`` and their outputs are replaced)."""

    def __init__(self, components, inputs, windows, context, negative_context, image_context, condition):
        super().__init__(components, inputs, windows)
        self.context = context
        self.negative_context = negative_context
        self.image_context = image_context
        self._condition_by_length = {condition.shape[2]: condition}


def test_two_sampling_steps_with_text_and_emotion_cfg_and_blending_match_official(
    recorded, transformer, portrait_encoder
):
    tiny = build_components(TINY)
    preset = dataclasses.replace(TINY, portrait_encoder=portrait_encoder.config, dtype="float32")
    components = FlashPortraitComponents(
        preset, transformer, tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.image_encoder, portrait_encoder
    )
    sampling = SamplingConfig(num_inference_steps=2, shift=5.0, emo_cfg_scale=4.0, text_cfg_scale=2.5, ip_scale=1.0)
    assert sampling.streams == ("cond", "no_expression", "negative")  # the official 3-pass branch
    noise = recorded["noise"]
    plan = plan_windows(noise.shape[2], 5, 2)
    inputs = JobConditioningInputs(
        reference=np.zeros((32, 32, 3), np.uint8),
        expression_features=recorded["features"][0].numpy(),
        prompt="",
        negative_prompt="",
        sampling=sampling,
    )
    denoiser = RecordedDenoiser(
        components,
        inputs,
        plan.windows,
        padded_context(recorded["prompt_embeds"]),
        padded_context(recorded["negative_embeds"]),
        recorded["clip_context"],
        recorded["y"],
    )
    grid = grid_for(sampling)
    assert torch.allclose(grid.timesteps, recorded["timesteps"])
    latents = noise
    for step in range(sampling.num_inference_steps):
        slices = {w.index: latents[:, :, w.start : w.stop] for w in plan.windows}
        stepped = step_windows(denoiser, slices, grid, step)
        latents = blend_sequential_official(plan, stepped, blend=step > 0)
    assert denoiser.transformer_calls == 2 * 3 * 3  # steps × windows × passes, as recorded
    assert max_error(latents, recorded["final_latents"]) < TOL


# Base Wan2.1 components from Wan's original single files ----------------------------------------------------------
@pytest.fixture(scope="module")
def original_layout() -> BaseLayout:
    return BaseLayout("original", FIXTURE / "wan_original", (), {})


@pytest.fixture(scope="module")
def base_outputs() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "wan_original_outputs.safetensors")


def test_umt5_from_the_original_file_matches_official(original_layout, base_outputs):
    encoder = load_text_encoder(original_layout, torch.float32)
    with torch.no_grad():
        out = encoder(
            input_ids=base_outputs["t5.input_ids"], attention_mask=base_outputs["t5.attention_mask"]
        ).last_hidden_state
    assert max_error(out, base_outputs["t5.out"]) < TOL


def test_clip_from_the_original_file_matches_official(original_layout, base_outputs):
    encoder = load_image_encoder(original_layout, torch.float32, num_heads=2)
    with torch.no_grad():
        out = encoder(pixel_values=base_outputs["clip.pixels"], output_hidden_states=True).hidden_states[-2]
    assert max_error(out, base_outputs["clip.out"]) < TOL


def test_vae_from_the_original_file_matches_official(original_layout, base_outputs):
    vae = load_vae(original_layout)
    with torch.no_grad():
        mu = vae.encode(base_outputs["vae.video"]).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    official = base_outputs["vae.mu_normalized"][:, : mu.shape[1]]  # [mu, log_var]: the first z channels
    assert max_error((mu - mean) / std, official) < TOL
