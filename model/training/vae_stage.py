"""Stage 1: the demo VAE — diffusers' ``AutoencoderKLWan`` at a small width, trained on the clips' frames.

Same class and same causal temporal compression as the released Wan VAE, so streaming decode and every VAE code
path of the pipeline stay the ones the released model uses. Trained on random spatial crops of short clips
(≥ 9 frames, so the cached causal path of later chunks is trained too: trained on 5-frame clips only, later frames
reconstruct 6-10 dB worse); the convolutional VAE then runs on whole frames. Loss: L1 + a small KL (the
posterior stays near a unit Gaussian, so the transformer's latents are well scaled).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from .data import Clip
from .loop import LossFn, batch_indices


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VaeStageConfig:
    """Two phases: short clips with large crops first (fast to learn appearance), then, from step
    ``long_clips_from_step``, longer clips with smaller crops at the same cost per step. The second phase exists
    because the causal cache path is only trained on the chunks a clip contains: trained on 9-frame clips (chunks 0-2),
    frames 0-8 reconstructed at 21 dB and every later frame at 13-15 dB."""

    clip_frames: int = 9  # 4k+1 RGB frames per training sample
    crop: int = 64  # spatial crop side (a multiple of 8), ≤ the data size
    kl_weight: float = 1e-6
    long_clips_from_step: int | None = None  # None: one phase
    long_clip_frames: int = 17
    long_crop: int = 48

    def __post_init__(self) -> None:
        for name in ("clip_frames", "long_clip_frames"):
            frames = getattr(self, name)
            if frames < 5 or (frames - 1) % 4:
                raise ValueError(f"vae.{name} must be 4k+1 >= 5 (got {frames}); 9 or more is advised")
        for name in ("crop", "long_crop"):
            if getattr(self, name) % 8:
                raise ValueError(f"vae.{name} must be a multiple of 8 (got {getattr(self, name)})")

    def at_step(self, step: int) -> tuple[int, int]:
        """(clip frames, crop side) of the samples of ``step``."""
        if self.long_clips_from_step is not None and step >= self.long_clips_from_step:
            return self.long_clip_frames, self.long_crop
        return self.clip_frames, self.crop


def to_video_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] → float [3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def vae_batch(
    clips: list[Clip], indices: list[int], clip_frames: int, crop: int, generator: torch.Generator
) -> torch.Tensor:
    """[B, 3, F, crop, crop]: a random run of frames and a random crop of each clip (the step's generator)."""
    videos = []
    for index in indices:
        frames = clips[index].frames
        count, height, width = frames.shape[:3]
        if crop > min(height, width) or clip_frames > count:
            raise ValueError(
                f"vae crop {crop} / clip_frames {clip_frames} exceed the data ({width}x{height}, {count} frames)"
            )
        start = int(torch.randint(0, count - clip_frames + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - crop + 1, (1,), generator=generator))
        window = frames[start : start + clip_frames, top : top + crop, left : left + crop]
        videos.append(to_video_tensor(window))
    return torch.stack(videos)


def vae_loss_fn(vae: AutoencoderKLWan, clips: list[Clip], config: VaeStageConfig, batch: int, seed: int) -> LossFn:
    device = next(vae.parameters()).device

    def loss(step: int, generator: torch.Generator) -> torch.Tensor:
        # Every draw on the CPU generator (the same bits on any device), then moved.
        clip_frames, crop = config.at_step(step)
        video = vae_batch(clips, batch_indices(seed, step, batch, len(clips)), clip_frames, crop, generator)
        video = video.to(device)
        posterior = vae.encode(video).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        latents = posterior.mean + posterior.std * noise
        reconstruction = vae.decode(latents).sample
        return (reconstruction - video).abs().mean() + config.kl_weight * posterior.kl().mean()

    return loss


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKLWan, clips: list[Clip], frames: int = 17) -> float:
    """Mean PSNR (dB, on uint8 pixels) of whole-frame encode→decode (posterior mode) of each clip's first frames."""
    scores = []
    for clip in clips:
        video = to_video_tensor(clip.frames[:frames]).unsqueeze(0)
        decoded = vae.decode(vae.encode(video).latent_dist.mode()).sample.clamp(-1, 1)
        original = np.rint((video + 1) * 127.5)
        restored = np.rint((decoded + 1) * 127.5)
        mse = float(((original - restored) ** 2).mean())
        scores.append(10 * np.log10(255.0**2 / max(mse, 1e-10)))
    return float(np.mean(scores))


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, clips: list[Clip]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior modes over ``clips``: the VAE config's latents_mean/std, so the
    transformer sees unit-scale latents as the released model does."""
    total, total_sq, count = None, None, 0
    for clip in clips:
        latents = vae.encode(to_video_tensor(clip.frames).unsqueeze(0)).latent_dist.mode()[0]  # [z, F, h, w]
        flat = latents.reshape(latents.shape[0], -1).double()
        total = flat.sum(1) if total is None else total + flat.sum(1)
        total_sq = (flat**2).sum(1) if total_sq is None else total_sq + (flat**2).sum(1)
        count += flat.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-8).sqrt()
    return [float(m) for m in mean], [float(s) for s in std]
