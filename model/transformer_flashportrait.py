"""FlashPortrait transformer: Wan2.1-I2V with per-frame facial-expression cross-attention (arXiv 2512.16900).

Reads like the paper, top to bottom:

1. per-frame expression attention — the queries of latent frame f attend only to the expression tokens of frame f;
2. the Normalized Facial Expression Block (NFEB) — that output is re-normalised to the scalar mean and unbiased std
   of the (text + image) cross-attention output of the same block, over every token and channel of the window;
3. the cross-attention processor that adds ``ip_scale`` × the normalised branch before the shared output projection;
4. the model: diffusers' ``WanTransformer3DModel`` with ``emo_k_proj`` / ``emo_v_proj`` in every block's ``attn2``,
   whose checkpoint function binds each call's expression inputs to its blocks for backward's recomputation;
5. feature sites for Adaptive Latent Prediction (``model/alp.py``): diffusers ``ModelHook``s on the blocks (or on
   their attn1/attn2/FFN modules) that record residual features on full calls and substitute forecasts on predicted
   calls, so the cheap live path (patch embedding, time/text/image embeddings, gates, ``norm_out``/``proj_out``)
   still runs at the current x and t.

Everything else (self-attention with RoPE, FFN, modulation, head) is diffusers' Wan code, imported, not copied.
State-dict keys are diffusers' names plus ``blocks.{i}.attn2.emo_{k,v}_proj.weight``, the official file's
``blocks.{i}.cross_attn.emo_{k,v}_proj.weight`` after diffusers' Wan key mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.utils.checkpoint
from diffusers.configuration_utils import register_to_config
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanTransformer3DModel,
    _get_added_kv_projections,
    _get_qkv_projections,
)
from torch import nn


# Epsilon on the expression branch's std, as in the official NFEB.
NFEB_EPS = 1e-5


# 1. Per-frame expression attention ------------------------------------------------------------------------------
def per_frame_expression_attention(
    query: torch.Tensor, expression_key: torch.Tensor, expression_value: torch.Tensor
) -> torch.Tensor:
    """Attention of each latent frame's queries over that frame's expression tokens only.

    Tokens are frame-major (f, h, w), so the query sequence splits into F equal runs of P = L // F tokens.
    No mask: the zero rows the official token split appends to frame 0 take part in the softmax (their keys are 0
    because the projections have no bias), exactly as the released weights were trained.

    query:            [B, L, H, D]  (after ``norm_q``; no RoPE in cross-attention)
    expression_key:   [B, F, G, H, D]
    expression_value: [B, F, G, H, D]
    returns           [B, L, H*D]
    """
    batch, seq_len, heads, head_dim = query.shape
    frames, group = expression_key.shape[1], expression_key.shape[2]
    if seq_len % frames:
        raise ValueError(
            f"per-frame expression attention: {seq_len} video tokens do not split into {frames} latent frames; "
            "the expression tokens must cover exactly the window's latent frames"
        )
    tokens_per_frame = seq_len // frames
    query_f = query.reshape(batch * frames, tokens_per_frame, heads, head_dim)  # [B*F, P, H, D]
    key_f = expression_key.reshape(batch * frames, group, heads, head_dim)  # [B*F, G, H, D]
    value_f = expression_value.reshape(batch * frames, group, heads, head_dim)
    out = dispatch_attention_fn(query_f, key_f, value_f, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.reshape(batch, seq_len, heads * head_dim).type_as(query)  # [B, L, H*D]


# 2. Normalized Facial Expression Block ---------------------------------------------------------------------------
def normalize_to_reference(expression: torch.Tensor, reference: torch.Tensor, eps: float = NFEB_EPS) -> torch.Tensor:
    """NFEB: give the expression branch the scalar mean and unbiased std of the main cross-attention branch.

    One (mean, std) pair per sample over all tokens and channels of the window, so the expression signal enters
    at the scale the pretrained block expects whatever the magnitude of the new projections.

    expression, reference: [B, L, C] → [B, L, C]
    """
    dims = tuple(range(1, expression.ndim))
    mean_y = expression.mean(dim=dims, keepdim=True)
    std_y = expression.std(dim=dims, keepdim=True, unbiased=True)
    mean_x = reference.mean(dim=dims, keepdim=True)
    std_x = reference.std(dim=dims, keepdim=True, unbiased=True)
    return (expression - mean_y) * std_x / (std_y + eps) + mean_x


# 3. Cross-attention processor -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpressionInputs:
    """What one forward call hands the processors: the window's grouped expression tokens and the branch gain.

    Immutable, one per call: a checkpointed block keeps a reference to its call's instance and recomputes with it
    in backward, whatever calls ran since.
    """

    tokens: torch.Tensor | None = None  # [B, F, G, C_expr]
    ip_scale: float = 1.0


class ExpressionSlot:
    """The ``ExpressionInputs`` bound while blocks run. The model owns one and every block's processor reads it, so
    diffusers' block and model ``forward`` stay untouched (they have no argument that could carry the tokens)."""

    def __init__(self) -> None:
        self.current = ExpressionInputs()

    @contextmanager
    def bound(self, inputs: ExpressionInputs) -> Iterator[None]:
        """Bind ``inputs`` for the enclosed block calls and restore what was bound before (calls may nest, e.g. a
        checkpointed block recomputed by a backward that runs inside another forward)."""
        previous, self.current = self.current, inputs
        try:
            yield
        finally:
            self.current = previous


