"""A briefly trained tiny FlashPortrait for judging ALP (bench/alp.py), cached on disk after the first run.

Why: a randomly initialised model's velocity barely changes along the trajectory (reference alp.md §4), so every
acceleration looks lossless on it. A few thousand CPU steps of flow matching on synthetic moving-pattern latent
videos give a model whose features change the way a trained model's do (slowly, then fast near the end).

The data, all in latent space [16, F, 8, 8] at 64×64 pixels: frame 0 is the VAE latent of a synthetic reference
image (the same latent the pipeline's I2V condition carries); later frames roll it one latent pixel per frame in the
direction the prompt names, plus a Gaussian blob whose amplitude follows the per-frame expression features (so the
expression branch, and with it emotion CFG, matters). 15 % of steps train the no-expression branch (ip_scale 0),
which is what the emotion-CFG unconditional stream runs. Everything else (VAE, text, CLIP and portrait encoders) is
the tiny preset's seeded random weights, built the same way as at inference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from flashportrait.model.components import (
    FlashPortraitComponents,
    build_components,
    encode_i2v_condition,
    encode_prompt,
    encode_reference_image,
)
from flashportrait.model.portrait_encoder import split_expression_tokens
from flashportrait.model.presets import TINY, ModelPreset


logger = logging.getLogger(__name__)

SIZE = 64  # pixels; latents 8×8, 16 tokens per latent frame after the 2×2 patch
WINDOW = 5  # latent frames per training clip (the tiny preset's context size)
DIRECTIONS = {"the pattern moves left": (0, -1), "the pattern moves right": (0, 1), "the pattern moves up": (-1, 0)}
TRAINING = dict(steps=2400, batch=8, lr=1e-3, references=48, seed=7, uncond=0.15, shift=5.0, blob=1.5)
# 4 blocks (so block groups and per-module forecasting differ from the whole stack), width 32.
TRANSFORMER = dict(TINY.transformer, num_layers=4, attention_head_dim=16, ffn_dim=64, added_kv_proj_dim=32)


def training_key() -> str:
    payload = json.dumps({"training": TRAINING, "transformer": TRANSFORMER, "size": SIZE, "window": WINDOW})
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def bench_preset() -> ModelPreset:
    """The tiny preset with a 4-block transformer; the version names the training, so ALP profiles key on it."""
    return replace(
        TINY,
        name="tiny-alp-bench",
        version=f"tiny-alp-bench-{training_key()}",
        transformer=TRANSFORMER,
        notes="tiny FlashPortrait, transformer briefly trained on synthetic moving patterns (bench/_tiny_training.py)",
    )


def synthetic_reference(rng: np.random.Generator) -> np.ndarray:
    """A 64×64 'portrait': a colour gradient with three soft ellipses."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    image = rng.uniform(0, 1, 3) * (1 - yy[..., None]) + rng.uniform(0, 1, 3) * yy[..., None]
    for _ in range(3):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        ry, rx = rng.uniform(0.08, 0.3, 2)
        mask = np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) * 2.0)[..., None]
        image = image * (1 - mask) + rng.uniform(0, 1, 3) * mask
    return (image * 255).round().clip(0, 255).astype(np.uint8)


def expression_amplitudes(rng: np.random.Generator, num_rgb: int) -> np.ndarray:
    """A smooth amplitude in [0, 1] per RGB frame, 0 at frame 0 (the neutral reference)."""
    amplitude, cycles = rng.uniform(0.4, 1.0), rng.uniform(0.3, 1.5)
    return amplitude * np.sin(np.pi * cycles * np.arange(num_rgb) / max(num_rgb - 1, 1)) ** 2


def expression_features(amplitudes: np.ndarray, feature_dim: int, rng: np.random.Generator) -> np.ndarray:
    """Features a·u + noise with a fixed direction u: the portrait encoder (random, fixed) turns them into tokens."""
    direction = np.random.default_rng(1234).standard_normal(feature_dim) * 0.5
    noise = rng.standard_normal((amplitudes.shape[0], feature_dim)) * 0.05
    return (amplitudes[:, None] * direction[None] + noise).astype(np.float32)


