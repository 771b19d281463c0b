"""Named, versioned model presets: every dimension and sampling default of one model in one frozen value.

``tiny`` runs on a CPU in seconds with weights drawn from a fixed seed (it renders structured noise, not a
portrait: there is no trained tiny model yet). ``flashportrait-14b`` carries the released model's dimensions
(Wan2.1-I2V-14B-720P + FlashPortrait) and the official inference defaults; its weights come from checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .portrait_encoder import PortraitEncoderConfig


@dataclass(frozen=True)
class SamplingDefaults:
    num_inference_steps: int = 30
    shift: float = 5.0
    emo_cfg_scale: float = 4.0
    text_cfg_scale: float = 1.0
    ip_scale: float = 1.0
    context_size: int = 51  # latent frames per window
    context_overlap: int = 30
    width: int = 720
    height: int = 720
    fps: float = 25.0
    # An explicit sigma grid (decreasing, no final 0) replacing the shifted scheduler grid: the step-distilled path.
    sigmas: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelPreset:
    name: str
    version: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]  # transformers UMT5 config
    image_encoder: dict[str, Any]  # transformers CLIPVisionConfig
    portrait_encoder: PortraitEncoderConfig
    sampling: SamplingDefaults
    dtype: str = "float32"
    init_seed: int | None = None  # random initialisation seed; None = weights must come from checkpoints
    # Trained weights shipped with the package (a file under model/weights/, safetensors) and their SHA-256: loaded
    # over the seeded initialisation of the transformer, portrait encoder and VAE; the text and image encoders stay
    # the seeded ones (frozen while training, so the trained parts learned to read exactly those).
    weights: str | None = None
    weights_sha256: str | None = None
    tokenizer: str = "bytes"  # "bytes" (built in) or a path to the umt5 tokenizer folder
    negative_prompt: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text_len(self) -> int:
        return int(self.transformer["text_len"])

    @property
    def patch_multiple(self) -> int:
        """Width and height must be multiples of this: VAE stride 8 × patch 2 = 16."""
        return 8 * int(self.transformer["patch_size"][1])


# The stock Wan2.1 negative prompt (official default, used only when text CFG is on).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)

TINY = ModelPreset(
    name="tiny",
    version="tiny-v1",
    transformer=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36,
        out_channels=16,
        text_dim=16,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=16,
        added_kv_proj_dim=24,
        rope_max_seq_len=1024,
        expression_dim=32,
        text_len=64,
    ),
    vae=dict(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ),
    text_encoder=dict(
        vocab_size=260,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
    ),
    image_encoder=dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    ),
    portrait_encoder=PortraitEncoderConfig(
        width=32,
        resampler_dim=32,
        resampler_depth=1,
        resampler_heads=2,
        resampler_head_dim=16,
        mouth_queries=4,
        emotion_queries=2,
        ff_mult=2,
    ),
    sampling=SamplingDefaults(
        num_inference_steps=6,
        context_size=5,
        context_overlap=2,
        width=64,
        height=64,
        fps=12.0,
    ),
    init_seed=20251216,
    notes="Randomly initialised from a fixed seed: renders structured noise, not a portrait.",
)

# The demo model: trained here, on CPU, by our trainer (model/training/: `flashportrait train` of demo-v1.toml, then
# of demo.toml, which continues it) on synthetic pseudo-identities; the embedded default of `make demo` and
# `flashportrait render`. 96×96 at 12 fps.
DEMO = ModelPreset(
    name="demo",
    version="demo-v2",
    transformer=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=36,
        out_channels=16,
        text_dim=16,
        freq_dim=64,
        ffn_dim=384,
        num_layers=8,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=16,
        added_kv_proj_dim=128,  # heads × head dim: the image keys/values share the attention's width
        rope_max_seq_len=1024,
        expression_dim=128,
        text_len=32,
    ),
    vae=dict(
        base_dim=16,
        z_dim=16,
        dim_mult=[1, 2, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ),
    text_encoder=TINY.text_encoder,
    image_encoder=TINY.image_encoder,
    portrait_encoder=PortraitEncoderConfig(
        width=128,
        resampler_dim=64,
        resampler_depth=1,
        resampler_heads=2,
        resampler_head_dim=32,
        mouth_queries=4,
        emotion_queries=2,
        ff_mult=2,
    ),
    sampling=SamplingDefaults(
        num_inference_steps=20,
        emo_cfg_scale=2.0,
        context_size=5,
        context_overlap=2,
        width=96,
        height=96,
        fps=12.0,
    ),
    init_seed=20261203,
    weights="weights/demo-v2.safetensors",
    weights_sha256="af0b152aa0c5ca52e157bc0f377bcb9a424113c726e06b85e5607f4a81c7242d",
    notes="Trained on CPU on synthetic pseudo-identities (model/training/): animates a frontal face at 96×96.",
)

FLASHPORTRAIT_14B = ModelPreset(
    name="flashportrait-14b",
    version="flashportrait-14b-v1",
    transformer=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=40,
        attention_head_dim=128,
        in_channels=36,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=13824,
        num_layers=40,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=1280,
        added_kv_proj_dim=5120,
        rope_max_seq_len=1024,
        expression_dim=2048,
        text_len=512,
    ),
    vae=dict(
        base_dim=96,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
    ),
    text_encoder=dict(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
    ),
    image_encoder=dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=1024,
        hidden_act="gelu",
    ),
    portrait_encoder=PortraitEncoderConfig(),
    sampling=SamplingDefaults(),
    dtype="bfloat16",
    init_seed=None,
    tokenizer="google/umt5-xxl",
    negative_prompt=WAN_NEGATIVE_PROMPT,
    notes="Released FlashPortrait on Wan2.1-I2V-14B-720P; weights from the official checkpoints.",
)


def step_distill_sigmas(shift: float = 5.0, steps: tuple[int, ...] = (1000, 750, 500, 250)) -> tuple[float, ...]:
    """The official fast path's sigmas: shift(σ) = sσ/(1+(s−1)σ) on linspace(1, 0, 1001)[:-1], at 1000 − step.

    Computed in float32 exactly as the official StepDistillScheduler does, so the timesteps σ·1000 the transformer
    sees are the same bits: [1.0, 0.9375, 0.8333, 0.625] for the default list.
    """
    sigmas = torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return tuple(float(sigmas[1000 - step]) for step in steps)


# The released model with the step-distill LoRA (fast_lora_rank64.safetensors) merged: the official fast_infer.py
# schedule — 4 Euler steps on a fixed sigma grid — with the same emotion CFG (2 passes per window and step).
FLASHPORTRAIT_14B_FAST = dataclasses.replace(
    FLASHPORTRAIT_14B,
    name="flashportrait-14b-fast",
    version="flashportrait-14b-fast-v1",
    sampling=dataclasses.replace(FLASHPORTRAIT_14B.sampling, num_inference_steps=4, sigmas=step_distill_sigmas()),
    notes="Released FlashPortrait + the step-distill LoRA merged (official fast_infer.py): 4 steps.",
    extra={"step_distill_lora": "fast_lora_rank64.safetensors"},
)

PRESETS: dict[str, ModelPreset] = {p.name: p for p in (TINY, DEMO, FLASHPORTRAIT_14B, FLASHPORTRAIT_14B_FAST)}
# What `make demo`, `flashportrait render/batch` and the deployments use when no preset is named.
DEFAULT_PRESET = DEMO.name


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
