"""The step-distillation fast path: merge ``fast_lora_rank64.safetensors`` into the transformer the official way.

The official ``fast_infer.py`` (LightX2V-style) adds the LoRA straight into the weights, in the parameter dtype, with
NO alpha/rank scaling (``.alpha`` keys are ignored) — diffusers' own LightX2V conversion does scale by alpha/rank and
drops the norm ``.diff`` keys, so using it would not give the official result. The rules, on Wan-native key names
(a ``diffusion_model.`` prefix is stripped):

- ``X.lora_down.weight`` + ``X.lora_up.weight`` (or ``lora_A`` / ``lora_B``):  W[X.weight] += s · (up @ down)
  (2-D weights, and 4-D convolutions through their 2-D kernels — other shapes are skipped, as officially);
- ``X.diff`` → ``X.weight`` (or ``X`` itself when there is no ``X.weight``, e.g. ``modulation``), ``X.diff_b`` →
  ``X.bias``, ``X.diff_m`` → ``X.modulation``:  W += s · diff.

The 4-step schedule itself is the ``flashportrait-14b-fast`` preset (``presets.step_distill_sigmas``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError, read_state_dict, wan_transformer_names
from .presets import FLASHPORTRAIT_14B_FAST, step_distill_sigmas


logger = logging.getLogger(__name__)

PREFIX = "diffusion_model."


@dataclass
class LoraMergeReport:
    """What the merge did; ``skipped`` lists targets that exist in the file but not (or not in shape) in the model."""

    low_rank: int = 0
    diffs: int = 0
    ignored_alpha: int = 0
    skipped: list[str] = field(default_factory=list)


def _targets(keys: list[str]) -> tuple[dict[str, tuple[str, str]], dict[str, list[str]], int]:
    """Official parsing: {weight target: (down key, up key)}, {diff key: candidate targets}, number of alpha keys."""
    pairs: dict[str, tuple[str, str]] = {}
    diffs: dict[str, list[str]] = {}
    alphas = 0
    present = set(keys)
    for key in keys:
        base = key.removeprefix(PREFIX)
        for down, up in (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight")):
            if key.endswith(down):
                if key.replace(down, up) in present:
                    pairs[base.replace("." + down, ".weight")] = (key, key.replace(down, up))
                break
        else:
            if key.endswith(".diff"):
                diffs[key] = [base.replace(".diff", ".weight"), base.replace(".diff", "")]
            elif key.endswith(".diff_b"):
                diffs[key] = [base.replace(".diff_b", ".bias")]
            elif key.endswith(".diff_m"):
                diffs[key] = [base.replace(".diff_m", ".modulation")]
            elif key.endswith(".alpha"):
                alphas += 1
    return pairs, diffs, alphas


def _ours(wan_name: str, params: dict[str, nn.Parameter]) -> str | None:
    name = next(iter(wan_transformer_names([wan_name])))
    return name if name in params else None


@torch.no_grad()
def merge_step_distill_lora(transformer: nn.Module, path: str | Path, strength: float = 1.0) -> LoraMergeReport:
    """Add the step-distill LoRA in ``path`` into ``transformer``'s weights (in their dtype), the official way.

    Raises:
        CheckpointError: unreadable file, or not a single tensor of it matched the model (wrong file).
    """
    lora = {k: v.to(torch.float32) for k, v in read_state_dict(path).items()}  # official: loaded fp32, then cast
    params = dict(transformer.named_parameters())
    pairs, diffs, alphas = _targets(list(lora))
    report = LoraMergeReport(ignored_alpha=alphas)

    for target, (down_key, up_key) in pairs.items():
        name = _ours(target, params)
        if name is None:
            report.skipped.append(target)
            continue
        param = params[name]
        down, up = lora[down_key].to(param.dtype), lora[up_key].to(param.dtype)
        if param.shape == (up.shape[0], down.shape[1]):
            param.data += strength * torch.matmul(up, down)
        elif param.ndim == 4 and param.shape[:2] == (up.shape[0], down.shape[1]):
            delta = torch.matmul(up.flatten(1) if up.ndim == 4 else up, down.flatten(1) if down.ndim == 4 else down)
            param.data += strength * delta[:, :, None, None]
        else:
            report.skipped.append(f"{target} (model {list(param.shape)})")
            continue
        report.low_rank += 1

    for diff_key, candidates in diffs.items():
        name = next((n for n in (_ours(c, params) for c in candidates) if n is not None), None)
        if name is None or params[name].shape != lora[diff_key].shape:
            report.skipped.append(candidates[0])
            continue
        param = params[name]
        param.data += strength * lora[diff_key].to(param.dtype)
        report.diffs += 1

    if report.low_rank + report.diffs == 0:
        raise CheckpointError(
            f"{path}: none of its {len(lora)} tensors matches a transformer weight (expected Wan-native names like "
            "'diffusion_model.blocks.0.self_attn.q.lora_down.weight'); is it the step-distill LoRA?"
        )
    if report.skipped:
        logger.warning("step-distill LoRA: %d targets not in the model: %s", len(report.skipped), report.skipped[:10])
    logger.info(
        "step-distill LoRA merged: %d low-rank updates, %d diffs, %d alpha keys ignored",
        report.low_rank,
        report.diffs,
        report.ignored_alpha,
    )
    return report


__all__ = ["FLASHPORTRAIT_14B_FAST", "LoraMergeReport", "merge_step_distill_lora", "step_distill_sigmas"]
