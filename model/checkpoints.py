"""Checkpoint files → modules: safe reading, strict key reports, low-memory assignment, official key layouts.

Why this module exists: the released FlashPortrait weights come as files in several layouts (the official
``transformer.pt`` with Wan-native key names, ``portrait_encoder.pt``, the Wan2.1 base in diffusers' folder layout or
in Wan's original single files), and a loader that silently leaves random weights behind renders plausible-looking
garbage. So every loader here

1. reads only tensors — safetensors, or ``torch.load(weights_only=True)`` (a pickle that carries code is refused, and
   its code never runs); an optional ``{"state_dict": ...}`` wrapper is unwrapped;
2. maps the file's key names onto ours with diffusers' own single-file converters where they exist
   (``convert_wan_transformer_to_diffusers``, ``convert_wan_vae_to_diffusers``) and with the small tables below where
   they do not (Wan's umt5 and open-clip ``.pth`` files → transformers' UMT5 / CLIP vision);
3. infers the dimensions from the tensors when the file has no config, so tiny test checkpoints and the released
   ones go through the same code;
4. compares the keys and shapes with the module's and raises :class:`CheckpointError` naming the file and every
   missing / unexpected / mis-shaped key before anything runs;
5. builds the module on the meta device and assigns each tensor in the run's dtype, so a 14B model is never held
   twice in RAM (``.pt`` files are memory-mapped, safetensors are read tensor by tensor).
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors import SafetensorError, safe_open
from torch import nn

from .portrait_encoder import PortraitEncoder, PortraitEncoderConfig


logger = logging.getLogger(__name__)

# Conventions that no tensor carries: Wan2.1 uses 128-wide attention heads in every model size, the portrait
# encoder's resamplers 64-wide heads (IP-Adapter), and the DiT pads the T5 context to 512 tokens.
WAN_HEAD_DIM = 128
RESAMPLER_HEAD_DIM = 64
WAN_TEXT_LEN = 512
# Lists in error messages are cut after this many keys (the count is always given).
MAX_LISTED_KEYS = 12

Shape = tuple[int, ...]


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: unreadable, unsafe, or its keys/shapes do not fit the module."""


# 1. Reading files --------------------------------------------------------------------------------------------------
def _torch_load(path: Path) -> object:
    """``torch.load`` that only materialises tensors; memory-mapped when the file is in the zip format."""
    try:
        mmap = zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if not found and not re.search(r"Unsupported (global|class)|not an allowed global", str(exc)):
            raise CheckpointError(
                f"cannot read {path}: not a complete PyTorch checkpoint (unpickling failed); the file is truncated or "
                "corrupt — download it again and compare its size with the published one"
            ) from None
        what = f" (it references {found.group(1)})" if found else ""
        raise CheckpointError(
            f"refused to load {path}: it is a pickle with Python objects other than tensors{what}, and only "
            "weights_only=True loading is allowed; re-save it as a plain state dict (torch.save(model.state_dict())) "
            "or as safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"cannot read {path}: not a complete PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]}); the "
            "file is truncated or corrupt — download it again and compare its size with the published one"
        ) from None


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} does not hold a state dict (a mapping of names to tensors, optionally under 'state_dict'); "
            f"found {type(obj).__name__}"
        )
    return {str(k): v for k, v in obj.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file (``.pt`` memory-mapped, not copied).

    Raises:
        CheckpointError: missing, truncated or corrupt file, a pickle with code, or no state dict inside.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist; download it first (see docs/released-model.md)")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read {path}: not a valid safetensors file ({exc}); it is truncated or corrupt — download it "
                "again"
            ) from None
    return _unwrap(_torch_load(path), path)