class FlashPortraitCrossAttnProcessor:
    """Wan I2V cross-attention (text + image) plus the NFEB-normalised per-frame expression branch, reading the
    expression inputs bound in the model's ``ExpressionSlot``."""

    _attention_backend = None

    def __init__(self, slot: ExpressionSlot, text_len: int):
        self.slot = slot
        self.text_len = text_len

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # Context = [image tokens, text tokens] (diffusers concatenates them in that order).
        image_len = encoder_hidden_states.shape[1] - self.text_len
        context_img = encoder_hidden_states[:, :image_len]
        context_txt = encoder_hidden_states[:, image_len:]

        query, key, value = _get_qkv_projections(attn, hidden_states, context_txt)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, L, H, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        # 3a. Text attention + image attention = the main branch X.
        main = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        main = main.flatten(2, 3).type_as(query)  # [B, L, C]
        if image_len > 0:
            key_img, value_img = _get_added_kv_projections(attn, context_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            image = dispatch_attention_fn(query, key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False)
            main = main + image.flatten(2, 3).type_as(query)

        # 3b. Expression branch, normalised to X, added with ip_scale before the output projection.
        tokens, ip_scale = self.slot.current.tokens, self.slot.current.ip_scale
        out = main
        if tokens is not None and ip_scale != 0.0:
            tokens = tokens.to(dtype=attn.emo_k_proj.weight.dtype)
            expr_key = attn.emo_k_proj(tokens).unflatten(-1, (attn.heads, -1))  # [B, F, G, H, D]
            expr_value = attn.emo_v_proj(tokens).unflatten(-1, (attn.heads, -1))
            expression = per_frame_expression_attention(query, expr_key, expr_value)
            out = main + ip_scale * normalize_to_reference(expression, main)

        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# 4. Model ---------------------------------------------------------------------------------------------------------
class FlashPortraitTransformer(WanTransformer3DModel):
    """``WanTransformer3DModel`` (I2V) whose cross-attention also reads per-frame expression tokens.

    Extra config: ``expression_dim`` (portrait-encoder token width, 2048 in the release) and ``text_len``
    (text-context length; Wan pads T5 output to 512).
    """

    _no_split_modules = ["WanTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 36,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = 1280,
        added_kv_proj_dim: int | None = 5120,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        expression_dim: int = 2048,
        text_len: int = 512,
    ) -> None:
        # Defaults are the released Wan2.1-I2V-14B-720P + FlashPortrait dimensions.
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        inner_dim = self.config.num_attention_heads * self.config.attention_head_dim
        self._expression_slot = ExpressionSlot()
        self._feature_call = _FeatureCall()
        for block in self.blocks:
            attn = block.attn2
            # Zero-initialised like the official model: a fresh branch adds nothing but the NFEB mean shift.
            attn.emo_k_proj = nn.Linear(expression_dim, inner_dim, bias=False)
            attn.emo_v_proj = nn.Linear(expression_dim, inner_dim, bias=False)
            nn.init.zeros_(attn.emo_k_proj.weight)
            nn.init.zeros_(attn.emo_v_proj.weight)
            attn.set_processor(FlashPortraitCrossAttnProcessor(self._expression_slot, text_len))

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = torch.utils.checkpoint.checkpoint
    ) -> None:
        """diffusers' single switch for checkpointing (``enable_`` and ``disable_gradient_checkpointing`` call it):
        install the caller's checkpoint function wrapped so that recomputation sees the expression inputs.

        In backward, a checkpointed block reruns after ``forward`` has returned and unbound its call's
        ``ExpressionInputs``; without the wrapper it would recompute without the expression branch (a different
        saved-tensor count, or silently wrong gradients).
        """
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func)
        self._gradient_checkpointing_func = _ExpressionCheckpoint(self._expression_slot, gradient_checkpointing_func)

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        expression_tokens: torch.Tensor | None = None,
        ip_scale: float = 1.0,
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        feature_cache: FeatureCache | None = None,
    ):
        """Wan forward with expression tokens [B, F, G, expression_dim] for the window's F latent frames.

        ``ip_scale=0`` (or no tokens) is exactly the plain Wan I2V cross-attention: the emotion-CFG
        unconditional branch. ``feature_cache`` (ALP) records the feature sites installed by
        ``enable_feature_sites`` on a full call, or forecasts them on a predicted call.
        """
        if expression_tokens is not None and expression_tokens.shape[1] != hidden_states.shape[2]:
            raise ValueError(
                f"expression_tokens cover {expression_tokens.shape[1]} latent frames but the latents have "
                f"{hidden_states.shape[2]}; group the window's tokens with split_expression_tokens first"
            )
        if feature_cache is not None and self._feature_call.layout is None:
            raise ValueError("a feature_cache needs feature sites: call enable_feature_sites(granularity) first")
        if feature_cache is not None and torch.is_grad_enabled() and self.gradient_checkpointing:
            # Checkpointed blocks rerun in backward: a recording call would record twice, a predicted call would
            # recompute the blocks it skipped.
            raise ValueError(
                "a feature_cache is for inference: call the transformer under torch.no_grad() (ALP's sampler does) "
                "or disable gradient checkpointing"
            )
        self._feature_call.cache = feature_cache
        try:
            with self._expression_slot.bound(ExpressionInputs(expression_tokens, float(ip_scale))):
                return super().forward(
                    hidden_states,
                    timestep,
                    encoder_hidden_states,
                    encoder_hidden_states_image,
                    return_dict=return_dict,
                    attention_kwargs=attention_kwargs,
                )
        finally:
            self._feature_call.cache = None
            self._feature_call.group_inputs.clear()

    def enable_feature_sites(self, granularity: str) -> FeatureSiteLayout:
        """Install (once per granularity) the hooks that let a ``feature_cache`` record or forecast features.

        Without a ``feature_cache`` in the call the hooks only forward to the original modules, so the output is
        the same bits as with no hooks installed.
        """
        layout = feature_site_layout(granularity, len(self.blocks))
        if self._feature_call.layout == layout:
            return layout
        if self._feature_call.layout is not None:
            HookRegistry.check_if_exists_or_initialize(self).remove_hook(_FEATURE_HOOK, recurse=True)
        for site, (kind, start, stop) in enumerate(zip(layout.kinds, layout.starts, layout.stops)):
            if kind == "stack":
                for index in range(start, stop):
                    hook = _BlockGroupHook(self._feature_call, site, index == start, index == stop - 1)
                    HookRegistry.check_if_exists_or_initialize(self.blocks[index]).register_hook(hook, _FEATURE_HOOK)
            else:
                module = getattr(self.blocks[start], kind)
                hook = _ModuleOutputHook(self._feature_call, site)
                HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, _FEATURE_HOOK)
        self._feature_call.layout = layout
        return layout


