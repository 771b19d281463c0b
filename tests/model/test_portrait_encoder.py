"""PortraitEncoder: official key layout, per-frame token order, and the per-latent-frame token split."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from flashportrait.model.portrait_encoder import (
    PerceiverAttention,
    PortraitEncoder,
    PortraitEncoderConfig,
    expression_group_size,
    split_expression_tokens,
)


# Tiny sizes; the feature layout stays the real 6/6/30/512 so inputs are shaped like PD-FGC's.
TINY = PortraitEncoderConfig(
    width=8,
    resampler_dim=8,
    resampler_depth=1,
    resampler_heads=2,
    resampler_head_dim=4,
    mouth_queries=3,
    emotion_queries=2,
    ff_mult=2,
)
TAU = TINY.tokens_per_frame  # 4 + 3 + 2 = 9


def tiny_encoder() -> PortraitEncoder:
    torch.manual_seed(0)
    return PortraitEncoder(TINY).eval()


def features(batch: int = 2, frames: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, frames, TINY.feature_dim)


class TestConfig:
    def test_derived_sizes(self) -> None:
        default = PortraitEncoderConfig()
        assert default.feature_dim == 554  # 6 + 6 + 30 + 512
        assert default.tokens_per_frame == 24  # 4 + 16 + 4
        assert TAU == 9

    def test_rejects_non_positive(self) -> None:
        with pytest.raises(ValueError, match=r"PortraitEncoderConfig.width must be a positive int \(got 0\)"):
            PortraitEncoderConfig(width=0)

    def test_docstring_documents_every_field(self) -> None:
        documented = re.findall(r"^\s{8}(\w+):", PortraitEncoderConfig.__doc__ or "", flags=re.MULTILINE)
        assert documented == [field.name for field in fields(PortraitEncoderConfig)]


class TestCheckpointLayout:
    def test_tiny_state_dict_keys_are_the_official_names(self) -> None:
        resampler = [
            "latents",
            "proj_in.weight",
            "proj_in.bias",
            "layers.0.0.norm1.weight",
            "layers.0.0.norm1.bias",
            "layers.0.0.norm2.weight",
            "layers.0.0.norm2.bias",
            "layers.0.0.to_q.weight",
            "layers.0.0.to_kv.weight",
            "layers.0.0.to_out.weight",
            "layers.0.1.0.weight",
            "layers.0.1.0.bias",
            "layers.0.1.1.weight",
            "layers.0.1.3.weight",
            "proj_out.weight",
            "proj_out.bias",
            "norm_out.weight",
            "norm_out.bias",
        ]
        expected = [
            # Registered eye, emo, mouth, headpose, as in the official module.
            "proj_model.eye_proj.weight",
            "proj_model.emo_proj.weight",
            "proj_model.mouth_proj.weight",
            "proj_model.headpose_proj.weight",
            "proj_model.norm.weight",
            "proj_model.norm.bias",
            *(f"mouth_proj_model.{key}" for key in resampler),
            *(f"emo_proj_model.{key}" for key in resampler),
        ]
        assert list(tiny_encoder().state_dict()) == expected

    def test_shapes(self) -> None:
        state = tiny_encoder().state_dict()
        assert state["proj_model.headpose_proj.weight"].shape == (8, 6)
        assert state["proj_model.eye_proj.weight"].shape == (8, 6)
        assert state["proj_model.emo_proj.weight"].shape == (8, 30)
        assert state["proj_model.mouth_proj.weight"].shape == (8, 512)
        assert state["mouth_proj_model.latents"].shape == (1, 3, 8)
        assert state["emo_proj_model.latents"].shape == (1, 2, 8)
        assert state["mouth_proj_model.proj_in.weight"].shape == (8, 512)
        assert state["emo_proj_model.proj_in.weight"].shape == (8, 30)
        # Fused k/v: 2 × inner (2 heads × 4) = 16 rows.
        assert state["mouth_proj_model.layers.0.0.to_kv.weight"].shape == (16, 8)
        assert state["mouth_proj_model.layers.0.1.1.weight"].shape == (16, 8)  # dim × ff_mult = 16

    def test_released_parameter_count(self) -> None:
        with torch.device("meta"):
            encoder = PortraitEncoder()
        assert sum(p.numel() for p in encoder.parameters()) == 164_463_616  # reference §3, verified there


class TestForward:
    def test_output_shape(self) -> None:
        tokens = tiny_encoder()(features(batch=2, frames=3))
        assert tokens.shape == (2, 3 * TAU, 8)  # [B, F*τ, width]

    def test_frames_are_independent(self) -> None:
        encoder, x = tiny_encoder(), features(batch=1, frames=3)
        changed = x.clone()
        changed[0, 1] += 1.0
        before, after = encoder(x), encoder(changed)
        frame1 = slice(TAU, 2 * TAU)
        torch.testing.assert_close(after[:, :TAU], before[:, :TAU])
        torch.testing.assert_close(after[:, 2 * TAU :], before[:, 2 * TAU :])
        assert (after[:, frame1] - before[:, frame1]).abs().amax(dim=-1).min() > 1e-4  # every token of frame 1

    def test_token_order_headpose_first(self) -> None:
        encoder, x = tiny_encoder(), features(batch=1, frames=2)
        before = encoder(x).reshape(1, 2, TAU, 8)  # [B, F, τ, width]
        with torch.no_grad():
            encoder.proj_model.headpose_proj.weight.zero_()
        after = encoder(x).reshape(1, 2, TAU, 8)
        changed = (after - before).abs().amax(dim=(0, 3)) > 0  # [F, τ]
        expected = torch.zeros(2, TAU, dtype=torch.bool)
        expected[:, 0] = True
        assert torch.equal(changed, expected)

    def test_mouth_tokens_follow_the_projection_tokens(self) -> None:
        # Tokens 4..6 are the mouth resampler's, 7..8 the emotion resampler's.
        encoder, x = tiny_encoder(), features(batch=1, frames=1)
        before = encoder(x)[0]
        with torch.no_grad():
            encoder.emo_proj_model.proj_out.bias.add_(1.0)
        changed = ((encoder(x)[0] - before).abs().amax(dim=-1) > 0).tolist()
        assert changed == [False] * 7 + [True] * 2

    def test_rejects_wrong_feature_dim(self) -> None:
        with pytest.raises(ValueError, match=r"features of shape \[B, F, 554\].*got \(1, 2, 553\)"):
            tiny_encoder()(torch.zeros(1, 2, 553))


class TestPerceiverAttention:
    def test_equals_standard_attention_over_inputs_and_queries(self) -> None:
        # q·k scaled by head_dim**-0.25 on each side = the usual 1/sqrt(head_dim) on the product.
        torch.manual_seed(0)
        attention = PerceiverAttention(dim=8, heads=2, head_dim=4)
        inputs, latents = torch.randn(3, 1, 8), torch.randn(3, 5, 8)
        normed_x, normed_l = attention.norm1(inputs), attention.norm2(latents)
        q = attention.to_q(normed_l).view(3, 5, 2, 4).transpose(1, 2)
        kv = attention.to_kv(torch.cat([normed_x, normed_l], dim=1))
        k, v = (t.view(3, 6, 2, 4).transpose(1, 2) for t in kv.chunk(2, dim=-1))
        reference = attention.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 5, 8))
        torch.testing.assert_close(attention(inputs, latents), reference)

    def test_fused_kv_gives_keys_first(self) -> None:
        # Zeroing the second half of to_kv zeroes the VALUES, so the update is exactly 0.
        torch.manual_seed(0)
        attention = PerceiverAttention(dim=8, heads=2, head_dim=4)
        with torch.no_grad():
            attention.to_kv.weight[8:].zero_()
        out = attention(torch.randn(2, 1, 8), torch.randn(2, 3, 8))
        assert torch.equal(out, torch.zeros_like(out))


def index_tokens(num_rgb_frames: int, tau: int) -> torch.Tensor:
    """[1, N*τ, 1] whose values are their own token indices."""
    return torch.arange(num_rgb_frames * tau, dtype=torch.float32).reshape(1, -1, 1)


class TestSplitExpressionTokens:
    def test_group_size(self) -> None:
        assert expression_group_size(24) == 97  # 4 × 24 + 1

    def test_official_ranges_for_24_tokens_per_frame(self) -> None:
        # N = 9 RGB frames → L = (9 − 1) / 4 + 1 = 3 latent frames.
        groups = split_expression_tokens(index_tokens(9, 24), num_rgb_frames=9, tokens_per_frame=24)
        assert groups.shape == (1, 3, 97, 1)
        values = groups[0, :, :, 0]
        # Group 0: tokens 0..23 of RGB frame 0, then 97 − 24 = 73 zero rows at the end.
        assert torch.equal(values[0], torch.cat([torch.arange(24.0), torch.zeros(73)]))
        # Group i: [96i − 73, 96i + 23] → i=1: [23, 119], i=2: [119, 215].
        assert torch.equal(values[1], torch.arange(23.0, 120.0))
        assert torch.equal(values[2], torch.arange(119.0, 216.0))

    def test_general_tokens_per_frame(self) -> None:
        # τ = 3, N = 5 → L = 2; group 1 = [(4·1 − 3)·3 − 1, (4·1 + 1)·3 − 1] = [2, 14], 13 = 4·3 + 1 tokens.
        groups = split_expression_tokens(index_tokens(5, 3).repeat(2, 1, 4), num_rgb_frames=5, tokens_per_frame=3)
        assert groups.shape == (2, 2, 13, 4)
        assert torch.equal(groups[1, 1, :, 3], torch.arange(2.0, 15.0))
        assert torch.equal(groups[0, 0, :, 0], torch.tensor([0.0, 1.0, 2.0] + [0.0] * 10))

    def test_single_frame_is_group_zero_only(self) -> None:
        groups = split_expression_tokens(index_tokens(1, 24), num_rgb_frames=1, tokens_per_frame=24)
        assert groups.shape == (1, 1, 97, 1)

    def test_on_encoder_output(self) -> None:
        tokens = tiny_encoder()(features(batch=1, frames=5))  # [1, 5·9, 8]
        groups = split_expression_tokens(tokens, num_rgb_frames=5, tokens_per_frame=TAU)
        assert groups.shape == (1, 2, 37, 8)  # 4·9 + 1 = 37
        torch.testing.assert_close(groups[0, 1], tokens[0, TAU - 1 :])  # last token of frame 0, then frames 1..4

    def test_rejects_non_4k_plus_1(self) -> None:
        with pytest.raises(ValueError, match=r"`num_rgb_frames` must be 4k\+1 \(got 6\).*e\.g\. 5 frames"):
            split_expression_tokens(index_tokens(6, 24), num_rgb_frames=6, tokens_per_frame=24)

    def test_rejects_wrong_token_count(self) -> None:
        with pytest.raises(ValueError, match=r"shape \[B, 216, C\] \(9 RGB frames × 24 tokens\); got \(1, 215, 1\)"):
            split_expression_tokens(index_tokens(9, 24)[:, :-1], num_rgb_frames=9, tokens_per_frame=24)

    def test_rejects_bad_tokens_per_frame(self) -> None:
        with pytest.raises(ValueError, match=r"`tokens_per_frame` must be >= 1 \(got 0\)"):
            split_expression_tokens(index_tokens(1, 1), num_rgb_frames=1, tokens_per_frame=0)
