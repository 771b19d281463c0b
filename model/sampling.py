"""One flow-matching step for a set of windows — the single source of truth for denoising.

The single-device pipeline calls ``step_windows`` for all windows in a loop; a Ray worker calls the same function
for the windows it holds. Neither has denoising logic of its own, so both produce the same bits.

A ``WindowDenoiser`` holds what a window needs for its whole sampling run (text/image context, the I2V condition,
the window's expression tokens) and turns latents into a CFG-combined velocity; ``step_windows`` applies the Euler
update x ← x + (σ_next − σ)·v on the grid of diffusers' ``FlowMatchEulerDiscreteScheduler``.

With Adaptive Latent Prediction (``SamplingConfig.alp``, ``model/alp.py``) the denoiser also holds each window's ALP
state: on a predicted step every CFG stream of the window runs only the transformer's live path and the forecast
residual features. The state is fed from the latents the window is given, i.e. the blended ones, so blending, ALP and
distribution over workers commute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .alp import AdaptiveLatentPrediction, AlpPlan, AlpWindowStats
from .components import (
    TEMPORAL_COMPRESSION,
    FlashPortraitComponents,
    encode_i2v_condition,
    encode_prompt,
    encode_reference_image,
)
from .portrait_encoder import split_expression_tokens
from .windows import Window


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    num_inference_steps: int
    shift: float
    emo_cfg_scale: float
    text_cfg_scale: float
    ip_scale: float
    # An explicit sigma grid (decreasing, without the final 0) replaces the shifted scheduler grid: the
    # step-distilled 4-step path uses [1.0, 0.9375, 0.8333, 0.625].
    sigmas: tuple[float, ...] | None = None
    # Adaptive Latent Prediction resolved for this run (None = every step runs the transformer).
    alp: AlpPlan | None = None

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be ≥ 1, got {self.num_inference_steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.sigmas is not None:
            if len(self.sigmas) != self.num_inference_steps:
                raise ValueError(
                    f"sigmas has {len(self.sigmas)} values but num_inference_steps is {self.num_inference_steps}; "
                    "give one sigma per step"
                )
            if any(b >= a for a, b in zip(self.sigmas, self.sigmas[1:])) or not 0 < self.sigmas[-1] <= 1:
                raise ValueError(f"sigmas must decrease within (0, 1], got {list(self.sigmas)}")
        if self.alp is not None and self.alp.num_steps != self.num_inference_steps:
            raise ValueError(
                f"the ALP plan is for {self.alp.num_steps} steps but num_inference_steps is "
                f"{self.num_inference_steps}; resolve the plan for this step count"
            )

    @property
    def streams(self) -> tuple[str, ...]:
        """The transformer passes per window and step (official CFG table: 1, 2 or 3 passes)."""
        emo, text = self.emo_cfg_scale > 1.0, self.text_cfg_scale != 1.0
        if emo and text:
            return ("cond", "no_expression", "negative")
        if emo:
            return ("cond", "no_expression")
        if text:
            return ("cond", "negative_text")
        return ("cond",)


@dataclass(frozen=True)
class FlowMatchingGrid:
    timesteps: torch.Tensor  # [S]
    sigmas: torch.Tensor  # [S + 1], last = 0


def flow_matching_grid(
    num_inference_steps: int, shift: float, sigmas: tuple[float, ...] | None = None
) -> FlowMatchingGrid:
    """Timesteps and sigmas of diffusers' flow-matching Euler scheduler (static shift, as the official config),
    or of an explicit sigma list (timesteps = σ·1000, final σ = 0)."""
    if sigmas is not None:
        sigma_t = torch.tensor([*sigmas, 0.0], dtype=torch.float32)
        return FlowMatchingGrid(sigma_t[:-1] * 1000.0, sigma_t)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_inference_steps)
    return FlowMatchingGrid(scheduler.timesteps.clone(), scheduler.sigmas.clone())


def grid_for(config: SamplingConfig) -> FlowMatchingGrid:
    return flow_matching_grid(config.num_inference_steps, config.shift, config.sigmas)


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The job's whole-video noise, from one seeded CPU generator: the same bits on every machine."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@dataclass(frozen=True)
class JobConditioningInputs:
    """What a worker needs to condition its windows: small, picklable, the same for every worker of a job."""

    reference: np.ndarray  # [H, W, 3] uint8, already at the model resolution
    expression_features: np.ndarray  # [N_rgb, feature_dim] float32, N_rgb = 4(L−1)+1
    prompt: str
    negative_prompt: str
    sampling: SamplingConfig


class WindowDenoiser:
    """Velocity of a window's latents under the job's conditioning, with the official CFG combinations."""

    def __init__(self, components: FlashPortraitComponents, inputs: JobConditioningInputs, windows: Iterable[Window]):
        self.components = components
        self.inputs = inputs
        self.windows = {w.index: w for w in windows}
        self.sampling = inputs.sampling
        self.context = encode_prompt(components, inputs.prompt)
        needs_negative = any(s.startswith("negative") for s in self.sampling.streams)
        self.negative_context = encode_prompt(components, inputs.negative_prompt) if needs_negative else None
        self.image_context = encode_reference_image(components, inputs.reference)
        self._condition_by_length: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, torch.Tensor] = {}
        self.transformer_calls = 0  # full transformer passes (an ALP-predicted pass runs no block and is not one)
        self.seconds_transformer = 0.0  # wall time in transformer passes, full and predicted (ALP or not)
        self.alp: AdaptiveLatentPrediction | None = None
        plan = self.sampling.alp
        if plan is not None:
            layout = components.transformer.enable_feature_sites(plan.config.granularity)
            self.alp = AdaptiveLatentPrediction(plan, self.sampling.streams, layout, components.device)

    def condition(self, length: int) -> torch.Tensor:
        if length not in self._condition_by_length:
            self._condition_by_length[length] = encode_i2v_condition(self.components, self.inputs.reference, length)
        return self._condition_by_length[length]

    @torch.no_grad()
    def expression_tokens(self, window: Window) -> torch.Tensor:
        """The window's tokens [1, F, 4τ+1, C]: RGB frames [4·start, 4·(stop−1)] through the portrait encoder, then
        grouped per latent frame — window-local latent 0 sees only RGB frame 4·start, as in the official code."""
        if window.index not in self._tokens:
            first, last = window.rgb_range
            features = self.inputs.expression_features[first : last + 1]
            features_t = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).unsqueeze(0)
            tokens = (
                self.components.portrait_encoder(features_t.to(self.components.device)).float().cpu()
            )  # [1, F_rgb·τ, C]
            tau = self.components.preset.portrait_encoder.tokens_per_frame
            self._tokens[window.index] = split_expression_tokens(tokens, features.shape[0], tau)
        return self._tokens[window.index]

    def stream_inputs(self, stream: str) -> tuple[torch.Tensor, float]:
        """(text context, ip_scale) of a CFG stream: the no-expression streams switch the expression branch off."""
        context = self.negative_context if stream.startswith("negative") else self.context
        ip_scale = 0.0 if stream in ("no_expression", "negative") else self.sampling.ip_scale
        return context, ip_scale

    @torch.no_grad()
    def velocity(
        self,
        window_index: int,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        step_index: int | None = None,
        sigma: float | None = None,
    ) -> torch.Tensor:
        """CFG-combined velocity [1, z, F, h, w]. With ALP, ``step_index`` (and ``sigma`` for the σ coordinate)
        place the call on the schedule; a predicted step forecasts every stream of the window."""
        window = self.windows[window_index]
        dtype = self.components.dtype
        device = self.components.device
        model_input = torch.cat([latents, self.condition(window.length)], dim=1)  # [1, 36, F, h, w]
        model_input = model_input.to(device=device, dtype=dtype)
        tokens = self.expression_tokens(window).to(device)
        t = timestep.reshape(1).to(device=device, dtype=dtype)
        alp, full, tau = None, True, 0.0
        if self.alp is not None:
            if step_index is None:
                raise ValueError("ALP needs the step index of every velocity call; pass step_index")
            # Idempotent; re-installs the sites if another job on this process switched the granularity meanwhile.
            self.components.transformer.enable_feature_sites(self.alp.plan.config.granularity)
            alp = self.alp.window(window_index)
            full = alp.is_full(step_index)
            tau = float(step_index) if self.alp.plan.config.coordinate == "step" else float(sigma)
        outputs = {}
        seconds = 0.0
        for stream in self.sampling.streams:
            context, ip_scale = self.stream_inputs(stream)
            cache = alp.call(stream, step_index, tau, full) if alp is not None else None
            start = time.perf_counter()
            out = self.transformer_pass(
                window_index,
                stream,
                step_index,
                model_input,
                t,
                context.to(device, dtype),
                self.image_context.to(device, dtype),
                expression_tokens=tokens,
                ip_scale=ip_scale,
                feature_cache=cache,
            )
            outputs[stream] = out.float().cpu()
            seconds += time.perf_counter() - start
            self.transformer_calls += int(full)
            if cache is not None:
                alp.seconds_alp += cache.seconds
        self.seconds_transformer += seconds
        if alp is not None:
            if full:
                alp.seconds_full += seconds
            else:
                alp.seconds_predicted += seconds
            alp.step_transformer_seconds = seconds
            alp.finish_step(step_index, full)
            self.alp.park(window_index)
        return self.combine(outputs)

    def transformer_pass(
        self, window_index: int, stream: str, step_index: int | None, *args, **kwargs
    ) -> torch.Tensor:
        """One transformer call for one stream of one window (a seam for benchmarks that wrap each call)."""
        return self.components.transformer(*args, return_dict=False, **kwargs)[0]

    def combine(self, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The official CFG combinations of the streams' outputs."""
        cond = outputs["cond"]
        emo, text = self.sampling.emo_cfg_scale, self.sampling.text_cfg_scale
        streams = self.sampling.streams
        if streams == ("cond",):
            return cond
        if streams == ("cond", "no_expression"):
            no_expr = outputs["no_expression"]
            return no_expr + emo * (cond - no_expr)
        if streams == ("cond", "negative_text"):
            neg_text = outputs["negative_text"]
            return neg_text + text * (cond - neg_text)
        no_expr, negative = outputs["no_expression"], outputs["negative"]
        return negative + text * (no_expr - negative) + emo * (cond - no_expr)

    def account_step(self, window_index: int, seconds: float) -> None:
        """Book a window step's wall time: what the transformer did not take is 'other' (CFG, Euler, transfers)."""
        if self.alp is not None:
            state = self.alp.windows[window_index]
            state.seconds_other += max(0.0, seconds - state.step_transformer_seconds)

    def alp_window_stats(self) -> list[AlpWindowStats]:
        return self.alp.window_stats() if self.alp is not None else []

    def release(self) -> None:
        self._tokens.clear()
        self._condition_by_length.clear()
        if self.alp is not None:
            self.alp.windows.clear()