class _ExpressionCheckpoint:
    """The model's ``_gradient_checkpointing_func``: diffusers calls it as ``(block, hidden_states,
    encoder_hidden_states, temb, rotary_emb)`` once per block in the forward. It takes the expression inputs bound
    now, for this call, and checkpoints a ``_ExpressionBlock`` instead of the bare block, with the tokens as an
    extra checkpoint input — so the recomputation in backward rebinds exactly them (and, as an input, the tokens
    get their gradient under reentrant checkpointing too)."""

    def __init__(self, slot: ExpressionSlot, checkpoint: Callable):
        self.slot = slot
        self.checkpoint = checkpoint

    def __call__(self, block: nn.Module, *block_args):
        inputs = self.slot.current
        return self.checkpoint(_ExpressionBlock(block, self.slot, inputs.ip_scale), *block_args, inputs.tokens)


class _ExpressionBlock:
    """A block bound to one call's ``ip_scale``; called as ``(*block_args, tokens)`` by the checkpoint function,
    in the forward and again in backward's recomputation."""

    def __init__(self, block: nn.Module, slot: ExpressionSlot, ip_scale: float):
        self.block, self.slot, self.ip_scale = block, slot, ip_scale

    def __call__(self, *args):
        *block_args, tokens = args
        with self.slot.bound(ExpressionInputs(tokens, self.ip_scale)):
            return self.block(*block_args)


