"""The model's parts (transformer, VAE, text and image encoders, portrait encoder) built from a preset, and the
encoders' calls as the official pipeline makes them.

Each part comes from its library (diffusers' ``AutoencoderKLWan``, transformers' UMT5 and CLIP vision towers);
only the FlashPortrait transformer and portrait encoder are ours. Random initialisation is seeded per component,
so every process that builds the ``tiny`` preset holds bit-identical weights: that is what lets a Ray worker and
the single-device pipeline produce the same video.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from .portrait_encoder import PortraitEncoder
from .presets import ModelPreset
from .transformer_flashportrait import FlashPortraitTransformer


logger = logging.getLogger(__name__)

# CLIP's image normalisation (OpenAI / open-clip ViT-H), as the official code applies it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TEMPORAL_COMPRESSION = 4  # Wan VAE: latent frame i ≥ 1 ↔ RGB frames 4i−3 … 4i
SPATIAL_COMPRESSION = 8


class ByteTokenizer:
    """UTF-8 bytes as token ids (3 … 258), 1 = end of sequence, 0 = padding: a tokenizer that needs no files.

    Used by presets whose text encoder is trained (or drawn) with this vocabulary; the released model uses the
    umt5-xxl SentencePiece tokenizer instead.
    """

    pad_id, eos_id, offset = 0, 1, 3

    def __call__(self, prompt: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [b + self.offset for b in prompt.encode("utf-8")][: max_length - 1] + [self.eos_id]
        input_ids = torch.full((1, max_length), self.pad_id, dtype=torch.long)
        input_ids[0, : len(ids)] = torch.tensor(ids)
        mask = (torch.arange(max_length) < len(ids)).long().unsqueeze(0)
        return input_ids, mask


class UMT5Tokenizer:
    """The umt5-xxl tokenizer from a local folder (transformers' ``AutoTokenizer``), called like ``ByteTokenizer``.

    The official pipeline tokenizes with ``padding="max_length"``, truncation and the special tokens (the closing
    ``</s>``), and the attention mask marks the prompt; the same call is made here.
    """

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist (the base model's tokenizer/ folder)")
        self.folder = folder
        self._tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def __call__(self, prompt: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self._tokenizer(
            prompt,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return encoded.input_ids, encoded.attention_mask


@dataclass
class FlashPortraitComponents:
    preset: ModelPreset
    transformer: FlashPortraitTransformer
    vae: AutoencoderKLWan
    text_encoder: UMT5EncoderModel
    tokenizer: ByteTokenizer | UMT5Tokenizer
    image_encoder: CLIPVisionModel
    portrait_encoder: PortraitEncoder

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.preset.dtype)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def to(self, device: str | torch.device) -> FlashPortraitComponents:
        """Move every part to ``device`` (the transformer in the preset's dtype, the rest as built)."""
        self.transformer.to(device=device, dtype=self.dtype)
        for module in (self.vae, self.text_encoder, self.image_encoder, self.portrait_encoder):
            module.to(device)
        return self

    @property
    def latents_mean(self) -> torch.Tensor:
        return torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @property
    def latents_std(self) -> torch.Tensor:
        return torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)


def build_components(preset: ModelPreset) -> FlashPortraitComponents:
    """Instantiate every part of ``preset``; with ``init_seed`` set, weights are drawn reproducibly."""
    if preset.init_seed is None:
        raise ValueError(
            f"preset {preset.name!r} has no random initialisation; its weights must be loaded from checkpoints"
        )
    if preset.tokenizer != "bytes":
        raise ValueError(
            f"preset {preset.name!r} needs tokenizer files ({preset.tokenizer}); load it from checkpoints"
        )
    seed = preset.init_seed

    def seeded(offset: int) -> None:
        torch.manual_seed(seed + offset)

    seeded(0)
    transformer = FlashPortraitTransformer(**preset.transformer)
    # A fresh model's expression projections are zero (as in the release before training); draw them too, so the
    # expression path of a randomly initialised preset is exercised end to end.
    seeded(1)
    for block in transformer.blocks:
        torch.nn.init.normal_(block.attn2.emo_k_proj.weight, std=preset.transformer["expression_dim"] ** -0.5)
        torch.nn.init.normal_(block.attn2.emo_v_proj.weight, std=preset.transformer["expression_dim"] ** -0.5)
    seeded(2)
    vae = AutoencoderKLWan(**preset.vae)
    seeded(3)
    text_encoder = UMT5EncoderModel(UMT5Config(**preset.text_encoder))
    seeded(4)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(**preset.image_encoder))
    seeded(5)
    portrait_encoder = PortraitEncoder(preset.portrait_encoder)
    components = FlashPortraitComponents(
        preset, transformer, vae, text_encoder, ByteTokenizer(), image_encoder, portrait_encoder
    )
    if preset.weights is not None:
        load_preset_weights(components)
    for module in (transformer, vae, text_encoder, image_encoder, portrait_encoder):
        module.eval().requires_grad_(False)
    return components


