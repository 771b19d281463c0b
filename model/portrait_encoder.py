"""FlashPortrait PortraitEncoder: one per-frame expression vector → a short sequence of expression tokens.

Reads like the paper (arXiv 2512.16900, "facial expression features → expression tokens"), top to bottom:

1. config — the released checkpoint's sizes as defaults;
2. the projection tokens — four bias-free Linears (headpose, eye, emotion, mouth) through one SHARED LayerNorm,
   one token each, so the DiT sees every part of the face as its own token;
3. the Perceiver resampler (IP-Adapter style) — learned queries that attend to the mouth (resp. emotion) vector,
   giving 16 (resp. 4) richer tokens for the parts that carry most of the motion;
4. the encoder — per frame [headpose, eye, emo, mouth, 16 mouth-resampler, 4 emotion-resampler] = 24 tokens;
5. the per-latent-frame grouping of those tokens (the official split, off-by-one included, so the released
   transformer sees exactly what it was trained on).

Sub-module and parameter names equal the official ``portrait_encoder.pt`` keys (prefixes ``proj_model.``,
``mouth_proj_model.``, ``emo_proj_model.``), so that file loads with ``load_state_dict(strict=True)``.
The encoder is strictly per-frame: tokens of frame f depend only on the features of frame f.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn


# 1. Config --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PortraitEncoderConfig:
    """Sizes of the PortraitEncoder; the defaults are the released checkpoint's (164,463,616 parameters).

    Attributes:
        headpose_dim: length of the headpose part of the per-frame feature vector (PD-FGC: 6).
        eye_dim: length of the eye part (PD-FGC: 6).
        emotion_dim: length of the emotion part (PD-FGC: 30); also the emotion resampler's input width.
        mouth_dim: length of the mouth part (PD-FGC: 512); also the mouth resampler's input width.
        width: width of every output token; must equal the transformer's expression-token width (2048).
        resampler_dim: hidden width of both resamplers.
        resampler_depth: number of (attention, feed-forward) layers in each resampler.
        resampler_heads: attention heads in each resampler layer.
        resampler_head_dim: width of one attention head (inner width = heads × head_dim).
        mouth_queries: learned queries, hence output tokens, of the mouth resampler.
        emotion_queries: learned queries, hence output tokens, of the emotion resampler.
        ff_mult: hidden width of the resampler feed-forward = resampler_dim × ff_mult.
    """

    headpose_dim: int = 6
    eye_dim: int = 6
    emotion_dim: int = 30
    mouth_dim: int = 512
    width: int = 2048
    resampler_dim: int = 1280
    resampler_depth: int = 4
    resampler_heads: int = 20
    resampler_head_dim: int = 64
    mouth_queries: int = 16
    emotion_queries: int = 4
    ff_mult: int = 4

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"PortraitEncoderConfig.{field.name} must be a positive int (got {value!r}); "
                    f"the released checkpoint uses {field.default}"
                )

    @property
    def feature_dim(self) -> int:
        """Length of one frame's feature vector: [headpose, eye, emotion, mouth] (554 for PD-FGC)."""
        return self.headpose_dim + self.eye_dim + self.emotion_dim + self.mouth_dim

    @property
    def tokens_per_frame(self) -> int:
        """Expression tokens per RGB frame: 4 projection tokens + mouth queries + emotion queries (24)."""
        return 4 + self.mouth_queries + self.emotion_queries


# 2. Projection tokens ---------------------------------------------------------------------------------------------
class ExpressionProjection(nn.Module):
    """One token per face part: bias-free Linear to ``width``, then ONE LayerNorm shared by all four parts.

    Sharing the norm keeps the four tokens on a common scale; the official module registers the Linears in the
    order eye, emo, mouth, headpose (kept here so ``state_dict()`` iterates like the checkpoint) while the token
    order is headpose, eye, emo, mouth.
    """

    def __init__(self, config: PortraitEncoderConfig) -> None:
        super().__init__()
        self.eye_proj = nn.Linear(config.eye_dim, config.width, bias=False)
        self.emo_proj = nn.Linear(config.emotion_dim, config.width, bias=False)
        self.mouth_proj = nn.Linear(config.mouth_dim, config.width, bias=False)
        self.headpose_proj = nn.Linear(config.headpose_dim, config.width, bias=False)
        self.norm = nn.LayerNorm(config.width)

    def forward(
        self, headpose: torch.Tensor, eye: torch.Tensor, emotion: torch.Tensor, mouth: torch.Tensor
    ) -> torch.Tensor:
        """[N, part_dim] each → [N, 4, width] in the order headpose, eye, emo, mouth."""
        tokens = torch.stack(
            [self.headpose_proj(headpose), self.eye_proj(eye), self.emo_proj(emotion), self.mouth_proj(mouth)],
            dim=1,
        )  # [N, 4, width]
        return self.norm(tokens)


