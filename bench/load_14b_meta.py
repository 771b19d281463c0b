"""Peak RAM of building the flashportrait-14b preset on the meta device (every part: DiT, T5, CLIP, VAE, portrait
encoder), i.e. what the loaders hold before the first tensor is read. Prints one JSON object.

    .venv/bin/python bench/load_14b_meta.py

The loaders then assign each tensor in the run's dtype as it is read (``model/checkpoints.py``), so the weights are
never held twice; this script measures the fixed cost under that (no weights are needed to run it).
"""

from __future__ import annotations

import json
import resource
import time


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    start = time.perf_counter()
    import torch
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from flashportrait.model.checkpoints import empty_weights
    from flashportrait.model.portrait_encoder import PortraitEncoder
    from flashportrait.model.presets import FLASHPORTRAIT_14B as preset
    from flashportrait.model.transformer_flashportrait import FlashPortraitTransformer

    after_imports = peak_rss_mib()
    with empty_weights():
        parts = {
            "transformer": FlashPortraitTransformer(**preset.transformer),
            "text_encoder": UMT5EncoderModel(UMT5Config(**preset.text_encoder)),
            "image_encoder": CLIPVisionModel(CLIPVisionConfig(**preset.image_encoder)),
            "vae": AutoencoderKLWan(**preset.vae),
            "portrait_encoder": PortraitEncoder(preset.portrait_encoder),
        }
    parameters = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    on_meta = all(p.is_meta for module in parts.values() for p in module.parameters())
    bf16_gib = {name: round(n * 2 / 2**30, 2) for name, n in parameters.items()}
    print(
        json.dumps(
            {
                "preset": preset.name,
                "device": "meta",
                "all_parameters_on_meta": on_meta,
                "parameters": parameters,
                "weights_bf16_gib_when_loaded": bf16_gib,
                "peak_rss_mib_after_imports": round(after_imports, 1),
                "peak_rss_mib_after_building_on_meta": round(peak_rss_mib(), 1),
                "seconds": round(time.perf_counter() - start, 2),
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
