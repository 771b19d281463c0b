"""Sliding windows over latent frames and the order-independent blend of their overlaps.

Infinite length comes from here: a video of L latent frames is covered by windows of ``context_size`` frames
that overlap by ``overlap``; every window is advanced once per timestep and the overlaps are blended, so the
transformer only ever sees one window and memory follows the window, not the video.

The window list is the official one (starts 0, S, 2S, … while a full window still ends before the video does,
then one last window flush with the end), so released-model renders see the same windows; unlike the official
code a video shorter than one window is one window of its own length (the official code crashes or silently
duplicates frames below 51 latent frames).

The blend differs on purpose: the official loop cross-fades each window into the buffer written by the previous
one, so its result depends on the order windows are processed. Here every window has fixed per-frame weights
(a linear ramp across each overlap) and a frame is the weighted mean of the windows that cover it, summed in
window order, so workers may finish in any order and the bits do not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    """Latent frames [start, stop) of one window; ``index`` is its position in the plan."""

    index: int
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def rgb_range(self) -> tuple[int, int]:
        """RGB frames [4·start, 4·(stop−1)] inclusive: the driving frames whose expressions this window uses."""
        return 4 * self.start, 4 * (self.stop - 1)


@dataclass(frozen=True)
class WindowPlan:
    num_latent_frames: int
    context_size: int
    overlap: int
    windows: tuple[Window, ...]

    @property
    def stride(self) -> int:
        return self.context_size - self.overlap


def plan_windows(num_latent_frames: int, context_size: int, overlap: int) -> WindowPlan:
    """Cover ``num_latent_frames`` with windows of ``context_size`` that overlap by at least ``overlap``."""
    if num_latent_frames < 1:
        raise ValueError(f"num_latent_frames must be ≥ 1, got {num_latent_frames}")
    if context_size < 2:
        raise ValueError(f"context_size must be ≥ 2 latent frames, got {context_size}")
    if not 1 <= overlap < context_size:
        raise ValueError(
            f"overlap must be between 1 and context_size − 1 = {context_size - 1}, got {overlap}; "
            "use a smaller overlap or a larger context size"
        )
    if num_latent_frames <= context_size:
        return WindowPlan(num_latent_frames, context_size, overlap, (Window(0, 0, num_latent_frames),))
    stride = context_size - overlap
    starts = list(range(0, num_latent_frames - context_size, stride))
    starts.append(num_latent_frames - context_size)  # the last window sits flush with the end
    windows = tuple(Window(i, s, s + context_size) for i, s in enumerate(starts))
    return WindowPlan(num_latent_frames, context_size, overlap, windows)


def blend_weights(plan: WindowPlan) -> list[torch.Tensor]:
    """Per window, a weight per local frame: 1 inside, a linear ramp (r+1)/(ov+1) across each overlap.

    Weights are > 0 everywhere, so every frame has a non-zero total weight; a frame covered by one window takes
    that window's value exactly.
    """
    weights = []
    windows = plan.windows
    for k, window in enumerate(windows):
        r = torch.arange(window.length, dtype=torch.float64)
        w = torch.ones(window.length, dtype=torch.float64)
        if k > 0:
            ov_prev = windows[k - 1].stop - window.start
            w = torch.minimum(w, (r + 1) / (ov_prev + 1))
        if k + 1 < len(windows):
            ov_next = window.stop - windows[k + 1].start
            w = torch.minimum(w, (window.length - r) / (ov_next + 1))
        weights.append(w)
    return weights


def blend_overlaps(plan: WindowPlan, window_latents: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Weighted mean of the windows' latents [B, C, F_w, H, W] → the whole video's latents [B, C, L, H, W].

    Sums in window-index order whatever the mapping's order, so the result is bit-identical for any completion
    order of the windows.
    """
    missing = [w.index for w in plan.windows if w.index not in window_latents]
    if missing:
        raise ValueError(f"blend_overlaps: no latents for windows {missing}; every window must be stepped")
    first = window_latents[plan.windows[0].index]
    batch, channels, _, height, width = first.shape
    total = torch.zeros(batch, channels, plan.num_latent_frames, height, width, dtype=torch.float64)
    norm = torch.zeros(plan.num_latent_frames, dtype=torch.float64)
    for window, weight in zip(plan.windows, blend_weights(plan)):
        latents = window_latents[window.index]
        if latents.shape[2] != window.length:
            raise ValueError(
                f"blend_overlaps: window {window.index} covers {window.length} frames but got latents with "
                f"{latents.shape[2]}"
            )
        total[:, :, window.start : window.stop] += latents.to(torch.float64) * weight.view(1, 1, -1, 1, 1)
        norm[window.start : window.stop] += weight
    return (total / norm.view(1, 1, -1, 1, 1)).to(first.dtype)


def blend_sequential_official(
    plan: WindowPlan, window_latents: Mapping[int, torch.Tensor], blend: bool = True
) -> torch.Tensor:
    """The official loop's blend, for parity checks with the reference implementation (not used for rendering).

    Windows are written into a zero buffer in plan order; when ``blend`` (every step but the first), window k's
    first ``ov`` frames become ``r/(ov−1)·x_k + (1 − r/(ov−1))·buffer`` for r = 0 … ov−1, where the buffer holds what
    earlier windows wrote in this step (``ov`` = overlap with window k−1). Without ``blend`` (step 0) the last window
    covering a frame wins. The result depends on the processing order, which is why rendering uses
    :func:`blend_overlaps` instead.

    Raises:
        ValueError: a window is missing or two consecutive windows overlap by exactly one frame (the official
            weights divide by ov − 1 = 0).
    """
    missing = [w.index for w in plan.windows if w.index not in window_latents]
    if missing:
        raise ValueError(f"blend_sequential_official: no latents for windows {missing}")
    first = window_latents[plan.windows[0].index]
    batch, channels, _, height, width = first.shape
    buffer = first.new_zeros(batch, channels, plan.num_latent_frames, height, width)
    for k, window in enumerate(plan.windows):
        latents = window_latents[window.index].clone()
        if blend and k > 0:
            previous = plan.windows[k - 1]
            overlap = previous.stop - window.start
            if overlap == 1:
                raise ValueError(
                    f"windows {previous.index} and {window.index} overlap by one frame; the official ramp r/(ov−1) "
                    "is undefined there — use an overlap of at least 2"
                )
            if overlap > 1:
                ramp = torch.arange(overlap, dtype=latents.dtype) / (overlap - 1)
                ramp = ramp.view(1, 1, -1, 1, 1)
                earlier = buffer[:, :, window.start : previous.stop]
                latents[:, :, :overlap] = latents[:, :, :overlap] * ramp + earlier * (1 - ramp)
        buffer[:, :, window.start : window.stop] = latents
    return buffer