# 3. Perceiver resampler -------------------------------------------------------------------------------------------
class PerceiverAttention(nn.Module):
    """Learned queries attend to [inputs; queries] (Perceiver / IP-Adapter "Resampler" attention).

    Letting the queries also see themselves lets a query keep its own content when the input carries little
    for it. q and k are each scaled by head_dim**-0.25 (rather than the product by head_dim**-0.5) to keep fp16
    logits in range, and the softmax runs in fp32 for the same reason.
    """

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        # One fused projection whose chunk(2) gives k first, v second: the checkpoint stores it as one weight.
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)  # [N, H, T, D]

    def forward(self, inputs: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """inputs [N, S, dim], latents [N, Q, dim] → update for the latents [N, Q, dim]."""
        inputs = self.norm1(inputs)
        latents = self.norm2(latents)
        query = self._split_heads(self.to_q(latents))  # [N, H, Q, D]
        key, value = self.to_kv(torch.cat([inputs, latents], dim=1)).chunk(2, dim=-1)  # [N, S+Q, inner] each
        key, value = self._split_heads(key), self._split_heads(value)  # [N, H, S+Q, D]

        scale = self.head_dim**-0.25
        logits = (query * scale) @ (key * scale).transpose(-2, -1)  # [N, H, Q, S+Q]
        weights = torch.softmax(logits.float(), dim=-1).type(logits.dtype)
        out = weights @ value  # [N, H, Q, D]
        batch, _, queries, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, queries, self.heads * self.head_dim)  # [N, Q, inner]
        return self.to_out(out)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Pre-norm MLP with exact GELU; a Sequential so the checkpoint keys are ``.0`` (norm), ``.1`` and ``.3``."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class Resampler(nn.Module):
    """``num_queries`` learned queries read a short input sequence and come out as ``output_dim`` tokens.

    Here the input is ONE vector per frame (a 1-token sequence), so the resampler acts as a learned expansion of
    one feature vector into several tokens, each free to specialise on a different aspect of it.
    """

    def __init__(
        self,
        embedding_dim: int,
        output_dim: int,
        dim: int,
        depth: int,
        heads: int,
        head_dim: int,
        num_queries: int,
        ff_mult: int,
    ) -> None:
        super().__init__()
        # randn/sqrt(dim) keeps the initial queries at unit-ish norm per vector, as the checkpoint was trained from.
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, head_dim), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, S, embedding_dim] → [N, num_queries, output_dim]."""
        latents = self.latents.expand(x.shape[0], -1, -1)  # [N, Q, dim]
        x = self.proj_in(x)  # [N, S, dim]
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))  # [N, Q, output_dim]


# 4. Encoder -------------------------------------------------------------------------------------------------------
class PortraitEncoder(nn.Module):
    """Per-frame expression features [B, F, feature_dim] → expression tokens [B, F * tokens_per_frame, width].

    Per frame the tokens are [headpose, eye, emo, mouth] (projection tokens), then ``mouth_queries`` tokens of
    the mouth resampler, then ``emotion_queries`` tokens of the emotion resampler: the order the released
    transformer's expression attention was trained on.
    """

    def __init__(self, config: PortraitEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or PortraitEncoderConfig()
        resampler_sizes = {
            "output_dim": config.width,
            "dim": config.resampler_dim,
            "depth": config.resampler_depth,
            "heads": config.resampler_heads,
            "head_dim": config.resampler_head_dim,
            "ff_mult": config.ff_mult,
        }
        # 1. One token per face part.
        self.proj_model = ExpressionProjection(config)
        # 2. Mouth vector → mouth_queries tokens.
        self.mouth_proj_model = Resampler(config.mouth_dim, num_queries=config.mouth_queries, **resampler_sizes)
        # 3. Emotion vector → emotion_queries tokens.
        self.emo_proj_model = Resampler(config.emotion_dim, num_queries=config.emotion_queries, **resampler_sizes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, F, feature_dim] → tokens [B, F * tokens_per_frame, width].

        Raises:
            ValueError: if ``features`` is not 3-D or its last dimension is not ``config.feature_dim``.
        """
        config = self.config
        if features.ndim != 3 or features.shape[-1] != config.feature_dim:
            raise ValueError(
                f"PortraitEncoder expects features of shape [B, F, {config.feature_dim}] "
                f"([headpose {config.headpose_dim}, eye {config.eye_dim}, emotion {config.emotion_dim}, "
                f"mouth {config.mouth_dim}] per frame); got {tuple(features.shape)}"
            )
        batch, frames, _ = features.shape
        per_frame = features.reshape(batch * frames, config.feature_dim)  # [B*F, 554]
        headpose, eye, emotion, mouth = per_frame.split(
            [config.headpose_dim, config.eye_dim, config.emotion_dim, config.mouth_dim], dim=-1
        )  # [B*F, 6], [B*F, 6], [B*F, 30], [B*F, 512]

        # 1. Projection tokens.
        part_tokens = self.proj_model(headpose, eye, emotion, mouth)  # [B*F, 4, width]
        # 2. Mouth resampler over the mouth vector as a 1-token sequence.
        mouth_tokens = self.mouth_proj_model(mouth.unsqueeze(1))  # [B*F, 16, width]
        # 3. Emotion resampler over the emotion vector as a 1-token sequence.
        emotion_tokens = self.emo_proj_model(emotion.unsqueeze(1))  # [B*F, 4, width]

        tokens = torch.cat([part_tokens, mouth_tokens, emotion_tokens], dim=1)  # [B*F, 24, width]
        return tokens.reshape(batch, frames * config.tokens_per_frame, config.width)  # [B, F*24, width]


