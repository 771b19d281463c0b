"""Resource limits for untrusted inputs, enforced before decoding; each has a CLI flag and an environment variable.

Defaults suit a shared platform: a 4K video frame, a 50 Mpx photo (downscaled to 8.3 Mpx on load), 30 minutes of
video, 10,000 rows. ffmpeg and Pillow accept far more (an 8K frame, a "7-hour" clip from a bogus timescale, a 30000²
PNG bomb), so these are checked from headers and probes first and the decoder subprocess runs under memory, file-size
and time rlimits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any


ENV_PREFIX = "FLASHPORTRAIT_"


@dataclass(frozen=True)
class Limits:
    # Per video frame (8.3 Mpx): a larger video is refused. Still images larger than this are downscaled to it
    # after decoding (phone photos are 12-50 Mpx); only their header size is refused, above max_image_pixels.
    max_input_pixels: int = 3840 * 2160
    max_image_pixels: int = 50_000_000  # header size of a reference image: the decompression-bomb guard
    min_input_side: int = 64  # smaller references/videos cannot hold a usable face
    max_duration_s: float = 1800.0
    max_frames: int = 54_001  # after resampling to the output fps (30 min at 30 fps)
    min_fps: float = 1.0
    max_fps: float = 120.0
    max_file_bytes: int = 4 << 30
    max_manifest_rows: int = 10_000
    max_manifest_bytes: int = 64 << 20
    max_field_bytes: int = 4096  # any single manifest value (URL, id, …) except the prompt
    max_prompt_bytes: int = 2048
    row_timeout_s: float = 3600.0
    probe_timeout_s: float = 60.0
    decode_memory_bytes: int = 4 << 30  # RLIMIT_AS of the probe/decode subprocess
    decode_file_bytes: int = 16 << 30  # RLIMIT_FSIZE of the decode subprocess

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value <= 0:
                raise ValueError(
                    f"limit {f.name} must be > 0, got {value}; set {env_name(f.name)} or --{flag(f.name)}"
                )
        if self.min_fps >= self.max_fps:
            raise ValueError(f"min_fps ({self.min_fps}) must be below max_fps ({self.max_fps})")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Limits:
        """Defaults, then ``FLASHPORTRAIT_<NAME>`` variables, then explicit overrides (CLI flags)."""
        environ = dict(os.environ) if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None:
                try:
                    values[f.name] = type(getattr(cls(), f.name))(raw)
                except ValueError:
                    raise ValueError(f"{env_name(f.name)}={raw!r} is not a number") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)

    def describe(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag(name: str) -> str:
    return name.replace("_", "-")


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx"