def preset_weights_file(preset: ModelPreset) -> Path:
    """The preset's shipped weights: a path relative to this package (model/weights/ in a checkout)."""
    if preset.weights is None:
        raise ValueError(f"preset {preset.name!r} ships no weights file")
    return Path(__file__).resolve().parent / preset.weights


def load_preset_weights(components: FlashPortraitComponents) -> None:
    """Load the preset's trained transformer, portrait encoder and VAE (and the VAE's latent statistics) over the
    seeded initialisation, after checking the file's SHA-256 against the preset.

    Raises:
        FileNotFoundError: if the weights file is missing (the training recipe writes it).
        ValueError: if its digest or its keys do not match the preset.
    """
    preset = components.preset
    path = preset_weights_file(preset)
    if not path.is_file():
        raise FileNotFoundError(
            f"preset {preset.name!r} needs its weights file {path}; it ships with the package — reinstall, or "
            "make it with `flashportrait train model/training/demo.toml`"
        )
    load_weights_file(components, path, preset.weights_sha256)


def load_weights_file(components: FlashPortraitComponents, path: Path, expected_sha256: str | None) -> dict[str, str]:
    """Load an exported weights file (``transformer.*``, ``portrait_encoder.*``, ``vae.*`` and the VAE's latent
    statistics in the metadata) into ``components``; the file's digest is checked first when one is expected.
    Returns the file's metadata (steps, version).

    Raises:
        ValueError: if its digest or its keys do not match.
    """
    from safetensors.torch import load_file

    preset = components.preset
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ValueError(
            f"{path} has SHA-256 {digest}, {preset.name!r} expects {expected_sha256}: the file is damaged or from "
            "another training run; restore it from the repository (or update the expected digest after retraining)"
        )
    tensors = load_file(str(path))
    for prefix, module in (
        ("transformer.", components.transformer),
        ("portrait_encoder.", components.portrait_encoder),
        ("vae.", components.vae),
    ):
        state = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit preset {preset.name!r}'s {prefix[:-1]}: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}; the file was trained for another architecture"
            )
    metadata = safetensors_metadata(path)
    components.vae.register_to_config(
        latents_mean=json.loads(metadata["latents_mean"]), latents_std=json.loads(metadata["latents_std"])
    )
    return metadata


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's string metadata (read from its header only)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return dict(file.metadata() or {})


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# Encoders -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompt(components: FlashPortraitComponents, prompt: str) -> torch.Tensor:
    """T5 embeddings [1, text_len, text_dim], zeroed past the prompt's length as Wan does."""
    text_len = components.preset.text_len
    input_ids, mask = components.tokenizer(prompt, text_len)
    input_ids, mask = input_ids.to(components.device), mask.to(components.device)
    hidden = components.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)  # [1, text_len, text_dim]


@torch.no_grad()
def encode_reference_image(components: FlashPortraitComponents, image: np.ndarray) -> torch.Tensor:
    """CLIP tokens of the reference [1, n_tokens, image_dim]: the whole image squashed (bicubic) to the CLIP size,
    CLIP mean/std, the penultimate layer's hidden states, as the official pipeline does (no centre crop)."""
    size = components.image_encoder.config.image_size
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = ((pixels - mean) / std).to(components.device)
    out = components.image_encoder(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[-2]


def image_to_video_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] → [-1, 1] float [1, 3, 1, H, W]."""
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels.unsqueeze(0).unsqueeze(2)


@torch.no_grad()
def encode_i2v_condition(
    components: FlashPortraitComponents, image: np.ndarray, num_latent_frames: int
) -> torch.Tensor:
    """The I2V condition y [1, 4 + z, F, h, w]: the mask (1 on latent frame 0) and the VAE latents of the reference
    followed by 4(F−1) mid-grey frames, normalised with the VAE's latent mean/std.

    Every window uses this same y: each window sees the reference as its own first frame (official behaviour).
    """
    reference = image_to_video_tensor(image)  # [1, 3, 1, H, W]
    num_rgb = TEMPORAL_COMPRESSION * (num_latent_frames - 1) + 1
    video = torch.cat([reference, torch.zeros_like(reference).expand(-1, -1, num_rgb - 1, -1, -1)], dim=2)
    latents = components.vae.encode(video.to(components.device)).latent_dist.mode().float().cpu()  # [1, z, F, h, w]
    latents = (latents - components.latents_mean) / components.latents_std
    mask = torch.zeros(1, 4, num_latent_frames, latents.shape[-2], latents.shape[-1], dtype=latents.dtype)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latents], dim=1)


@torch.no_grad()
def decode_latents(components: FlashPortraitComponents, latents: torch.Tensor) -> np.ndarray:
    """Normalised latents [1, z, F, h, w] → uint8 frames [4(F−1)+1, H, W, 3] (rounded, clamped)."""
    latents = latents.float() * components.latents_std + components.latents_mean
    video = components.vae.decode(latents.to(components.device)).sample.float().cpu().clamp(-1.0, 1.0)
    frames = ((video[0].permute(1, 2, 3, 0) + 1.0) * 127.5).round().to(torch.uint8)  # [N, H, W, 3]
    return frames.numpy()
