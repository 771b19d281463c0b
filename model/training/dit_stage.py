"""Stage 2: the FlashPortrait transformer and the portrait encoder, trained together by flow matching on the
frozen demo VAE's latents — the official objective, with the changes our inference needs (each one says why).

Per sample: a clip, a window of ``window`` latent frames starting at a random latent index ``s`` (windows at
inference start anywhere too), the clip's latents ``x0`` there, the I2V condition ``y`` of the identity's neutral
portrait (mask on latent 0 + the VAE latents of the portrait followed by grey frames: what every inference window
sees), the CLIP tokens of that portrait, a prompt's T5 tokens, and the expression tokens of RGB frames
4s … 4(s+window−1) through the portrait encoder, grouped per latent frame exactly as at inference.

- **Objective** (official): x_t = (1−σ)·x0 + σ·ε, target ε − x0, timestep t = 1000σ; σ from a uniform index into the
  shift-5 FlowMatchEuler table (so ~83 % of draws have σ > 0.5). All latent frames supervised.
- **Loss weighting** (official scheme, one deviation): MSE × (1 + face + lip) with p = 0.5, (1 + face) with
  p = 0.2, (1 + lip) with p = 0.3, from face/lip masks at the latent grid. The official's last two schemes weight the
  rest of the frame 0; we keep 1 there, since a small model trained briefly must also learn the background.
- **Motion sub-loss** (official): 0.75 · loss + 0.25 · MSE of consecutive-latent-frame differences.
- **Expression dropout**: p = 0.1 per step, as the ``no_expression`` CFG stream runs it at inference — ip_scale 0,
  the branch switched off. The official zeroes the tokens instead, which NFEB turns into "+ μx": a train/inference
  mismatch we do not copy.
- **Reference**: the identity's neutral portrait, not the clip's first frame: at inference every window, not only
  the first, is conditioned on the one reference image, so training windows start anywhere with the same y.
- **Prompt**: one of a few prompts or none; the text encoder is frozen and random, so the model learns to read
  (or ignore) it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..components import FlashPortraitComponents, encode_i2v_condition, encode_prompt, encode_reference_image
from ..portrait_encoder import split_expression_tokens
from .data import Clip
from .loop import LossFn, batch_indices
from .vae_stage import to_video_tensor


logger = logging.getLogger(__name__)

TRAINING_PROMPTS = ("", "The protagonist is talking", "The astronaut is talking", "a person talking")
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class DitStageConfig:
    window: int = 5  # latent frames per training window (the preset's context size)
    shift: float = 5.0
    expression_dropout: float = 0.1
    motion_loss: float = 0.25
    face_weighting: bool = True
    gradient_checkpointing: bool = False
    # Clips whose extracted mouth disagrees with the rendered one (Clip.feature_agreement below this) are skipped.
    min_feature_agreement: float = 0.8

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"dit.window must be >= 2 latent frames (got {self.window})")
        if not 0 <= self.expression_dropout < 1 or not 0 <= self.motion_loss < 1:
            raise ValueError("dit.expression_dropout and dit.motion_loss must be in [0, 1)")


class TrainableParts(nn.Module):
    """What stage 2 trains: the transformer and the portrait encoder (one module, so one optimizer and EMA)."""

    def __init__(self, components: FlashPortraitComponents):
        super().__init__()
        self.transformer = components.transformer
        self.portrait_encoder = components.portrait_encoder


@dataclass
class LatentClip:
    """One clip, precomputed for stage 2 (everything frozen is computed once)."""

    latents: torch.Tensor  # [z, L, h, w], normalised with the VAE's latents mean/std
    condition: torch.Tensor  # [4 + z, window, h, w]: the I2V condition of the neutral portrait
    image_tokens: torch.Tensor  # [n, image_dim]: CLIP tokens of the neutral portrait
    features: torch.Tensor  # [N, 554]
    face: torch.Tensor  # [L, h, w] in [0, 1]
    lip: torch.Tensor  # [L, h, w] in [0, 1]


def shifted_sigma_table(shift: float) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's training table: σ = shift·s / (1 + (shift−1)·s), s = k/1000, k = 1 … 1000."""
    s = torch.arange(1, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    return (shift * s / (1 + (shift - 1) * s)).float()


def region_masks(landmarks: np.ndarray, size: int, latent_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Face and lip masks per latent frame [L, h, w]: per RGB frame, the landmark hulls rasterised and area-pooled
    to the latent grid; latent frame i takes the max over its RGB frames 4i−3 … 4i (frame 0 alone for i = 0)."""
    import cv2

    faces, lips = [], []
    for points in landmarks:
        face = np.zeros((size, size), np.float32)
        cv2.fillConvexPoly(face, cv2.convexHull(np.rint(points[:27]).astype(np.int32)), 1.0)
        lip = np.zeros((size, size), np.float32)
        mouth = points[48:68]
        centre = mouth.mean(0)
        cv2.fillConvexPoly(lip, cv2.convexHull(np.rint(centre + 1.3 * (mouth - centre)).astype(np.int32)), 1.0)
        faces.append(cv2.resize(face, (latent_size, latent_size), interpolation=cv2.INTER_AREA))
        lips.append(cv2.resize(lip, (latent_size, latent_size), interpolation=cv2.INTER_AREA))
    per_frame = [np.stack(faces), np.stack(lips)]
    out = []
    for masks in per_frame:
        groups = [masks[0]] + [masks[4 * i - 3 : 4 * i + 1].max(0) for i in range(1, (len(masks) - 1) // 4 + 1)]
        out.append(torch.from_numpy(np.stack(groups)))
    return out[0], out[1]


@torch.no_grad()
def precompute(components: FlashPortraitComponents, clip: Clip, config: DitStageConfig) -> LatentClip:
    video = to_video_tensor(clip.frames).unsqueeze(0)
    latents = components.vae.encode(video).latent_dist.mode().float()
    latents = ((latents - components.latents_mean) / components.latents_std)[0]
    condition = encode_i2v_condition(components, clip.reference, config.window)[0]
    image_tokens = encode_reference_image(components, clip.reference)[0].float()
    face, lip = region_masks(clip.landmarks, clip.frames.shape[1], latents.shape[-1])
    return LatentClip(latents, condition, image_tokens, torch.from_numpy(clip.features), face, lip)


@torch.no_grad()
def prompt_table(components: FlashPortraitComponents) -> torch.Tensor:
    """[P, text_len, text_dim]: the frozen T5 tokens of every training prompt."""
    return torch.cat([encode_prompt(components, prompt).float() for prompt in TRAINING_PROMPTS])


def _loss_weights(face: torch.Tensor, lip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    draw = float(torch.rand((), generator=generator))
    if draw < 0.5:
        return 1 + face + lip
    if draw < 0.7:
        return 1 + face
    return 1 + lip


def dit_loss_fn(
    parts: TrainableParts,
    clips: list[LatentClip],
    prompts: torch.Tensor,
    config: DitStageConfig,
    batch: int,
    seed: int,
    tokens_per_frame: int,
) -> LossFn:
    sigmas = shifted_sigma_table(config.shift)
    device = next(parts.parameters()).device
    autocast = device.type == "cuda"

    def loss(step: int, generator: torch.Generator) -> torch.Tensor:
        x0, cond, images, texts, features, weights = [], [], [], [], [], []
        for index in batch_indices(seed, step, batch, len(clips)):
            clip = clips[index]
            start = int(torch.randint(0, clip.latents.shape[1] - config.window + 1, (1,), generator=generator))
            stop = start + config.window
            x0.append(clip.latents[:, start:stop])
            cond.append(clip.condition)
            images.append(clip.image_tokens)
            texts.append(prompts[int(torch.randint(0, len(prompts), (1,), generator=generator))])
            features.append(clip.features[4 * start : 4 * (stop - 1) + 1])
            if config.face_weighting:
                weights.append(_loss_weights(clip.face[start:stop], clip.lip[start:stop], generator))
            else:
                weights.append(torch.ones_like(clip.face[start:stop]))
        x0_b = torch.stack(x0)  # [B, z, F, h, w]
        sigma = sigmas[torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)]  # [B]
        noise = torch.randn(x0_b.shape, generator=generator)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0_b + s * noise
        target = noise - x0_b
        ip_scale = 0.0 if float(torch.rand((), generator=generator)) < config.expression_dropout else 1.0
        feats = torch.stack(features).to(device)  # [B, N_rgb, 554]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            tokens = parts.portrait_encoder(feats)  # [B, N_rgb·τ, C]
            grouped = split_expression_tokens(tokens, feats.shape[1], tokens_per_frame)
            pred = parts.transformer(
                torch.cat([x_t, torch.stack(cond)], dim=1).to(device),
                (sigma * NUM_TRAIN_TIMESTEPS).to(device),
                torch.stack(texts).to(device),
                torch.stack(images).to(device),
                expression_tokens=grouped,
                ip_scale=ip_scale,
                return_dict=False,
            )[0].float()
        target = target.to(device)
        weight = torch.stack(weights).unsqueeze(1).to(device)  # [B, 1, F, h, w]
        main = (weight * (pred - target) ** 2).mean()
        if not config.motion_loss:
            return main
        motion = F.mse_loss(pred[:, :, 1:] - pred[:, :, :-1], target[:, :, 1:] - target[:, :, :-1])
        return (1 - config.motion_loss) * main + config.motion_loss * motion

    return loss
