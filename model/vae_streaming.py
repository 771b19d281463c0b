"""Streaming VAE decode: normalised latents → uint8 RGB frames, chunk by chunk, in memory flat in video length.

Why: ``components.decode_latents`` hands the whole latent video to ``AutoencoderKLWan.decode``, which concatenates
every decoded frame into one float tensor on the device (≈ 5.5 MB per 720×1280 frame in bf16, four times that in
fp32) before anything can be encoded. A 10-minute video does not fit; and the encoder downstream only ever needs
the next few frames.

How: diffusers' Wan VAE already decodes causally, one latent frame per ``decoder`` call, carrying the temporal
context of its causal 3D convolutions in a *feature cache* (a list with one slot per ``WanCausalConv3d``, each
holding the last ≤ 2 input frames of that convolution; ``AutoencoderKLWan._decode`` keeps it in ``_feat_map``).
This module drives that same decoder with that same cache mechanism, frame by frame in the same order with the same
``first_chunk`` flag, but yields each chunk of frames instead of concatenating them. Nothing is forked or copied
from diffusers: only the loop that ``_decode`` (and ``tiled_decode``) runs is replayed here, so the decoded frames
are the ones the whole-video decode computes.

The cache lives in this generator, not in the VAE's ``_feat_map`` attribute: ``vae.encode`` / ``vae.decode`` call
``clear_cache()``, which would wipe a shared cache in the middle of a stream (e.g. a worker encoding the next job's
reference while this job's frames are still being decoded), and two streams on one VAE must not share one cache.

Memory held while streaming (independent of the number of latent frames F): the latents the caller passes (only one
chunk of them is denormalised and moved to the VAE's device at a time), the feature cache (≤ 2 frames of each
causal convolution's input) and one chunk of decoded frames.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

from .components import FlashPortraitComponents


def decoded_frame_count(num_latent_frames: int) -> int:
    """RGB frames the Wan VAE decodes from ``num_latent_frames``: latent frame 0 → 1 frame, each later one → 4."""
    return 4 * (num_latent_frames - 1) + 1


def iter_decode_latents(
    components: FlashPortraitComponents, latents: torch.Tensor, *, chunk_latent_frames: int = 8
) -> Iterator[np.ndarray]:
    """Decode normalised latents [1, z, F, h, w] chunk by chunk; yields uint8 frame batches [n, H, W, 3] in order.

    Each yielded array holds the RGB frames of ``chunk_latent_frames`` consecutive latent frames (the last chunk
    may hold fewer): the first chunk 1 + 4(c − 1) frames (latent frame 0 decodes to one frame), every later chunk
    4c frames; F latent frames give 4(F − 1) + 1 frames in all. Concatenating the chunks gives exactly
    ``decode_latents(components, latents)`` (bit-identical on CPU for every chunk size; the per-frame decoder calls,
    their order and their cache are the same, and denormalisation, clamp, rounding and the uint8 conversion are
    element-wise). Chunk size trades per-yield overhead against memory only: the decoder always runs one latent
    frame per call. Each array is C-contiguous and owned by the consumer; the generator keeps no reference to it.

    Arguments are checked here, before the first frame is asked for; the decode itself runs lazily as the iterator
    is consumed. The VAE must not be moved to another device mid-stream.
    """
    if not isinstance(chunk_latent_frames, int) or isinstance(chunk_latent_frames, bool) or chunk_latent_frames < 1:
        raise ValueError(
            f"chunk_latent_frames must be an integer ≥ 1, got {chunk_latent_frames!r}; pass e.g. 8 "
            "(latent frames decoded per yielded chunk)"
        )
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[0] != 1:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(
            f"latents must be a tensor [1, z, F, h, w] (one video), got {shape}; decode one video per call "
            "(split a batch with latents.split(1))"
        )
    z_dim = components.vae.config.z_dim
    if latents.shape[1] != z_dim or latents.shape[2] < 1:
        raise ValueError(
            f"latents {tuple(latents.shape)} do not fit this VAE: need {z_dim} channels and at least one latent "
            "frame (dim 2); pass the normalised latents the sampler produced for this preset"
        )
    return _stream(components, latents, chunk_latent_frames)


@torch.no_grad()  # torch restores grad mode around every yield of a decorated generator
def _stream(components: FlashPortraitComponents, latents: torch.Tensor, chunk: int) -> Iterator[np.ndarray]:
    vae = components.vae
    # accelerate's CPU-offload hook moves the VAE onto its device when ``decode`` (decorated with
    # ``apply_forward_hook``) is called; we call ``decoder`` directly, so trigger it ourselves.
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)
    device = vae.device
    mean = components.latents_mean.to(latents.device)  # [1, z, 1, 1, 1]
    std = components.latents_std.to(latents.device)
    num_frames, height, width = latents.shape[2:]
    tiles = _TileGrid.for_vae(vae, height, width)
    # One feature cache per spatial tile (a single one without tiling), alive for the whole stream: slot k holds
    # the last ≤ 2 input frames of the decoder's k-th causal convolution, as ``AutoencoderKLWan.clear_cache`` sizes
    # ``_feat_map``.
    num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    caches = [[None] * num_convs for _ in range(tiles.count if tiles else 1)]
    for start in range(0, num_frames, chunk):
        stop = min(start + chunk, num_frames)
        # Denormalise only this chunk (as decode_latents does for the whole video: float32, z·std + mean).
        z = (latents[:, :, start:stop].float() * std + mean).to(device)  # [1, z, c, h, w]
        if tiles is None:
            video = _decode_chunk(vae, z, start, caches[0])
        else:
            video = tiles.decode_chunk(vae, z, start, caches)
        del z
        yield _to_uint8(video)
        del video


def _decode_chunk(vae: AutoencoderKLWan, z: torch.Tensor, start: int, cache: list) -> torch.Tensor:
    """One chunk through ``AutoencoderKLWan._decode``'s loop: [1, z, c, h, w] → [1, 3, n, H, W] in [−1, 1]."""
    x = vae.post_quant_conv(z)  # a 1×1×1 convolution: per frame, so chunking it changes nothing
    decoded = [
        # A fresh conv index per latent frame (``_conv_idx = [0]``); first_chunk only for latent frame 0, whose
        # upsamplers then skip the temporal doubling (latent frame 0 → one RGB frame).
        vae.decoder(x[:, :, k : k + 1], feat_cache=cache, feat_idx=[0], first_chunk=start + k == 0)
        for k in range(x.shape[2])
    ]
    video = torch.cat(decoded, dim=2)
    if vae.config.patch_size is not None:
        video = unpatchify(video, patch_size=vae.config.patch_size)
    return torch.clamp(video, min=-1.0, max=1.0)


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """[1, 3, n, H, W] in [−1, 1] → uint8 [n, H, W, 3], the conversion ``decode_latents`` applies."""
    video = video.float().cpu().clamp(-1.0, 1.0)
    frames = ((video[0].permute(1, 2, 3, 0) + 1.0) * 127.5).round().to(torch.uint8)  # [n, H, W, 3]
    return np.ascontiguousarray(frames.numpy())


