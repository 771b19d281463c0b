"""FlashPortraitPipeline: reference image + per-frame expression features + prompt → video frames, on one device.

``__call__`` is a numbered recipe over the modules that hold the algorithm (windows, sampling, components); the
Ray coordinator runs the same recipe with the window steps scattered over workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .components import FlashPortraitComponents, build_components, decode_latents
from .presets import ModelPreset, get_preset
from .sampling import (
    JobConditioningInputs,
    SamplingConfig,
    WindowDenoiser,
    grid_for,
    initial_noise,
    num_latent_frames,
    step_windows,
)
from .windows import WindowPlan, blend_overlaps, plan_windows


logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)


@dataclass(frozen=True)
class GenerationRequest:
    """One video to generate; every field is already validated and at the model's resolution."""

    reference: np.ndarray  # [H, W, 3] uint8
    expression_features: np.ndarray  # [N, feature_dim], N = 4k+1 driving frames at the output fps
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 42
    num_inference_steps: int | None = None
    emo_cfg_scale: float | None = None
    text_cfg_scale: float | None = None
    ip_scale: float | None = None
    context_size: int | None = None
    context_overlap: int | None = None

    def sampling_config(self, preset: ModelPreset) -> SamplingConfig:
        d = preset.sampling
        return SamplingConfig(
            num_inference_steps=self.num_inference_steps or d.num_inference_steps,
            shift=d.shift,
            emo_cfg_scale=d.emo_cfg_scale if self.emo_cfg_scale is None else self.emo_cfg_scale,
            text_cfg_scale=d.text_cfg_scale if self.text_cfg_scale is None else self.text_cfg_scale,
            ip_scale=d.ip_scale if self.ip_scale is None else self.ip_scale,
        )

    def window_plan(self, preset: ModelPreset) -> WindowPlan:
        return plan_windows(
            num_latent_frames(self.expression_features.shape[0]),
            self.context_size or preset.sampling.context_size,
            self.context_overlap or preset.sampling.context_overlap,
        )

    def conditioning_inputs(self, preset: ModelPreset) -> JobConditioningInputs:
        return JobConditioningInputs(
            reference=self.reference,
            expression_features=self.expression_features.astype(np.float32, copy=False),
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or preset.negative_prompt,
            sampling=self.sampling_config(preset),
        )

    def check(self, preset: ModelPreset) -> None:
        height, width = self.reference.shape[:2]
        multiple = preset.patch_multiple
        if self.reference.ndim != 3 or self.reference.shape[2] != 3 or self.reference.dtype != np.uint8:
            raise ValueError(f"reference must be uint8 [H, W, 3], got {self.reference.dtype} {self.reference.shape}")
        if height % multiple or width % multiple:
            raise ValueError(
                f"reference is {width}x{height}; width and height must be multiples of {multiple} "
                "(resize the reference to the model resolution first)"
            )
        expected = preset.portrait_encoder.feature_dim
        if self.expression_features.ndim != 2 or self.expression_features.shape[1] != expected:
            raise ValueError(
                f"expression_features must be [frames, {expected}], got {tuple(self.expression_features.shape)}"
            )
        num_latent_frames(self.expression_features.shape[0])

    def latent_shape(self, components: FlashPortraitComponents, num_latent: int) -> tuple[int, ...]:
        height, width = self.reference.shape[:2]
        z = components.vae.config.z_dim
        return (1, z, num_latent, height // 8, width // 8)


@dataclass
class GenerationStats:
    transformer_calls: int = 0
    windows: int = 0
    steps: int = 0
    seconds_denoising: float = 0.0
    seconds_decoding: float = 0.0
    seconds_orchestration: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class GenerationResult:
    frames: np.ndarray  # [N − 1, H, W, 3] uint8; frame k ↔ driving frame k (frame 0, the reference, is dropped)
    stats: GenerationStats


class FlashPortraitPipeline:
    def __init__(self, components: FlashPortraitComponents):
        self.components = components
        self.preset = components.preset

    @classmethod
    def from_preset(cls, name: str) -> FlashPortraitPipeline:
        return cls(build_components(get_preset(name)))

    @torch.no_grad()
    def denoise(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> tuple[torch.Tensor, int]:
        """Steps 1–4 of the recipe; returns the final latents and the number of transformer calls."""
        # 1. Check the request and lay the windows over the latent frames.
        request.check(self.preset)
        plan = request.window_plan(self.preset)
        inputs = request.conditioning_inputs(self.preset)
        # 2. Condition every window (text, image, I2V mask + reference latents, per-window expression tokens).
        denoiser = WindowDenoiser(self.components, inputs, plan.windows)
        # 3. One seeded noise tensor for the whole video.
        latents = initial_noise(request.seed, request.latent_shape(self.components, plan.num_latent_frames))
        # 4. Every timestep: advance every window once, then blend the overlaps.
        grid = grid_for(inputs.sampling)
        total = inputs.sampling.num_inference_steps
        for step in range(total):
            slices = {w.index: latents[:, :, w.start : w.stop] for w in plan.windows}
            stepped = step_windows(denoiser, slices, grid, step)
            latents = blend_overlaps(plan, stepped)
            if progress is not None:
                progress(step + 1, total)
        return latents, denoiser.transformer_calls

    def __call__(self, request: GenerationRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        start = time.perf_counter()
        latents, calls = self.denoise(request, progress)
        denoised = time.perf_counter()
        # 5. Decode, and drop frame 0 (the reconstructed reference) so output frame k ↔ driving frame k.
        frames = decode_latents(self.components, latents)[1:]
        plan = request.window_plan(self.preset)
        stats = GenerationStats(
            transformer_calls=calls,
            windows=len(plan.windows),
            steps=request.sampling_config(self.preset).num_inference_steps,
            seconds_denoising=denoised - start,
            seconds_decoding=time.perf_counter() - denoised,
        )
        return GenerationResult(frames, stats)
