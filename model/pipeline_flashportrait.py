"""FlashPortraitPipeline: reference image + per-frame expression features + prompt → video frames, on one device.

``__call__`` is a numbered recipe over the modules that hold the algorithm (windows, sampling, components); the
Ray coordinator runs the same recipe with the window steps scattered over workers.

Adaptive Latent Prediction (``GenerationRequest.alp``) is resolved here, before sampling, by ``resolve_alp_plan``
(the coordinator calls it too): a ``planned`` schedule needs the model's variation profile, which one all-full run
of a single window on a fixed calibration input produces once per (model, sampler, steps, window shape) and a disk
cache keeps. The resolved ``AlpPlan`` travels inside the sampling config, so every worker uses the same schedule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .alp import (
    AdaptiveLatentPredictionConfig,
    AlpJobStats,
    AlpPlan,
    ProfileCache,
    VariationProfile,
    profile_key,
    resolve_alp_config,
)
from .components import SPATIAL_COMPRESSION, FlashPortraitComponents, build_components
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
from .vae_streaming import iter_decode_latents
from .windows import WindowPlan, blend_overlaps, plan_windows


logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)
# Runs one sampling job with an already resolved ALP plan and returns its ALP statistics (the single-device pipeline
# runs it locally, the coordinator on its workers): how a planned schedule's calibration run is executed.
CalibrationRunner = Callable[["GenerationRequest", AlpPlan], AlpJobStats]
CALIBRATION_SEED = 20260424


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
    # Adaptive Latent Prediction: a preset name of ALP_PRESETS ("off", "balanced", "fast", "paper") or a config.
    alp: str | AdaptiveLatentPredictionConfig | None = None

    def alp_config(self) -> AdaptiveLatentPredictionConfig | None:
        return resolve_alp_config(self.alp)

    def sampling_config(self, preset: ModelPreset) -> SamplingConfig:
        d = preset.sampling
        steps = self.num_inference_steps or d.num_inference_steps
        if d.sigmas is not None:  # a step-distilled preset samples on its own fixed grid
            if self.num_inference_steps not in (None, len(d.sigmas)):
                raise ValueError(
                    f"preset {preset.name!r} is step-distilled to {len(d.sigmas)} steps; got steps="
                    f"{self.num_inference_steps} — leave steps unset or use the non-distilled preset"
                )
            steps = len(d.sigmas)
        return SamplingConfig(
            num_inference_steps=steps,
            sigmas=None if d.sigmas is None else tuple(d.sigmas),
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

    def conditioning_inputs(self, preset: ModelPreset, alp_plan: AlpPlan | None = None) -> JobConditioningInputs:
        """What every worker needs; ``alp_plan`` (from ``resolve_alp_plan``) rides inside the sampling config."""
        return JobConditioningInputs(
            reference=self.reference,
            expression_features=self.expression_features.astype(np.float32, copy=False),
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or preset.negative_prompt,
            sampling=replace(self.sampling_config(preset), alp=alp_plan),
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
        alp = self.alp_config()
        if alp is not None:
            alp.full_step_budget(self.sampling_config(preset).num_inference_steps)

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
    seconds_transformer: float = 0.0  # of seconds_denoising, in transformer passes (summed over workers)
    seconds_decoding: float = 0.0
    seconds_orchestration: float = 0.0
    extra: dict = field(default_factory=dict)
    alp: AlpJobStats | None = None  # per-window full/predicted steps, block-equivalents, state memory, seconds


@dataclass
class GenerationResult:
    frames: np.ndarray  # [N − 1, H, W, 3] uint8; frame k ↔ driving frame k (frame 0, the reference, is dropped)
    stats: GenerationStats


class FlashPortraitPipeline:
    def __init__(self, components: FlashPortraitComponents):
        self.components = components
        self.preset = components.preset
        self.weights_sha256: dict[str, str] = {}  # set by from_source; recorded in every sidecar

    @classmethod
    def from_source(cls, source) -> FlashPortraitPipeline:
        """From a ``loading.ModelSource``: a built-in preset or the released checkpoint files."""
        from .loading import build_from_source, weights_digest

        pipeline = cls(build_from_source(source))
        pipeline.weights_sha256 = weights_digest(source)
        return pipeline

    @classmethod
    def from_preset(cls, name: str) -> FlashPortraitPipeline:
        return cls(build_components(get_preset(name)))

    @torch.no_grad()
    def denoise(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> tuple[torch.Tensor, GenerationStats]:
        """Steps 1–4 of the recipe; returns the final latents and the denoising statistics."""
        start = time.perf_counter()
        # 1. Check the request, lay the windows over the latent frames, resolve ALP's schedule.
        request.check(self.preset)
        plan = request.window_plan(self.preset)
        alp_plan, seconds_calibration = resolve_alp_plan(request, self.preset, plan, self.calibration_run)
        latents, denoiser = self._sample(request, plan, alp_plan, progress)
        stats = GenerationStats(
            transformer_calls=denoiser.transformer_calls,
            windows=len(plan.windows),
            steps=request.sampling_config(self.preset).num_inference_steps,
            seconds_denoising=time.perf_counter() - start,
            seconds_transformer=denoiser.seconds_transformer,
        )
        if alp_plan is not None:
            stats.alp = AlpJobStats.collect(alp_plan, denoiser.alp_window_stats(), seconds_calibration)
        return latents, stats

    def _sample(
        self,
        request: GenerationRequest,
        plan: WindowPlan,
        alp_plan: AlpPlan | None,
        progress: ProgressCallback | None = None,
    ) -> tuple[torch.Tensor, WindowDenoiser]:
        inputs = request.conditioning_inputs(self.preset, alp_plan)
        # 2. Condition every window (text, image, I2V mask + reference latents, per-window expression tokens).
        denoiser = WindowDenoiser(self.components, inputs, plan.windows)
        # 3. One seeded noise tensor for the whole video.
        latents = initial_noise(request.seed, request.latent_shape(self.components, plan.num_latent_frames))
        # 4. Every timestep: advance every window once (ALP may predict instead of computing), then blend the overlaps.
        grid = grid_for(inputs.sampling)
        total = inputs.sampling.num_inference_steps
        for step in range(total):
            slices = {w.index: latents[:, :, w.start : w.stop] for w in plan.windows}
            stepped = step_windows(denoiser, slices, grid, step)
            latents = blend_overlaps(plan, stepped)
            if progress is not None:
                progress(step + 1, total)
        return latents, denoiser

    def calibration_run(self, request: GenerationRequest, alp_plan: AlpPlan) -> AlpJobStats:
        """One sampling run with a resolved ALP plan (a planned schedule's calibration): its ALP statistics."""
        _, denoiser = self._sample(request, request.window_plan(self.preset), alp_plan)
        return AlpJobStats.collect(alp_plan, denoiser.alp_window_stats())

    def stream(self, request: GenerationRequest, progress: ProgressCallback | None = None) -> StreamingResult:
        """Denoise, then decode lazily: the frames come chunk by chunk, so nothing holds the whole video."""
        latents, stats = self.denoise(request, progress)
        # 5. Decode chunk by chunk (causal VAE cache carried across chunks); drop frame 0, the reconstructed
        #    reference, so output frame k ↔ driving frame k.
        chunks = iter_decode_latents(self.components, latents, chunk_latent_frames=DECODE_CHUNK_LATENT_FRAMES)
        return StreamingResult(stats, output_frames(chunks, stats))

    def __call__(self, request: GenerationRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        return self.stream(request, progress).collect()


# Latent frames decoded per chunk: at 720p a chunk of 4 is ~44 MB of uint8 frames (the float copies scale with it).
DECODE_CHUNK_LATENT_FRAMES = 4


@dataclass
class StreamingResult:
    """Statistics after denoising, and the output frames as an iterator of uint8 [n, H, W, 3] chunks (consuming it
    adds the decode time to ``stats.seconds_decoding``)."""

    stats: GenerationStats
    chunks: Iterator[np.ndarray]

    def collect(self) -> GenerationResult:
        """All frames in one array: for short clips and tests; long renders consume ``chunks`` instead."""
        parts = list(self.chunks)
        return GenerationResult(np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), np.uint8), self.stats)