# 5. Feature sites for Adaptive Latent Prediction ------------------------------------------------------------------
_FEATURE_HOOK = "flashportrait_feature_sites"
MODULE_KINDS = ("attn1", "attn2", "ffn")


class FeatureCache(Protocol):
    """ALP's side of one transformer call: on a full call every site's feature is recorded, on a predicted call
    every site is forecast (and the blocks it stands for are skipped)."""

    forecasting: bool

    def record(self, site: int, feature: torch.Tensor) -> None: ...

    def forecast(self, site: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class FeatureSiteLayout:
    """Which features ALP forecasts. Site s covers blocks [starts[s], stops[s]); ``kinds[s]`` is ``"stack"`` for a
    residual R = h_stop − h_start of a block group, or ``attn1``/``attn2``/``ffn`` for that module's output (before
    its gate) in block ``starts[s]``. The layer gain w(l, i) compares sites of the same kind."""

    granularity: str
    kinds: tuple[str, ...]
    starts: tuple[int, ...]
    stops: tuple[int, ...]

    @property
    def num_sites(self) -> int:
        return len(self.kinds)


def feature_site_layout(granularity: str, num_layers: int) -> FeatureSiteLayout:
    """``stack`` (one residual for all blocks), ``groups:G`` (G contiguous groups whose sizes differ by ≤ 1),
    ``block`` (one residual per block) or ``module`` (attn1, attn2 and FFN outputs of every block)."""
    if granularity == "module":
        sites = [(kind, b, b + 1) for b in range(num_layers) for kind in MODULE_KINDS]
    else:
        groups = _num_groups(granularity, num_layers)
        bounds = [round(g * num_layers / groups) for g in range(groups + 1)]
        sites = [("stack", bounds[g], bounds[g + 1]) for g in range(groups)]
    kinds, starts, stops = zip(*sites)
    return FeatureSiteLayout(granularity, kinds, starts, stops)


def check_granularity(granularity: str) -> None:
    """Raise on a granularity that no model could have (the block count is checked when sites are installed)."""
    if granularity in ("stack", "block", "module"):
        return
    name, _, count = granularity.partition(":")
    if name != "groups" or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"unknown ALP granularity {granularity!r}; use 'stack', 'groups:G' (G ≥ 1 block groups), 'block' or "
            "'module'"
        )


def _num_groups(granularity: str, num_layers: int) -> int:
    check_granularity(granularity)
    if granularity == "stack":
        return 1
    if granularity == "block":
        return num_layers
    count = granularity.partition(":")[2]
    if int(count) > num_layers:
        raise ValueError(
            f"granularity {granularity!r} asks for {count} block groups but the transformer has {num_layers} blocks; "
            f"use at most groups:{num_layers} (or 'block')"
        )
    return int(count)


@dataclass
class _FeatureCall:
    """What the hooks of one forward call share: the cache, and each open group's input h_start."""

    cache: FeatureCache | None = None
    layout: FeatureSiteLayout | None = None
    group_inputs: dict[int, torch.Tensor] = field(default_factory=dict)


class _BlockGroupHook(ModelHook):
    """On every block of group ``site``: full call — record R = h_out(last) − h_in(first); predicted call — the
    first block returns h + R̂, the others return their input (skipped)."""

    def __init__(self, call: _FeatureCall, site: int, first: bool, last: bool):
        super().__init__()
        self.call, self.site, self.first, self.last = call, site, first, last

    def new_forward(self, module: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        cache = self.call.cache
        if cache is None:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        if cache.forecasting:
            if not self.first:
                return hidden_states
            return (hidden_states.float() + cache.forecast(self.site)).type_as(hidden_states)  # [B, L, C]
        if self.first:
            self.call.group_inputs[self.site] = hidden_states
        out = self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        if self.last:
            cache.record(self.site, out.float() - self.call.group_inputs.pop(self.site).float())
        return out


class _ModuleOutputHook(ModelHook):
    """On a block's attn1 / attn2 / FFN: record its output (the block applies the gates at the current t
    afterwards), or return the forecast instead of computing it."""

    def __init__(self, call: _FeatureCall, site: int):
        super().__init__()
        self.call, self.site = call, site

    def new_forward(self, module: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        cache = self.call.cache
        if cache is None:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        if cache.forecasting:
            return cache.forecast(self.site).to(hidden_states.dtype)  # [B, L, C]
        out = self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        cache.record(self.site, out)
        return out
