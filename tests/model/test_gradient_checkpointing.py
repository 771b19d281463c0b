"""Gradient checkpointing of the FlashPortrait transformer: backward must recompute the blocks with the expression
branch the forward ran, so checkpointing changes memory use and nothing else."""

from __future__ import annotations

import functools

import pytest
import torch

from flashportrait.model.portrait_encoder import expression_group_size
from flashportrait.model.presets import TINY
from flashportrait.model.transformer_flashportrait import FlashPortraitTransformer


FRAMES, HEIGHT, WIDTH = 3, 8, 8  # 3 latent frames of 4x4 = 16 tokens each after the 2x2 patch
GROUP = expression_group_size(TINY.portrait_encoder.tokens_per_frame)  # 4τ+1 tokens per latent frame


def tiny_model() -> FlashPortraitTransformer:
    torch.manual_seed(0)
    model = FlashPortraitTransformer(**TINY.transformer)
    for block in model.blocks:  # zero-initialised projections would give the branch zero gradients either way
        torch.nn.init.normal_(block.attn2.emo_k_proj.weight)
        torch.nn.init.normal_(block.attn2.emo_v_proj.weight)
    return model


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cfg = TINY.transformer
    return dict(
        hidden_states=torch.randn(1, cfg["in_channels"], FRAMES, HEIGHT, WIDTH, generator=g),
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=torch.randn(1, cfg["text_len"], cfg["text_dim"], generator=g),
        encoder_hidden_states_image=torch.randn(1, 17, cfg["image_dim"], generator=g),
        expression_tokens=torch.randn(1, FRAMES, GROUP, cfg["expression_dim"], generator=g),
    )


def gradients(model: FlashPortraitTransformer, ip_scale: float) -> dict[str, torch.Tensor | None]:
    """Parameter gradients (and the expression tokens' gradient, as ``tokens``) of a fixed scalar loss."""
    model.zero_grad(set_to_none=True)
    x = inputs()
    x["expression_tokens"].requires_grad_(True)
    out = model(**x, ip_scale=ip_scale).sample
    weights = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)  # not a plain sum: every output matters apart
    (out * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads["tokens"] = x["expression_tokens"].grad
    return grads


def assert_same_gradients(expected: dict, got: dict) -> None:
    """Same gradients to float32 rounding: reentrant checkpointing sums the tokens' per-block contributions in
    another order, so bit equality is too strict, but a missing or wrong branch is off by orders of magnitude."""
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] is None) == (got[name] is None), name
        if expected[name] is not None:
            torch.testing.assert_close(
                got[name], expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )


CHECKPOINT_FUNCS = {
    "diffusers-default": None,  # diffusers' own: torch.utils.checkpoint, non-reentrant
    "reentrant": functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True),
}


@pytest.mark.parametrize("checkpoint_func", CHECKPOINT_FUNCS.values(), ids=CHECKPOINT_FUNCS.keys())
def test_checkpointed_gradients_match_including_the_expression_branch(checkpoint_func):
    model = tiny_model()
    expected = gradients(model, ip_scale=1.0)
    model.enable_gradient_checkpointing(checkpoint_func)
    got = gradients(model, ip_scale=1.0)
    assert_same_gradients(expected, got)
    # The expression branch really took part, in the recomputation too.
    for i in range(len(model.blocks)):
        for proj in ("emo_k_proj", "emo_v_proj"):
            assert got[f"blocks.{i}.attn2.{proj}.weight"].abs().max() > 1e-6, (i, proj)
    assert got["tokens"].abs().max() > 1e-6


def test_checkpointed_gradients_match_with_the_expression_branch_off():
    """ip_scale = 0 is the emotion-CFG unconditional branch: no gradient reaches the expression projections or the
    tokens, with or without checkpointing."""
    model = tiny_model()
    expected = gradients(model, ip_scale=0.0)
    model.enable_gradient_checkpointing()
    got = gradients(model, ip_scale=0.0)
    assert_same_gradients(expected, got)
    assert got["blocks.0.attn2.emo_k_proj.weight"] is None and got["tokens"] is None


def test_recomputation_uses_each_calls_own_expression_inputs():
    """Two forwards (different ip_scale) before one backward: each call's blocks recompute with that call's
    tokens and ip_scale, not with whatever the model saw last."""
    model = tiny_model()
    x = inputs()
    reference = {}
    for scale in (1.0, 0.5):
        model.zero_grad(set_to_none=True)
        model(**x, ip_scale=scale).sample.square().mean().backward()
        reference[scale] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    expected = {n: reference[1.0][n] + reference[0.5][n] for n in reference[1.0]}
    model.enable_gradient_checkpointing()
    model.zero_grad(set_to_none=True)
    first = model(**x, ip_scale=1.0).sample.square().mean()
    second = model(**x, ip_scale=0.5).sample.square().mean()
    (first + second).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_same_gradients(expected, got)


@pytest.mark.parametrize("granularity", ["block", "module"])
def test_checkpointing_with_alp_feature_sites_installed(granularity):
    """The ALP hooks wrap the blocks (or their modules); without a feature cache they only forward, so the
    checkpointed gradients stay those of the plain model."""
    model = tiny_model()
    expected = gradients(model, ip_scale=1.0)
    model.enable_feature_sites(granularity)
    model.enable_gradient_checkpointing()
    assert_same_gradients(expected, gradients(model, ip_scale=1.0))


def test_feature_cache_with_checkpointed_grad_is_refused():
    """A feature cache records on the forward and would be skipped (or record twice) on the recomputation."""
    model = tiny_model()
    model.enable_feature_sites("block")
    model.enable_gradient_checkpointing()

    class Cache:
        forecasting = False

        def record(self, site, feature):
            pass

        def forecast(self, site):
            raise AssertionError("not forecasting")

    with pytest.raises(ValueError, match="feature_cache is for inference"):
        model(**inputs(), feature_cache=Cache())
    with torch.no_grad():  # ALP's own calls run without grad, where diffusers does not checkpoint
        model(**inputs(), feature_cache=Cache())