# 5. Tokens → latent frames ----------------------------------------------------------------------------------------
def expression_group_size(tokens_per_frame: int) -> int:
    """Expression tokens each latent frame attends to: 4 RGB frames × τ, plus the 1 leftover token (97 for τ=24)."""
    return 4 * tokens_per_frame + 1


def split_expression_tokens(tokens: torch.Tensor, num_rgb_frames: int, tokens_per_frame: int) -> torch.Tensor:
    """Group per-RGB-frame tokens by latent frame, exactly as the released transformer was trained.

    With τ = ``tokens_per_frame`` and N = ``num_rgb_frames`` = 4(L−1)+1 (the VAE maps RGB frame 0 to latent 0 and
    RGB frames 4i−3 … 4i to latent i):

    - group i ≥ 1 is the LAST token of RGB frame 4i−4 followed by all τ tokens of RGB frames 4i−3 … 4i, i.e. the
      token range [(4i−3)τ − 1, (4i+1)τ − 1] inclusive (for τ=24: [96i−73, 96i+23], 97 tokens). The extra leading
      token is an off-by-one of the official split, kept because the released weights were trained with it;
    - group 0 is the τ tokens of RGB frame 0 followed by 3τ+1 zero rows appended at the END (no mask is used
      downstream; the zero rows have zero keys and values because the expression projections have no bias).

    tokens: [B, N * τ, C] → [B, L, 4τ + 1, C]

    Raises:
        ValueError: if ``num_rgb_frames`` is not 4k+1, ``tokens_per_frame`` < 1, ``tokens`` is not 3-D, or the
            token count is not ``num_rgb_frames * tokens_per_frame``.
    """
    if tokens_per_frame < 1:
        raise ValueError(f"`tokens_per_frame` must be >= 1 (got {tokens_per_frame}); the PortraitEncoder gives 24")
    if num_rgb_frames < 1 or (num_rgb_frames - 1) % 4:
        nearest = max(1, (num_rgb_frames - 1) // 4 * 4 + 1)
        raise ValueError(
            f"`num_rgb_frames` must be 4k+1 (got {num_rgb_frames}); cut the video to e.g. {nearest} frames"
        )
    if tokens.ndim != 3 or tokens.shape[1] != num_rgb_frames * tokens_per_frame:
        raise ValueError(
            f"`tokens` must have shape [B, {num_rgb_frames * tokens_per_frame}, C] "
            f"({num_rgb_frames} RGB frames × {tokens_per_frame} tokens); got {tuple(tokens.shape)}"
        )
    batch, _, channels = tokens.shape
    tau = tokens_per_frame
    group = expression_group_size(tau)
    latent_frames = (num_rgb_frames - 1) // 4 + 1

    # Group 0: frame 0's τ tokens, then 3τ+1 zero rows at the end.
    padding = tokens.new_zeros(batch, group - tau, channels)
    first = torch.cat([tokens[:, :tau], padding], dim=1).unsqueeze(1)  # [B, 1, 4τ+1, C]

    # Groups i >= 1: start at (4i−3)τ − 1, length 4τ+1 (consecutive groups share one token).
    starts = torch.arange(1, latent_frames, device=tokens.device) * 4 * tau - 3 * tau - 1  # [L-1]
    index = starts[:, None] + torch.arange(group, device=tokens.device)[None, :]  # [L-1, 4τ+1]
    rest = tokens[:, index]  # [B, L-1, 4τ+1, C]
    return torch.cat([first, rest], dim=1)  # [B, L, 4τ+1, C]
