"""Streaming VAE decode: chunked == whole-video decode, bit for bit, and memory that does not grow with length."""

from __future__ import annotations

import ctypes
import gc

import numpy as np
import pytest
import torch

from flashportrait.model.components import build_components, decode_latents
from flashportrait.model.presets import TINY
from flashportrait.model.vae_streaming import decoded_frame_count, iter_decode_latents


LATENT_HW = (8, 8)  # the tiny preset's 64×64 frames


@pytest.fixture(scope="module")
def components():
    # One torch thread: on a shared 2-core machine two threads make the tiny VAE ~20× slower (oversubscription).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_components(TINY)
    torch.set_num_threads(threads)


def latents_for(num_latent_frames: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, TINY.vae["z_dim"], num_latent_frames, *LATENT_HW, generator=generator)  # [1, z, F, h, w]


def expected_chunk_lengths(num_latent_frames: int, chunk: int) -> list[int]:
    starts = range(0, num_latent_frames, chunk)
    return [4 * (min(s + chunk, num_latent_frames) - s) - (3 if s == 0 else 0) for s in starts]


@pytest.mark.parametrize("num_latent_frames", [1, 2, 7])
def test_chunked_decode_equals_whole_decode(components, num_latent_frames):
    latents = latents_for(num_latent_frames)
    whole = decode_latents(components, latents)  # [4(F−1)+1, H, W, 3]
    assert whole.shape == (decoded_frame_count(num_latent_frames), 64, 64, 3)
    assert len(np.unique(whole)) > 100  # a varied video, so equality below means something
    for chunk in (1, 2, 3, 8):  # 3 does not divide 7; 8 > F gives one chunk
        chunks = list(iter_decode_latents(components, latents, chunk_latent_frames=chunk))
        assert [c.shape[0] for c in chunks] == expected_chunk_lengths(num_latent_frames, chunk)
        assert all(c.dtype == np.uint8 and c.flags.c_contiguous and c.shape[1:] == (64, 64, 3) for c in chunks)
        np.testing.assert_array_equal(np.concatenate(chunks), whole)  # measured tolerance: exact


def test_tiled_vae_streams_like_its_tiled_decode(components):
    """With diffusers' spatial tiling on, each chunk's tiles get their own cache and are blended like tiled_decode."""
    vae = components.vae
    saved = (vae.use_tiling, vae.tile_sample_min_height, vae.tile_sample_min_width)
    saved_stride = (vae.tile_sample_stride_height, vae.tile_sample_stride_width)
    vae.enable_tiling(32, 32, 24, 24)  # 64×64 frames → a 3×3 grid of overlapping 32×32 tiles
    try:
        latents = latents_for(4, seed=1)
        whole = decode_latents(components, latents)
        for chunk in (1, 3):
            np.testing.assert_array_equal(
                np.concatenate(list(iter_decode_latents(components, latents, chunk_latent_frames=chunk))), whole
            )
    finally:
        vae.use_tiling, vae.tile_sample_min_height, vae.tile_sample_min_width = saved
        vae.tile_sample_stride_height, vae.tile_sample_stride_width = saved_stride


def test_stream_survives_other_vae_calls_in_between(components):
    """The stream keeps its own feature cache: a whole decode (which clears the VAE's cache) between two chunks of
    a stream, as a worker serving two jobs could do, changes none of the stream's frames."""
    latents = latents_for(5, seed=2)
    expected = decode_latents(components, latents)
    stream = iter_decode_latents(components, latents, chunk_latent_frames=2)
    first = next(stream)
    decode_latents(components, latents_for(2, seed=3))
    np.testing.assert_array_equal(np.concatenate([first, *stream]), expected)


def test_decode_is_lazy_and_leaves_grad_mode_alone(components):
    """After the first chunk only that chunk's latent frames have been through the decoder: an implementation that
    decodes the whole video and then yields slices of it fails here."""
    calls = []
    handle = components.vae.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        stream = iter_decode_latents(components, latents_for(12, seed=4), chunk_latent_frames=3)
        assert calls == []  # nothing decoded before the first frame is asked for
        next(stream)
        assert len(calls) == 3
        assert torch.is_grad_enabled()  # no_grad holds only while the generator runs
        next(stream)
        assert len(calls) == 6
        stream.close()
    finally:
        handle.remove()


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


def _heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (glibc's mallinfo2: heap + mmapped chunks). torch's CPU
    allocator sits on malloc, so this sees every tensor; tracemalloc sees none of them."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


try:
    _LIBC = ctypes.CDLL(None)
    _LIBC.mallinfo2.restype = _MallInfo2
except (OSError, AttributeError):
    _LIBC = None


def _held_at_yields(components, num_latent_frames: int) -> int:
    """The most heap in use at any yield of a stream (above what was in use before it), the consumer dropping each
    chunk as it arrives, as an encoder would."""
    latents = latents_for(num_latent_frames, seed=5)
    gc.collect()
    base = _heap_in_use()
    held = 0
    frames = 0
    for chunk in iter_decode_latents(components, latents, chunk_latent_frames=8):
        held = max(held, _heap_in_use() - base)
        frames += chunk.shape[0]
        del chunk
    assert frames == decoded_frame_count(num_latent_frames)
    return held


@pytest.mark.skipif(_LIBC is None, reason="needs glibc's mallinfo2 to read the heap in use")
def test_memory_held_does_not_grow_with_video_length(components):
    """A 200-latent-frame (797-frame) video streams holding what a 50-frame one holds; decoding it whole would hold
    its 9.8 MB of uint8 frames (39 MB in float32) at once."""
    list(iter_decode_latents(components, latents_for(2), chunk_latent_frames=1))  # one-off oneDNN / thread buffers
    short = _held_at_yields(components, 50)
    long = _held_at_yields(components, 200)
    whole_video = decoded_frame_count(200) * 64 * 64 * 3  # bytes of the long video in uint8
    assert long - short < whole_video / 10, (short, long, whole_video)
    assert long < whole_video / 2, (long, whole_video)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_latent_frames": 0}, r"chunk_latent_frames must be an integer ≥ 1, got 0"),
        ({"chunk_latent_frames": 2.0}, r"chunk_latent_frames must be an integer ≥ 1, got 2\.0"),
        ({"chunk_latent_frames": True}, r"chunk_latent_frames must be an integer ≥ 1, got True"),
    ],
)
def test_bad_chunk_size_is_rejected_at_call_time(components, kwargs, match):
    with pytest.raises(ValueError, match=match):
        iter_decode_latents(components, latents_for(2), **kwargs)


@pytest.mark.parametrize(
    ("latents", "match"),
    [
        (torch.zeros(2, 16, 3, 8, 8), r"latents must be a tensor \[1, z, F, h, w\].*got \(2, 16, 3, 8, 8\)"),
        (torch.zeros(16, 3, 8, 8), r"latents must be a tensor \[1, z, F, h, w\].*got \(16, 3, 8, 8\)"),
        (np.zeros((1, 16, 3, 8, 8)), r"latents must be a tensor \[1, z, F, h, w\].*got ndarray"),
        (torch.zeros(1, 12, 3, 8, 8), r"latents \(1, 12, 3, 8, 8\) do not fit this VAE: need 16 channels"),
        (torch.zeros(1, 16, 0, 8, 8), r"latents \(1, 16, 0, 8, 8\) do not fit this VAE: .*at least one latent frame"),
    ],
)
def test_bad_latents_are_rejected_at_call_time(components, latents, match):
    with pytest.raises(ValueError, match=match):
        iter_decode_latents(components, latents)