@dataclass
class TensorSource:
    """Tensors spread over one or more files, read lazily by key: shapes are known without loading the data.

    ``names`` maps the module's key → (file, key in that file); a converter may rename keys before they are listed.
    """

    names: dict[str, tuple[Path, str]] = field(default_factory=dict)
    shapes: dict[str, Shape] = field(default_factory=dict)
    _loaded: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_files(
        cls, files: Iterable[str | Path], rename: Callable[[list[str]], dict[str, str]] | None = None
    ) -> TensorSource:
        """Index ``files``; ``rename`` gets a file's keys and returns {module key: file key}."""
        source = cls()
        for file in map(Path, files):
            shapes = _file_shapes(file)
            mapping = rename(list(shapes)) if rename else {k: k for k in shapes}
            for new, old in mapping.items():
                if new in source.names:
                    raise CheckpointError(f"key {new!r} appears in both {source.names[new][0]} and {file}")
                source.names[new] = (file, old)
                source.shapes[new] = shapes[old]
        return source

    def get(self, key: str) -> torch.Tensor:
        file, name = self.names[key]
        if file in self._loaded:
            return self._loaded[file][name]
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(name)
        self._loaded[file] = read_state_dict(file)  # memory-mapped: no copy until a tensor is cast
        return self._loaded[file][name]

    def files(self) -> list[Path]:
        return sorted({file for file, _ in self.names.values()})

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], file: str | Path) -> TensorSource:
        """Tensors already read (and renamed) from ``file``, e.g. after a converter that reshapes values."""
        source = cls()
        path = Path(file)
        source._loaded[path] = dict(tensors)
        for key, value in tensors.items():
            source.names[key] = (path, key)
            source.shapes[key] = tuple(value.shape)
        return source


def _file_shapes(file: Path) -> dict[str, Shape]:
    if file.suffix == ".safetensors":
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} does not exist")
        try:
            with safe_open(str(file), framework="pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read {file}: not a valid safetensors file ({exc}); download it again"
            ) from None
    return {k: tuple(v.shape) for k, v in read_state_dict(file).items()}


# 2. Strict key report ----------------------------------------------------------------------------------------------
def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f", … ({len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else "")


@dataclass(frozen=True)
class KeyReport:
    """How a set of checkpoint tensors fits a module: every list must be empty before the weights are used."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, Shape, Shape]]  # (key, module shape, file shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def raise_if_bad(self, what: str, files: Iterable[Path | str]) -> None:
        if self.ok:
            return
        names = ", ".join(str(f) for f in files)
        lines = [f"{what} cannot be loaded from {names}:"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing keys (would stay random): {_listed(self.missing)}")
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected keys: {_listed(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} (model {list(a)}, file {list(b)})" for k, a, b in self.mismatched]
            lines.append(f"  {len(shown)} keys with other shapes: {_listed(shown)}")
        lines.append("  The file is for another architecture or size, or incomplete; check which file was given.")
        raise CheckpointError("\n".join(lines))


def check_keys(expected: Mapping[str, Shape], provided: Mapping[str, Shape]) -> KeyReport:
    """Compare the module's keys/shapes with the file's."""
    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    mismatched = sorted(
        (k, tuple(expected[k]), tuple(provided[k]))
        for k in set(expected) & set(provided)
        if tuple(expected[k]) != tuple(provided[k])
    )
    return KeyReport(missing, unexpected, mismatched)


# 3. Meta-device construction and assignment -------------------------------------------------------------------------
@contextmanager
def empty_weights() -> Iterator[None]:
    """Parameters on the meta device (no memory), buffers real (RoPE tables etc. are computed, not stored)."""
    with init_empty_weights(include_buffers=False):
        yield


def module_shapes(module: nn.Module) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def assign_tensor(module: nn.Module, key: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Put ``tensor`` (cast to ``dtype`` if floating) at ``key``, replacing a meta placeholder without a copy."""
    *path, name = key.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(tensor.contiguous(), requires_grad=False)
    elif name in owner._buffers:
        owner._buffers[name] = tensor.contiguous()
    else:
        raise CheckpointError(f"{key!r} is neither a parameter nor a buffer of {type(module).__name__}")