class _TileGrid:
    """The spatial tiles of ``AutoencoderKLWan.tiled_decode`` (used when ``vae.enable_tiling()`` is on and the latents
    are larger than a tile), decoded chunk by chunk with one feature cache per tile.

    The tiled decode blends neighbouring tiles frame by frame (``blend_v`` / ``blend_h``), so blending each chunk's
    tiles gives the frames the whole-video tiled decode gives. The grid and blend extents are diffusers' formulas.
    """

    def __init__(self, vae: AutoencoderKLWan, height: int, width: int):
        ratio = vae.spatial_compression_ratio
        patch = vae.config.patch_size
        self.min_h = vae.tile_sample_min_height // ratio  # latent tile size and stride
        self.min_w = vae.tile_sample_min_width // ratio
        self.rows = list(range(0, height, vae.tile_sample_stride_height // ratio))
        self.cols = list(range(0, width, vae.tile_sample_stride_width // ratio))
        self.sample_h, self.sample_w = height * ratio, width * ratio
        self.stride_h, self.stride_w = vae.tile_sample_stride_height, vae.tile_sample_stride_width
        if patch is not None:
            self.sample_h, self.sample_w = self.sample_h // patch, self.sample_w // patch
            self.stride_h, self.stride_w = self.stride_h // patch, self.stride_w // patch
            self.blend_h = vae.tile_sample_min_height // patch - self.stride_h
            self.blend_w = vae.tile_sample_min_width // patch - self.stride_w
        else:
            self.blend_h = vae.tile_sample_min_height - self.stride_h
            self.blend_w = vae.tile_sample_min_width - self.stride_w

    @classmethod
    def for_vae(cls, vae: AutoencoderKLWan, height: int, width: int) -> _TileGrid | None:
        """The grid when ``AutoencoderKLWan._decode`` would take its tiled path for this latent size, else None."""
        ratio = vae.spatial_compression_ratio
        tiled = width > vae.tile_sample_min_width // ratio or height > vae.tile_sample_min_height // ratio
        return cls(vae, height, width) if vae.use_tiling and tiled else None

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)

    def decode_chunk(self, vae: AutoencoderKLWan, z: torch.Tensor, start: int, caches: list[list]) -> torch.Tensor:
        """One chunk [1, z, c, h, w] through ``tiled_decode``'s loops (tile by tile, then blend) → [1, 3, n, H, W]."""
        rows = []
        for r, i in enumerate(self.rows):
            row = []
            for c, j in enumerate(self.cols):
                cache = caches[r * len(self.cols) + c]
                frames = []
                for k in range(z.shape[2]):
                    tile = vae.post_quant_conv(z[:, :, k : k + 1, i : i + self.min_h, j : j + self.min_w])
                    frames.append(vae.decoder(tile, feat_cache=cache, feat_idx=[0], first_chunk=start + k == 0))
                row.append(torch.cat(frames, dim=2))
            rows.append(row)
        result_rows = []
        for r, row in enumerate(rows):
            result_row = []
            for c, tile in enumerate(row):
                if r > 0:
                    tile = vae.blend_v(rows[r - 1][c], tile, self.blend_h)
                if c > 0:
                    tile = vae.blend_h(row[c - 1], tile, self.blend_w)
                result_row.append(tile[:, :, :, : self.stride_h, : self.stride_w])
            result_rows.append(torch.cat(result_row, dim=-1))
        video = torch.cat(result_rows, dim=3)[:, :, :, : self.sample_h, : self.sample_w]
        if vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=vae.config.patch_size)
        return torch.clamp(video, min=-1.0, max=1.0)