def synthetic_video(first: torch.Tensor, shift: tuple[int, int], amplitudes: np.ndarray) -> torch.Tensor:
    """[16, F, 8, 8] latents: ``first`` rolled by ``shift`` per frame, plus an amplitude-scaled moving blob."""
    channels = torch.from_numpy(np.random.default_rng(99).standard_normal(first.shape[0])).float() * 0.5
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    frames = []
    for f in range(WINDOW):
        cy, cx = 3.5 + 0.5 * f * shift[0], 3.5 + 0.5 * f * shift[1]
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * TRAINING["blob"] ** 2))
        moved = torch.roll(first, shifts=(f * shift[0], f * shift[1]), dims=(1, 2))
        frames.append(moved + float(amplitudes[4 * f]) * channels[:, None, None] * blob)
    return torch.stack(frames, dim=1)


class _Sample:
    """Everything one training clip needs, precomputed per reference (the encoders are frozen)."""

    def __init__(self, components: FlashPortraitComponents, reference: np.ndarray):
        self.condition = encode_i2v_condition(components, reference, WINDOW)[0]  # [20, F, 8, 8]
        self.image = encode_reference_image(components, reference)[0]  # [17, 16]


def train(components: FlashPortraitComponents) -> list[float]:
    """Flow matching: x_σ = (1−σ)·x₀ + σ·ε, target v = ε − x₀, σ from the shifted uniform the sampler uses."""
    cfg = TRAINING
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    samples = [_Sample(components, synthetic_reference(rng)) for _ in range(cfg["references"])]
    prompts = {p: encode_prompt(components, p)[0] for p in DIRECTIONS}
    encoder = components.portrait_encoder
    tau = components.preset.portrait_encoder.tokens_per_frame
    feature_dim = components.preset.portrait_encoder.feature_dim
    model = components.transformer.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, cfg["steps"])
    losses = []
    num_rgb = 4 * (WINDOW - 1) + 1
    for _ in range(cfg["steps"]):
        batch = [samples[i] for i in rng.integers(0, len(samples), cfg["batch"])]
        names = [list(DIRECTIONS)[i] for i in rng.integers(0, len(DIRECTIONS), cfg["batch"])]
        amplitudes = [expression_amplitudes(rng, num_rgb) for _ in batch]
        with torch.no_grad():
            x0 = torch.stack(
                [synthetic_video(s.condition[4:, 0], DIRECTIONS[n], a) for s, n, a in zip(batch, names, amplitudes)]
            )
            features = torch.from_numpy(np.stack([expression_features(a, feature_dim, rng) for a in amplitudes]))
            tokens = split_expression_tokens(encoder(features), num_rgb, tau)  # [B, F, G, C]
        u = torch.rand(cfg["batch"])
        sigma = cfg["shift"] * u / (1 + (cfg["shift"] - 1) * u)
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        model_input = torch.cat([x_t, torch.stack([b.condition for b in batch])], dim=1)  # [B, 36, F, 8, 8]
        ip_scale = 0.0 if rng.random() < cfg["uncond"] else 1.0
        prediction = model(
            model_input,
            sigma * 1000.0,
            torch.stack([prompts[n] for n in names]),
            torch.stack([b.image for b in batch]),
            expression_tokens=tokens,
            ip_scale=ip_scale,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(prediction, noise - x0)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    return losses


def trained_components(cache_dir: Path) -> tuple[FlashPortraitComponents, dict]:
    """The bench model: trained once (about a minute of CPU), then loaded from ``cache_dir``."""
    preset = bench_preset()
    components = build_components(preset)
    path = Path(cache_dir) / f"{preset.version}.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        components.transformer.load_state_dict(saved["state_dict"])
        return components, {"cache": str(path), "trained_now": False, **saved["meta"]}
    start = time.perf_counter()
    losses = train(components)
    meta = {
        "seconds": round(time.perf_counter() - start, 1),
        "steps": TRAINING["steps"],
        "loss_first_100": float(np.mean(losses[:100])),
        "loss_last_100": float(np.mean(losses[-100:])),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": components.transformer.state_dict(), "meta": meta}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    logger.info(
        "trained the bench model in %.0f s (loss %.3f → %.3f)",
        meta["seconds"],
        meta["loss_first_100"],
        meta["loss_last_100"],
    )
    return components, {"cache": str(path), "trained_now": True, **meta}