def load_into(
    module: nn.Module,
    source: TensorSource,
    what: str,
    dtype: torch.dtype | None,
    overlay: TensorSource | None = None,
) -> nn.Module:
    """Strictly fill a (meta-initialised) ``module`` from ``source`` with ``overlay`` winning where both have a key."""
    provided = dict(source.shapes)
    if overlay is not None:
        provided.update(overlay.shapes)
    files = source.files() + (overlay.files() if overlay is not None else [])
    check_keys(module_shapes(module), provided).raise_if_bad(what, files)
    for key in module.state_dict():
        tensor = overlay.get(key) if overlay is not None and key in overlay.names else source.get(key)
        assign_tensor(module, key, tensor, dtype)
    return module.eval().requires_grad_(False)


# 4. Key layouts ----------------------------------------------------------------------------------------------------
def wan_transformer_names(keys: list[str]) -> dict[str, str]:
    """Wan-native transformer keys → diffusers names, by running diffusers' converter on the key list itself."""
    return dict(convert_wan_transformer_to_diffusers({k: k for k in keys}))


def wan_vae_names(keys: list[str]) -> dict[str, str]:
    """Wan's ``Wan2.1_VAE.pth`` keys → diffusers ``AutoencoderKLWan`` names (diffusers' converter on the key list)."""
    placeholder = {k: torch.empty(0) for k in keys}
    names = {id(v): k for k, v in placeholder.items()}
    converted = convert_wan_vae_to_diffusers(placeholder)
    out = {}
    for new, value in converted.items():
        # diffusers maps a decoder shortcut only where the released channel plan has one (upsamples.4); a shortcut
        # of residual block r of stage s (original index 4s + r) is its resnets.r.conv_shortcut in any plan.
        match = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.conv_shortcut\.(weight|bias)", new)
        if match and int(match.group(1)) % 4 != 3:
            index = int(match.group(1))
            new = f"decoder.up_blocks.{index // 4}.resnets.{index % 4}.conv_shortcut.{match.group(2)}"
        out[new] = names[id(value)]
    return out


# Wan's umt5 encoder (wan/modules/t5.py naming) → transformers' UMT5EncoderModel. No converter ships for it.
_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # gelu(gate(x)) * fc1(x) = gelu(wi_0 x) * wi_1 x
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def wan_t5_names(keys: list[str]) -> dict[str, str]:
    """``models_t5_umt5-xxl-enc-bf16.pth`` keys → UMT5EncoderModel keys (unknown keys keep their name → unexpected)."""
    out = {}
    for key in keys:
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if key == "token_embedding.weight":
            out["shared.weight"] = key
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = key
        elif match and match.group(2) in _T5_BLOCK:
            out[f"encoder.block.{match.group(1)}.{_T5_BLOCK[match.group(2)]}"] = key
        else:
            out[key] = key
    return out


# Wan's open-clip XLM-R ViT-H/14 ``.pth`` (visual tower) → transformers' CLIPVisionModel; to_qkv is split in three.
_CLIP_LAYER = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}
# Parts of the CLIP file that the image encoder does not use (text tower, contrastive head and temperature).
CLIP_UNUSED_PREFIXES = ("textual.", "log_scale", "visual.head")


