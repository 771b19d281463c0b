"""The demo model's quality figures on the held-out identities (never trained on), as the issue's targets ask.

Two renders per held-out identity, through the same pipeline ``flashportrait render`` uses:

- **self-reenactment**: the identity's neutral portrait + the expression features of its own clip; the clip is the
  ground truth, so PSNR/SSIM are measured, next to the trivial baseline "repeat the reference frame";
- **cross-reenactment**: the portrait of identity k driven by the clip of identity k+1 (the demo's use).

Per render: identity (dlib ResNet distance of every other output frame to the reference; the share below dlib's
same-person threshold), expression (mouth and eye correlation of our landmark tracker on output vs driving), and
how much of a frame changes from the reference when the mouth is open (it animates, it does not copy). Because all
pseudo-identities derive from one face, dlib also rates other identities' portraits as close: the figures include
that control (distance of the output to *another* identity's portrait), so "same person" is read against it.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from .. import quality
from ..pipeline_flashportrait import FlashPortraitPipeline, GenerationRequest
from ..presets import ModelPreset
from .data import Clip


logger = logging.getLogger(__name__)

MOUTH_OPEN = 0.5  # ground-truth mouth_open above this counts as "mouth open" for the changed-pixel figure


def render(pipeline: FlashPortraitPipeline, reference: np.ndarray, features: np.ndarray, seed: int) -> np.ndarray:
    """Frames 1 … N−1 of the driving clip (the pipeline drops frame 0, the reconstructed reference)."""
    request = GenerationRequest(reference=reference, expression_features=features, prompt="", seed=seed)
    return pipeline(request).frames


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


@torch.no_grad()
def vae_copy(components, reference: np.ndarray) -> np.ndarray:
    """The reference through the VAE (encode → decode, one frame): what a model that copies it would output, blur
    included — the baseline of the changed-pixel figure, so VAE error is not counted as animation."""
    video = torch.from_numpy(reference).permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0).unsqueeze(2)
    decoded = components.vae.decode(components.vae.encode(video).latent_dist.mode()).sample.clamp(-1, 1)
    return ((decoded[0, :, 0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()


def figures(
    output: np.ndarray, reference: np.ndarray, driving: Clip, other_reference: np.ndarray, fps: float, copy: np.ndarray
) -> dict:
    truth = driving.frames[1 : 1 + len(output)]
    identity = quality.identity_score(reference, output, every=2)
    control = quality.identity_score(other_reference, output, every=4)
    expression = quality.expression_correlation(output, truth, fps)
    mouth_open = driving.truth["mouth_open"][1 : 1 + len(output)] > MOUTH_OPEN
    changed = [quality.changed_pixel_fraction(frame, reference) for frame in output[mouth_open]]
    changed_vs_copy = [quality.changed_pixel_fraction(frame, copy) for frame in output[mouth_open]]
    return {
        "identity_mean_distance": identity.mean_distance,
        "identity_fraction_same": identity.fraction_same,
        "identity_frames_without_face": identity.frames_without_face,
        "control_distance_to_other_identity": control.mean_distance,
        "mouth_r": expression.mouth_r,
        "eye_r": expression.eye_r,
        "head_pose_mae_deg": expression.head_pose_mae_deg,
        "expression_note": expression.reason,
        "changed_fraction_mouth_open": _finite_mean(changed),
        "changed_fraction_mouth_open_vs_vae_copy": _finite_mean(changed_vs_copy),
        "mouth_open_frames": int(mouth_open.sum()),
    }


def evaluate_preset(preset: ModelPreset, held_out: list[Clip], *, fps: float, seed: int = 7) -> dict:
    """Self- and cross-reenactment figures per held-out identity, and their means."""
    from ..components import build_components

    pipeline = FlashPortraitPipeline(build_components(preset))
    rows = []
    for k, clip in enumerate(held_out):
        other = held_out[(k + 1) % len(held_out)]
        copy = vae_copy(pipeline.components, clip.reference)
        started = time.perf_counter()
        output = render(pipeline, clip.reference, clip.features, seed)
        seconds = time.perf_counter() - started
        truth = clip.frames[1 : 1 + len(output)]
        baseline = quality.trivial_baseline(clip.reference, len(output))
        self_row = {
            "mode": "self",
            "identity": clip.identity,
            "seconds_render": round(seconds, 2),
            "psnr_db": quality.psnr(output, truth),
            "ssim": quality.ssim(output, truth),
            "baseline_psnr_db": quality.psnr(baseline, truth),
            "baseline_ssim": quality.ssim(baseline, truth),
            **figures(output, clip.reference, clip, other.reference, fps, copy),
        }
        cross_output = render(pipeline, clip.reference, other.features, seed)
        cross_row = {
            "mode": "cross",
            "identity": clip.identity,
            "driving_identity": other.identity,
            **figures(cross_output, clip.reference, other, other.reference, fps, copy),
        }
        logger.info("evaluate %d: self %s / cross %s", clip.identity, _short(self_row), _short(cross_row))
        rows += [self_row, cross_row]
    return {"preset": preset.name, "version": preset.version, "rows": rows, "means": _means(rows)}


def _short(row: dict) -> str:
    keys = ("psnr_db", "baseline_psnr_db", "identity_fraction_same", "mouth_r", "eye_r", "changed_fraction_mouth_open")
    return ", ".join(f"{k}={row[k]:.3g}" for k in keys if k in row and isinstance(row[k], float))


def _means(rows: list[dict]) -> dict:
    out = {}
    for mode in ("self", "cross"):
        picked = [r for r in rows if r["mode"] == mode]
        keys = [k for k, v in picked[0].items() if isinstance(v, float)]
        out[mode] = {k: _finite_mean([r[k] for r in picked]) for k in keys}
    return out
