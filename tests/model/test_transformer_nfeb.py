"""The Normalized Facial Expression Block and the per-frame expression attention."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from flashportrait.model import transformer_flashportrait as tfp
from flashportrait.model.presets import TINY
from flashportrait.model.transformer_flashportrait import (
    FlashPortraitTransformer,
    normalize_to_reference,
    per_frame_expression_attention,
)


FRAMES, HEIGHT, WIDTH = 3, 8, 8  # 3 latent frames of 4x4 = 16 tokens each after the 2x2 patch


def tiny_model(seed: int = 0) -> FlashPortraitTransformer:
    torch.manual_seed(seed)
    model = FlashPortraitTransformer(**TINY.transformer).eval()
    for block in model.blocks:  # released weights are non-zero; a zero branch would hide locality bugs
        torch.nn.init.normal_(block.attn2.emo_k_proj.weight)
        torch.nn.init.normal_(block.attn2.emo_v_proj.weight)
    return model


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = TINY.transformer
    return dict(
        hidden_states=torch.randn(1, cfg["in_channels"], FRAMES, HEIGHT, WIDTH, generator=g),
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=torch.randn(1, cfg["text_len"], cfg["text_dim"], generator=g),
        encoder_hidden_states_image=torch.randn(1, 17, cfg["image_dim"], generator=g),
        expression_tokens=torch.randn(1, FRAMES, 41, cfg["expression_dim"], generator=g),
    )


def test_nfeb_matches_per_sample_mean_and_unbiased_std():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 10, 6, generator=g) * torch.tensor([3.0, 0.5]).view(2, 1, 1) + torch.tensor(
        [1.0, -2.0]
    ).view(2, 1, 1)
    expression = torch.randn(2, 10, 6, generator=g) * 7.0 + 4.0
    out = normalize_to_reference(expression, reference)
    for b in range(2):
        torch.testing.assert_close(out[b].mean(), reference[b].mean(), atol=1e-5, rtol=0)
        # eps = 1e-5 on σ_y: std(out) = σ_x·σ_y/(σ_y+1e-5), within 1e-5 relative of σ_x for σ_y ≈ 7
        torch.testing.assert_close(out[b].std(unbiased=True), reference[b].std(unbiased=True), atol=0, rtol=1e-5)


def test_ip_scale_zero_equals_plain_wan_cross_attention():
    model = tiny_model()
    config = {
        k: v for k, v in model.config.items() if k not in ("expression_dim", "text_len") and not k.startswith("_")
    }
    plain = WanTransformer3DModel(**config).eval()
    state = {k: v for k, v in model.state_dict().items() if "emo_" not in k}
    assert plain.load_state_dict(state, strict=True)
    x = inputs()
    tokens = x.pop("expression_tokens")
    # diffusers hard-codes a 512-token text context when splitting [image, text]; pad ours to 512 with zero rows
    # for the plain model (zero text tokens are what Wan pads with) and compare against our processor, which
    # reads the text length from the config, on the same padded context.
    padded = torch.cat(
        [x["encoder_hidden_states"], torch.zeros(1, 512 - TINY.text_len, TINY.transformer["text_dim"])], dim=1
    )
    for block in model.blocks:
        block.attn2.processor.text_len = 512
    with torch.no_grad():
        expected = plain(**{**x, "encoder_hidden_states": padded}).sample
        got = model(**{**x, "encoder_hidden_states": padded}, expression_tokens=tokens, ip_scale=0.0).sample
        with_expression = model(**{**x, "encoder_hidden_states": padded}, expression_tokens=tokens).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert (with_expression - expected).abs().max() > 1e-3  # and the branch does act when ip_scale = 1


def test_expression_attention_is_per_frame():
    g = torch.Generator().manual_seed(3)
    query = torch.randn(1, FRAMES * 16, 2, 12, generator=g)
    key = torch.randn(1, FRAMES, 41, 2, 12, generator=g)
    value = torch.randn(1, FRAMES, 41, 2, 12, generator=g)
    base = per_frame_expression_attention(query, key, value)
    key2, value2 = key.clone(), value.clone()
    key2[:, 1] += 1.0
    value2[:, 1] *= -3.0
    changed = per_frame_expression_attention(query, key2, value2)
    diff = (changed - base).abs().amax(dim=-1).view(FRAMES, 16).amax(dim=-1)
    assert diff[1] > 1e-2
    assert diff[0] == 0 and diff[2] == 0


def test_first_block_changes_only_frame_f_apart_from_the_window_statistics(monkeypatch):
    """Perturb frame 1's expression tokens. After block 0, frames 0 and 2 may differ only through NFEB's two
    window-wide scalars (μ_y, σ_y) — so with those scalars frozen at the unperturbed run's values, frames 0 and 2
    must come out bit-identical while frame 1 changes."""
    model = tiny_model()
    x = inputs()
    outputs: list[torch.Tensor] = []
    model.blocks[0].register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))
    frozen: dict[str, torch.Tensor] = {}
    original = tfp.normalize_to_reference

    def freezing_normalize(expression, reference, eps=tfp.NFEB_EPS):
        if "mean" not in frozen:  # first call = block 0 of the unperturbed run
            frozen["mean"] = expression.mean(dim=(1, 2), keepdim=True)
            frozen["std"] = expression.std(dim=(1, 2), keepdim=True)
        if len(frozen) == 2 and expression.shape == frozen.get("shape", expression.shape):
            mean_x = reference.mean(dim=(1, 2), keepdim=True)
            std_x = reference.std(dim=(1, 2), keepdim=True)
            return (expression - frozen["mean"]) * std_x / (frozen["std"] + eps) + mean_x
        return original(expression, reference, eps)

    monkeypatch.setattr(tfp, "normalize_to_reference", freezing_normalize)
    with torch.no_grad():
        model(**x)
        base = outputs[0]
        frozen_stats = dict(frozen)
        frozen.clear()
        frozen.update(frozen_stats)
        perturbed = dict(x)
        tokens = x["expression_tokens"].clone()
        tokens[:, 1] = torch.randn(tokens[:, 1].shape, generator=torch.Generator().manual_seed(9))
        perturbed["expression_tokens"] = tokens
        outputs.clear()
        model(**perturbed)
    after = outputs[0]
    per_frame = (after - base).abs().amax(dim=-1).view(FRAMES, -1).amax(dim=-1)  # tokens are frame-major
    assert per_frame[1] > 1e-3
    assert per_frame[0] == 0 and per_frame[2] == 0


def test_tokens_must_cover_the_window():
    model = tiny_model()
    x = inputs()
    x["expression_tokens"] = x["expression_tokens"][:, :2]
    with pytest.raises(ValueError, match="cover 2 latent frames but the latents have 3"):
        model(**x)


def test_state_dict_has_emo_projections_per_block():
    model = tiny_model()
    keys = set(model.state_dict())
    for i in range(TINY.transformer["num_layers"]):
        assert f"blocks.{i}.attn2.emo_k_proj.weight" in keys
        assert model.state_dict()[f"blocks.{i}.attn2.emo_v_proj.weight"].shape == (24, 32)  # [inner_dim, expr_dim]