def wan_clip_vision_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Visual-tower tensors of the Wan CLIP file under CLIPVisionModel names (the text tower is dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(CLIP_UNUSED_PREFIXES):
            continue
        match = re.fullmatch(r"visual\.transformer\.(\d+)\.(.+)\.(weight|bias)", key)
        if key == "visual.cls_embedding":
            out["embeddings.class_embedding"] = value.reshape(-1)
        elif key == "visual.pos_embedding":
            out["embeddings.position_embedding.weight"] = value.reshape(value.shape[-2], value.shape[-1])
        elif key == "visual.patch_embedding.weight":
            out["embeddings.patch_embedding.weight"] = value
        elif key.startswith(("visual.pre_norm.", "visual.post_norm.")):
            norm = "pre_layrnorm" if ".pre_norm." in key else "post_layernorm"
            out[f"{norm}.{key.rsplit('.', 1)[1]}"] = value
        elif match and match.group(2) == "attn.to_qkv":
            q, k, v = value.chunk(3, dim=0)  # view(b, s, 3, heads, head_dim): q rows first, then k, then v
            for name, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                out[f"encoder.layers.{match.group(1)}.self_attn.{name}.{match.group(3)}"] = part
        elif match and match.group(2) in _CLIP_LAYER:
            out[f"encoder.layers.{match.group(1)}.{_CLIP_LAYER[match.group(2)]}.{match.group(3)}"] = value
        else:
            out[key] = value  # reported as unexpected
    return out


# 5. Dimensions from tensors ----------------------------------------------------------------------------------------
def _count_indexed(shapes: Mapping[str, Shape], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"layer indices under {prefix!r} are not contiguous: {sorted(indices)}")
    return len(indices)


def _shape(shapes: Mapping[str, Shape], key: str, what: str) -> Shape:
    if key not in shapes:
        raise CheckpointError(f"cannot infer the {what} dimensions: key {key!r} is missing")
    return shapes[key]


def infer_transformer_config(
    shapes: Mapping[str, Shape], head_dim: int = WAN_HEAD_DIM, text_len: int = WAN_TEXT_LEN
) -> dict:
    """FlashPortraitTransformer kwargs from diffusers-named tensor shapes (base ∪ FlashPortrait file)."""
    what = "transformer"
    patch = _shape(shapes, "patch_embedding.weight", what)  # [inner, in_channels, pt, ph, pw]
    inner = patch[0]
    if inner % head_dim:
        raise CheckpointError(f"transformer width {inner} is not a multiple of the head width {head_dim}")
    patch_size = tuple(patch[2:])
    out_channels = _shape(shapes, "proj_out.weight", what)[0] // math.prod(patch_size)
    emo = _shape(shapes, "blocks.0.attn2.emo_k_proj.weight", what)
    norm_q = shapes.get("blocks.0.attn1.norm_q.weight")
    return dict(
        patch_size=patch_size,
        num_attention_heads=inner // head_dim,
        attention_head_dim=head_dim,
        in_channels=patch[1],
        out_channels=out_channels,
        text_dim=_shape(shapes, "condition_embedder.text_embedder.linear_1.weight", what)[1],
        freq_dim=_shape(shapes, "condition_embedder.time_embedder.linear_1.weight", what)[1],
        ffn_dim=_shape(shapes, "blocks.0.ffn.net.0.proj.weight", what)[0],
        num_layers=_count_indexed(shapes, "blocks."),
        cross_attn_norm="blocks.0.norm2.weight" in shapes,
        qk_norm="rms_norm_across_heads" if norm_q == (inner,) else None,
        eps=1e-6,
        image_dim=shapes["condition_embedder.image_embedder.norm1.weight"][0]
        if "condition_embedder.image_embedder.norm1.weight" in shapes
        else None,
        added_kv_proj_dim=inner if "blocks.0.attn2.add_k_proj.weight" in shapes else None,
        rope_max_seq_len=1024,
        expression_dim=emo[1],
        text_len=text_len,
    )


def infer_portrait_encoder_config(
    shapes: Mapping[str, Shape], head_dim: int = RESAMPLER_HEAD_DIM
) -> PortraitEncoderConfig:
    """PortraitEncoderConfig from ``portrait_encoder.pt`` shapes (official key names)."""
    what = "portrait encoder"

    def resampler(prefix: str) -> tuple[int, int, int, int, int, int]:
        latents = _shape(shapes, f"{prefix}.latents", what)  # [1, queries, dim]
        inner = _shape(shapes, f"{prefix}.layers.0.0.to_q.weight", what)[0]
        hidden = _shape(shapes, f"{prefix}.layers.0.1.1.weight", what)[0]
        if inner % head_dim:
            raise CheckpointError(f"{prefix} attention width {inner} is not a multiple of the head width {head_dim}")
        depth = _count_indexed(shapes, f"{prefix}.layers.")
        return (
            latents[2],
            depth,
            inner // head_dim,
            latents[1],
            hidden // latents[2],
            _shape(shapes, f"{prefix}.proj_in.weight", what)[1],
        )

    mouth = resampler("mouth_proj_model")
    emotion = resampler("emo_proj_model")
    if (mouth[0], mouth[1], mouth[2], mouth[4]) != (emotion[0], emotion[1], emotion[2], emotion[4]):
        raise CheckpointError(
            f"the mouth and emotion resamplers differ in width/depth/heads/ff (mouth {mouth}, emotion {emotion}); "
            "the PortraitEncoder shares one resampler size"
        )

    def proj_in(name: str) -> int:
        return _shape(shapes, f"proj_model.{name}.weight", what)[1]

    config = PortraitEncoderConfig(
        headpose_dim=proj_in("headpose_proj"),
        eye_dim=proj_in("eye_proj"),
        emotion_dim=proj_in("emo_proj"),
        mouth_dim=proj_in("mouth_proj"),
        width=_shape(shapes, "proj_model.norm.weight", what)[0],
        resampler_dim=mouth[0],
        resampler_depth=mouth[1],
        resampler_heads=mouth[2],
        resampler_head_dim=head_dim,
        mouth_queries=mouth[3],
        emotion_queries=emotion[3],
        ff_mult=mouth[4],
    )
    if (mouth[5], emotion[5]) != (config.mouth_dim, config.emotion_dim):
        raise CheckpointError(
            f"resampler inputs ({mouth[5]}, {emotion[5]}) do not match the mouth/emotion widths "
            f"({config.mouth_dim}, {config.emotion_dim})"
        )
    return config


def infer_t5_config(shapes: Mapping[str, Shape]) -> dict:
    """UMT5Config kwargs from UMT5-named tensor shapes (vocab, width, layers, heads from the position-bias table)."""
    what = "T5 encoder"
    vocab, d_model = _shape(shapes, "shared.weight", what)
    buckets, heads = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", what)
    inner = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", what)[0]
    return dict(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=_shape(shapes, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", what)[0],
        num_layers=_count_indexed(shapes, "encoder.block."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
    )


def infer_clip_vision_config(shapes: Mapping[str, Shape], num_attention_heads: int) -> dict:
    """CLIPVisionConfig kwargs from CLIPVisionModel-named shapes; the head count is not in the tensors."""
    what = "CLIP image encoder"
    patch = _shape(shapes, "embeddings.patch_embedding.weight", what)  # [hidden, 3, p, p]
    positions = _shape(shapes, "embeddings.position_embedding.weight", what)[0]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1 or patch[0] % num_attention_heads:
        raise CheckpointError(
            f"CLIP image encoder: {positions} positions / width {patch[0]} do not fit a square ViT with "
            f"{num_attention_heads} heads"
        )
    return dict(
        hidden_size=patch[0],
        intermediate_size=_shape(shapes, "encoder.layers.0.mlp.fc1.weight", what)[0],
        num_hidden_layers=_count_indexed(shapes, "encoder.layers."),
        num_attention_heads=num_attention_heads,
        image_size=side * patch[2],
        patch_size=patch[2],
        hidden_act="gelu",
    )


def infer_wan_vae_config(shapes: Mapping[str, Shape]) -> dict:
    """AutoencoderKLWan kwargs from the diffusers-named shapes of an original ``Wan2.1_VAE.pth``.

    diffusers' converter maps the decoder for two residual blocks per stage (the released VAE), so that is required;
    the width, latent channels, per-stage multipliers and temporal downsampling come from the tensors.
    """
    what = "Wan VAE"
    base = _shape(shapes, "encoder.conv_in.weight", what)[0]
    blocks = _count_indexed(
        {k: v for k, v in shapes.items() if k.startswith("encoder.down_blocks.")}, "encoder.down_blocks."
    )
    resnets = [i for i in range(blocks) if f"encoder.down_blocks.{i}.conv1.weight" in shapes]
    resamples = [i for i in range(blocks) if f"encoder.down_blocks.{i}.resample.1.weight" in shapes]
    stages = len(resamples) + 1
    if len(resnets) != 2 * stages:
        raise CheckpointError(
            f"Wan VAE with {len(resnets)} residual blocks over {stages} stages: only 2 per stage (the released "
            "layout, which diffusers' converter assumes) is supported"
        )
    return dict(
        base_dim=base,
        z_dim=_shape(shapes, "post_quant_conv.weight", what)[0],
        dim_mult=[shapes[f"encoder.down_blocks.{resnets[2 * s]}.conv1.weight"][0] // base for s in range(stages)],
        num_res_blocks=2,
        temperal_downsample=[f"encoder.down_blocks.{i}.time_conv.weight" in shapes for i in resamples],
    )


# 6. Component loaders ----------------------------------------------------------------------------------------------
def load_portrait_encoder(path: str | Path, head_dim: int = RESAMPLER_HEAD_DIM) -> PortraitEncoder:
    """``portrait_encoder.pt`` → PortraitEncoder in fp32 (the official run keeps it fp32), sizes from the tensors.

    Only the ``proj_model.`` / ``mouth_proj_model.`` / ``emo_proj_model.`` keys are expected; anything else is
    reported (the official loader silently drops it).
    """
    source = TensorSource.from_files([path])
    config = infer_portrait_encoder_config(source.shapes, head_dim)
    with empty_weights():
        encoder = PortraitEncoder(config)
    return load_into(encoder, source, "portrait encoder", torch.float32)


def load_flashportrait_transformer(
    flashportrait_file: str | Path,
    base_files: Iterable[str | Path] = (),
    base_naming: str = "diffusers",
    dtype: torch.dtype = torch.bfloat16,
    base_config: Mapping | None = None,
    text_len: int = WAN_TEXT_LEN,
):
    """Base Wan2.1 transformer shards overlaid with every tensor of ``transformer.pt`` → FlashPortraitTransformer.

    ``base_naming`` says how the base shards name their keys: "diffusers" (``transformer/`` of the diffusers layout)
    or "wan" (the original layout's ``diffusion_pytorch_model-*.safetensors``). ``transformer.pt`` always uses
    Wan-native names. Every key of the model must come from one of them (the official loader's non-strict overlay
    would keep random emotion projections if they were absent); ``base_files`` may be empty when ``transformer.pt``
    holds the whole model. Dimensions come from the tensors; the head count from ``base_config`` when given.
    """
    from .transformer_flashportrait import FlashPortraitTransformer

    if base_naming not in ("diffusers", "wan"):
        raise ValueError(f"base_naming must be 'diffusers' or 'wan', got {base_naming!r}")
    overlay = TensorSource.from_files([flashportrait_file], rename=wan_transformer_names)
    base = TensorSource.from_files(base_files, rename=wan_transformer_names if base_naming == "wan" else None)
    shapes = {**base.shapes, **overlay.shapes}
    head_dim = WAN_HEAD_DIM
    if base_config:
        heads = base_config.get("num_attention_heads", base_config.get("num_heads"))
        width = _shape(shapes, "patch_embedding.weight", "transformer")[0]
        head_dim = width // int(heads) if heads else head_dim
    config = infer_transformer_config(shapes, head_dim=head_dim, text_len=text_len)
    logger.info("FlashPortrait transformer dimensions from the checkpoints: %s", config)
    with empty_weights():
        model = FlashPortraitTransformer(**config)
    return load_into(model, base, "FlashPortrait transformer", dtype, overlay=overlay)


def tie_weights_by_name(model: nn.Module) -> None:
    """Make every tied parameter (transformers' ``_tied_weights_keys``: target → source) the source's object."""
    for target, source in (getattr(model, "_tied_weights_keys", None) or {}).items():
        *path, name = target.split(".")
        owner = model.get_submodule(".".join(path))
        owner._parameters[name] = model.get_parameter(source)


def tied_keys(model: nn.Module) -> set[str]:
    return set((getattr(model, "_tied_weights_keys", None) or {}).keys())


def load_into_tied(model: nn.Module, source: TensorSource, what: str, dtype: torch.dtype | None) -> nn.Module:
    """:func:`load_into` for transformers models whose tied copies (e.g. ``encoder.embed_tokens``) are not stored."""
    expected = {k: v for k, v in module_shapes(model).items() if k not in tied_keys(model)}
    check_keys(expected, source.shapes).raise_if_bad(what, source.files())
    for key in expected:
        assign_tensor(model, key, source.get(key), dtype)
    tie_weights_by_name(model)
    return model.eval().requires_grad_(False)
