"""Expression extractors: driving-video frames → one 554-d expression vector per frame, behind one Protocol.

Every extractor of ours produces the official PD-FGC per-frame layout

    [headpose 6 | eye 6 | emotion 30 | mouth 512] = 554 floats,

so the PortraitEncoder input has the same shape whichever extractor made it (the released PortraitEncoder
weights only make sense on real PD-FGC features; the others exist so the pipeline runs without downloads).

Extractors are looked up by name with :func:`get_extractor`. To add one, write a module here with a class that
satisfies :class:`ExpressionExtractor` and add one line to ``_EXTRACTORS``; the module is imported only when its
extractor is asked for, so a heavy one (onnx, PD-FGC weights) costs nothing to the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import numpy as np


HEADPOSE_DIM = 6
EYE_DIM = 6
EMOTION_DIM = 30
MOUTH_DIM = 512
FEATURE_DIM = HEADPOSE_DIM + EYE_DIM + EMOTION_DIM + MOUTH_DIM  # 554


@runtime_checkable
class ExpressionExtractor(Protocol):
    """Turns a driving video's frames into per-frame expression vectors.

    ``extract`` takes frames as HxWx3 uint8 RGB arrays (an iterable, so a long video can be streamed) and returns
    float32 [N, FEATURE_DIM] in the layout above, one row per frame, in frame order. ``source`` names the video
    in error messages (a redacted URL), so a failed row says which input had no usable face.
    """

    name: str

    def extract(self, frames: Iterable[np.ndarray], *, source: str = "the driving video") -> np.ndarray: ...


# name → (module in this package, class name); imported lazily by get_extractor.
_EXTRACTORS: dict[str, tuple[str, str]] = {
    "landmark": ("landmark", "LandmarkExpressionExtractor"),
    "pdfgc": ("pdfgc", "PdfgcExpressionExtractor"),
    "pixel": ("pixel", "PixelExpressionExtractor"),
}


def available_extractors() -> tuple[str, ...]:
    """Names :func:`get_extractor` accepts, sorted."""
    return tuple(sorted(_EXTRACTORS))


def get_extractor(name: str, **options: Any) -> ExpressionExtractor:
    """Build the extractor registered as ``name`` with ``options`` as keyword arguments.

    Raises:
        ValueError: if ``name`` is not registered; the message lists the registered names.
    """
    if name not in _EXTRACTORS:
        raise ValueError(f"unknown expression extractor {name!r}; choose one of {list(available_extractors())}")
    module_name, class_name = _EXTRACTORS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)(**options)


__all__ = [
    "EMOTION_DIM",
    "EYE_DIM",
    "FEATURE_DIM",
    "HEADPOSE_DIM",
    "MOUTH_DIM",
    "ExpressionExtractor",
    "available_extractors",
    "get_extractor",
]