def output_frames(chunks: Iterator[np.ndarray], stats: GenerationStats) -> Iterator[np.ndarray]:
    """Drop the first decoded frame (the reference), skip empty chunks, time the decoding into ``stats``."""
    first = True
    while True:
        started = time.perf_counter()
        chunk = next(chunks, None)
        stats.seconds_decoding += time.perf_counter() - started
        if chunk is None:
            return
        if first:
            chunk, first = chunk[1:], False
        if len(chunk):
            yield chunk


# Adaptive Latent Prediction: schedule resolution and its calibration input ----------------------------------------
def resolve_alp_plan(
    request: GenerationRequest, preset: ModelPreset, plan: WindowPlan, calibrate: CalibrationRunner
) -> tuple[AlpPlan | None, float]:
    """The request's ALP config resolved for its step count; returns (plan or None, seconds spent calibrating).

    ``planned`` loads the variation profile for (model, sampler, steps, window shape, feature sites) from the disk
    cache, or runs ``calibrate`` once on the fixed calibration input and stores it.
    """
    config = request.alp_config()
    if config is None:
        return None, 0.0
    sampling = request.sampling_config(preset)
    steps = sampling.num_inference_steps
    if config.schedule != "planned":
        return AlpPlan.build(config, steps), 0.0
    frames = plan.windows[0].length
    height, width = (n // SPATIAL_COMPRESSION for n in request.reference.shape[:2])
    grid = f"sigmas={list(sampling.sigmas)}" if sampling.sigmas else f"euler-shift={sampling.shift}"
    sampler = f"{grid}|cfg=emo{sampling.emo_cfg_scale},text{sampling.text_cfg_scale},ip{sampling.ip_scale}"
    key = profile_key(f"{preset.name}@{preset.version}", sampler, steps, (frames, height, width), config.granularity)
    cache = ProfileCache(config.profile_dir)
    profile = cache.load(key)
    seconds = 0.0
    if profile is None:
        start = time.perf_counter()
        stats = calibrate(alp_calibration_request(request, preset, frames), AlpPlan.calibration(config, steps))
        rates = [0.0] * steps
        for step, rate in stats.windows[0].variation:
            rates[step] = rate
        profile = VariationProfile(key, steps, tuple(rates))
        path = cache.store(profile)
        seconds = time.perf_counter() - start
        logger.info("ALP: calibrated the variation profile %s in %.1f s → %s", key, seconds, path)
    return AlpPlan.build(config, steps, profile), seconds


def alp_calibration_request(request: GenerationRequest, preset: ModelPreset, frames: int) -> GenerationRequest:
    """One window of ``frames`` latent frames at the request's size and sampler, on a fixed input and seed (so the
    profile depends on its cache key alone, never on which job happened to run first): scikit-image's public-domain
    astronaut portrait, a smooth synthetic expression trajectory, an empty prompt."""
    height, width = request.reference.shape[:2]
    num_rgb = 4 * (frames - 1) + 1
    dim = preset.portrait_encoder.feature_dim
    rng = np.random.default_rng(CALIBRATION_SEED)
    directions = rng.standard_normal((3, dim)) / np.sqrt(dim) * 4.0
    phase = np.linspace(0.0, 2.0 * np.pi, num_rgb)[:, None]
    curves = np.concatenate([np.sin(phase), np.sin(2 * phase), 1.0 - np.cos(phase)], axis=1)  # [N, 3], 0 at frame 0
    return replace(
        request,
        reference=_calibration_portrait(height, width),
        expression_features=(curves @ directions).astype(np.float32),
        prompt="",
        negative_prompt="",
        seed=CALIBRATION_SEED,
        context_size=frames,
        context_overlap=1,
        alp=None,
    )


def _calibration_portrait(height: int, width: int) -> np.ndarray:
    from skimage import data  # ships with the pinned scikit-image wheel; no download

    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1).unsqueeze(0).float()  # [1, 3, 512, 512]
    side = image.shape[-1]
    crop_h, crop_w = (side, round(side * width / height)) if width <= height else (round(side * height / width), side)
    image = image[..., :crop_h, (side - crop_w) // 2 : (side - crop_w) // 2 + crop_w]
    image = F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return image[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