def step_windows(
    denoiser: WindowDenoiser,
    window_latents: Mapping[int, torch.Tensor],
    grid: FlowMatchingGrid,
    step_index: int,
) -> dict[int, torch.Tensor]:
    """Advance each window's latents [1, z, F_w, h, w] by one Euler step of the flow-matching ODE (fp32 math)."""
    timestep = grid.timesteps[step_index]
    sigma, sigma_next = grid.sigmas[step_index], grid.sigmas[step_index + 1]
    stepped = {}
    for index in sorted(window_latents):
        start = time.perf_counter()
        latents = window_latents[index].float()
        velocity = denoiser.velocity(index, latents, timestep, step_index=step_index, sigma=float(sigma))
        stepped[index] = latents + (sigma_next - sigma) * velocity
        denoiser.account_step(index, time.perf_counter() - start)
    return stepped


def num_latent_frames(num_rgb_frames: int) -> int:
    if num_rgb_frames < 5 or (num_rgb_frames - 1) % TEMPORAL_COMPRESSION:
        raise ValueError(
            f"the driving clip has {num_rgb_frames} frames after resampling; need a count of the form 4k+1 ≥ 5 "
            "(truncate with largest_4k_plus_1, or supply a longer clip)"
        )
    return (num_rgb_frames - 1) // TEMPORAL_COMPRESSION + 1
