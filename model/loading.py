"""Build the released FlashPortrait-14B (or any model in the same file layouts) from a ``--base`` and a FlashPortrait
folder, path or URL.

Two layouts of the Wan2.1-I2V-14B-720P base are recognised by their files:

- **diffusers** (``Wan-AI/Wan2.1-I2V-14B-720P-Diffusers``): ``transformer/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``image_encoder/`` (``image_processor/`` is not needed: the reference is squashed to the CLIP size
  as the official code does);
- **original** (``Wan-AI/Wan2.1-I2V-14B-720P``): ``config.json`` + ``diffusion_pytorch_model*.safetensors`` with
  Wan-native keys, ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
  ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` and the tokenizer folder ``google/umt5-xxl/``.

The FlashPortrait folder (``FrancisRing/FlashPortrait``) holds ``transformer.pt``, ``portrait_encoder.pt``,
``pd_fpg.pth``, ``face_det.onnx``, ``face_landmark.onnx`` and, for ``--fast``, ``fast_lora_rank64.safetensors``.
Remote URLs (``s3://…``) are copied once into a local cache first: the loaders memory-map files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from .checkpoints import (
    CheckpointError,
    TensorSource,
    empty_weights,
    infer_clip_vision_config,
    infer_t5_config,
    infer_wan_vae_config,
    load_flashportrait_transformer,
    load_into,
    load_into_tied,
    load_portrait_encoder,
    read_state_dict,
    wan_clip_vision_state,
    wan_t5_names,
    wan_vae_names,
)
from .components import (
    FlashPortraitComponents,
    UMT5Tokenizer,
    build_components,
    preset_weights_file,
    sha256_file,
)
from .presets import FLASHPORTRAIT_14B, FLASHPORTRAIT_14B_FAST, ModelPreset, get_preset


logger = logging.getLogger(__name__)

ORIGINAL_VAE = "Wan2.1_VAE.pth"
ORIGINAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
ORIGINAL_TOKENIZER = "google/umt5-xxl"
# What the model components need; pd_fpg.pth, face_det.onnx and face_landmark.onnx are read by the pdfgc extractor.
FLASHPORTRAIT_FILES = ("transformer.pt", "portrait_encoder.pt")
FAST_LORA = "fast_lora_rank64.safetensors"
# The ViT-H/14 image tower has 16 heads; the head count is the one size its tensors do not carry.
CLIP_VIT_H_HEADS = 16


# 1. Where the files are -------------------------------------------------------------------------------------------
def resolve_local(location: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local folder for ``location``: itself when local, else a one-time copy of the remote folder (fsspec).

    The copy goes to ``cache_dir`` (default ``~/.cache/flashportrait``) under a hash of the URL and is reused once it
    is complete (a marker file is written last, so an interrupted copy is redone).
    """
    text = str(location)
    if "://" not in text or text.startswith("file://"):
        path = Path(text.removeprefix("file://")).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model folder {path} does not exist; see docs/released-model.md for the files")
        return path
    import fsspec

    cache = Path(cache_dir or Path.home() / ".cache" / "flashportrait").expanduser()
    target = cache / hashlib.sha256(text.encode()).hexdigest()[:16]
    marker = target / ".complete"
    if not marker.exists():
        fs, root = fsspec.core.url_to_fs(text)
        if not fs.exists(root):
            raise FileNotFoundError(f"model location {text} does not exist")
        logger.info("copying %s to %s (once)", text, target)
        target.mkdir(parents=True, exist_ok=True)
        fs.get(root.rstrip("/") + "/", str(target) + "/", recursive=True)
        marker.write_text(text)
    return target


@dataclass(frozen=True)
class BaseLayout:
    """The Wan2.1-I2V base files, whichever layout they came in."""

    kind: str  # "diffusers" or "original"
    root: Path
    transformer_files: tuple[Path, ...]
    transformer_config: dict

    def path(self, part: str) -> Path:
        names = {
            "diffusers": {
                "vae": "vae",
                "text_encoder": "text_encoder",
                "tokenizer": "tokenizer",
                "clip": "image_encoder",
            },
            "original": {
                "vae": ORIGINAL_VAE,
                "text_encoder": ORIGINAL_T5,
                "tokenizer": ORIGINAL_TOKENIZER,
                "clip": ORIGINAL_CLIP,
            },
        }
        return self.root / names[self.kind][part]


def _shards(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.glob("*.safetensors") if p.is_file()))


def detect_base_layout(root: str | Path) -> BaseLayout:
    """Recognise the diffusers or the original Wan2.1 layout in ``root``; the error lists what each one lacks."""
    root = Path(root)
    diffusers_needs = [
        "transformer/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer",
        "image_encoder/config.json",
    ]
    original_needs = ["config.json", ORIGINAL_VAE, ORIGINAL_T5, ORIGINAL_CLIP, ORIGINAL_TOKENIZER]
    lacking_diffusers = [n for n in diffusers_needs if not (root / n).exists()]
    lacking_original = [n for n in original_needs if not (root / n).exists()]
    if not lacking_diffusers and _shards(root / "transformer"):
        config = json.loads((root / "transformer" / "config.json").read_text())
        return BaseLayout("diffusers", root, _shards(root / "transformer"), config)
    if not lacking_original and _shards(root):
        config = json.loads((root / "config.json").read_text())
        return BaseLayout("original", root, _shards(root), config)
    lacking_diffusers = lacking_diffusers or ["transformer/*.safetensors"]
    lacking_original = lacking_original or ["diffusion_pytorch_model*.safetensors"]
    raise FileNotFoundError(
        f"{root} is neither a diffusers Wan2.1-I2V folder (missing: {lacking_diffusers}) nor an original Wan2.1-I2V "
        f"folder (missing: {lacking_original}); see docs/released-model.md"
    )


@dataclass(frozen=True)
class FlashPortraitFiles:
    """The files of the FlashPortrait release in one folder."""

    root: Path

    @classmethod
    def from_dir(cls, root: str | Path, fast: bool = False) -> FlashPortraitFiles:
        root = Path(root)
        needed = FLASHPORTRAIT_FILES + ((FAST_LORA,) if fast else ())
        missing = [n for n in needed if not (root / n).is_file()]
        if missing:
            raise FileNotFoundError(f"FlashPortrait folder {root} lacks {missing}; see docs/released-model.md")
        return cls(root)

    def __getattr__(self, name: str) -> Path:
        files = {
            "transformer": "transformer.pt",
            "portrait_encoder": "portrait_encoder.pt",
            "pd_fpg": "pd_fpg.pth",
            "face_det": "face_det.onnx",
            "face_landmark": "face_landmark.onnx",
            "fast_lora": FAST_LORA,
        }
        if name in files:
            return self.root / files[name]
        raise AttributeError(name)


# 2. Base components, either layout --------------------------------------------------------------------------------
def load_vae(layout: BaseLayout) -> AutoencoderKLWan:
    """The Wan VAE in fp32 (the sampler hands it fp32 latents; 127 M parameters)."""
    if layout.kind == "diffusers":
        config = AutoencoderKLWan.load_config(layout.path("vae"))
        source = TensorSource.from_files(_shards(layout.path("vae")))
    else:
        source = TensorSource.from_files([layout.path("vae")], rename=wan_vae_names)
        config = infer_wan_vae_config(source.shapes)
    with empty_weights():
        vae = AutoencoderKLWan.from_config(config)
    return load_into(vae, source, "Wan VAE", torch.float32)


def load_text_encoder(layout: BaseLayout, dtype: torch.dtype) -> UMT5EncoderModel:
    if layout.kind == "diffusers":
        config = UMT5Config.from_pretrained(layout.path("text_encoder"))
        source = TensorSource.from_files(_shards(layout.path("text_encoder")))
    else:
        source = TensorSource.from_files([layout.path("text_encoder")], rename=wan_t5_names)
        config = UMT5Config(**infer_t5_config(source.shapes))
    with empty_weights():
        model = UMT5EncoderModel(config)
    return load_into_tied(model, source, "umt5 text encoder", dtype)


def load_image_encoder(layout: BaseLayout, dtype: torch.dtype, num_heads: int = CLIP_VIT_H_HEADS) -> CLIPVisionModel:
    if layout.kind == "diffusers":
        config = CLIPVisionConfig.from_pretrained(layout.path("clip"))
        raw = {}
        for shard in _shards(layout.path("clip")):
            raw.update(read_state_dict(shard))
        # On disk the tower sits under "vision_model."; the diffusers repo stores no projection head.
        tensors = {k.removeprefix("vision_model."): v for k, v in raw.items()}
        source = TensorSource.from_tensors(tensors, layout.path("clip"))
    else:
        state = read_state_dict(layout.path("clip"))
        source = TensorSource.from_tensors(wan_clip_vision_state(state), layout.path("clip"))
        config = CLIPVisionConfig(**infer_clip_vision_config(source.shapes, num_heads))
    with empty_weights():
        model = CLIPVisionModel(config)
    return load_into(model, source, "CLIP image encoder", dtype)


# 3. Everything ----------------------------------------------------------------------------------------------------
def released_preset(
    transformer_config: dict,
    vae: AutoencoderKLWan,
    text_encoder,
    image_encoder,
    portrait_encoder,
    dtype: str,
    tokenizer: Path,
    fast: bool,
) -> ModelPreset:
    """The flashportrait-14b(-fast) preset with every size replaced by what the files hold."""
    template = FLASHPORTRAIT_14B_FAST if fast else FLASHPORTRAIT_14B
    vae_keys = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")
    text_config = text_encoder.config.to_dict()
    return dataclasses.replace(
        template,
        transformer=dict(transformer_config),
        vae={k: vae.config[k] for k in vae_keys},
        text_encoder={k: text_config[k] for k in template.text_encoder if k in text_config},
        image_encoder={k: getattr(image_encoder.config, k) for k in template.image_encoder},
        portrait_encoder=portrait_encoder.config,
        dtype=dtype,
        tokenizer=str(tokenizer),
    )


def load_released_components(
    base: str | Path,
    flashportrait: str | Path,
    dtype: str = "bfloat16",
    fast: bool = False,
    cache_dir: str | Path | None = None,
) -> FlashPortraitComponents:
    """FlashPortraitComponents from the released files (any of the supported layouts), on the CPU.

    ``dtype`` is the run's precision for the transformer, T5 and CLIP ("bfloat16" as the official run, "float16" or
    "float32"); the portrait encoder stays fp32 like the official code, the VAE fp32. With ``fast`` the step-distill
    LoRA is merged into the transformer and the preset's sampling is the official 4-step schedule.
    Move the result with ``components.to("cuda")``.

    Raises:
        FileNotFoundError: a folder or file is missing (the message lists which).
        CheckpointError: a file is unreadable, unsafe, or its keys/shapes do not fit (the message names them).
    """
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    layout = detect_base_layout(resolve_local(base, cache_dir))
    files = FlashPortraitFiles.from_dir(resolve_local(flashportrait, cache_dir), fast=fast)
    logger.info("loading the %s-layout base from %s and FlashPortrait from %s", layout.kind, layout.root, files.root)

    transformer = load_flashportrait_transformer(
        files.transformer,
        layout.transformer_files,
        base_naming="diffusers" if layout.kind == "diffusers" else "wan",
        dtype=torch_dtype,
        base_config=layout.transformer_config,
    )
    if fast:
        from .step_distill import merge_step_distill_lora

        merge_step_distill_lora(transformer, files.fast_lora)
    vae = load_vae(layout)
    text_encoder = load_text_encoder(layout, torch_dtype)
    image_encoder = load_image_encoder(layout, torch_dtype)
    portrait_encoder = load_portrait_encoder(files.portrait_encoder)
    tokenizer_path = layout.path("tokenizer")
    transformer_config = {k: transformer.config[k] for k in FLASHPORTRAIT_14B.transformer}
    preset = released_preset(
        transformer_config, vae, text_encoder, image_encoder, portrait_encoder, dtype, tokenizer_path, fast
    )
    return FlashPortraitComponents(
        preset, transformer, vae, text_encoder, UMT5Tokenizer(tokenizer_path), image_encoder, portrait_encoder
    )


__all__ = [
    "BaseLayout",
    "CheckpointError",
    "FlashPortraitFiles",
    "detect_base_layout",
    "load_image_encoder",
    "load_released_components",
    "load_text_encoder",
    "load_vae",
    "resolve_local",
]


@dataclass(frozen=True)
class ModelSource:
    """Where a process gets its model: a named preset (random weights for ``tiny``), or the released files.

    Small and picklable: the coordinator hands it to every Ray worker, which builds its own copy on its device.
    """

    # The library-level default is the fast random preset (what tests and benches build); the entry points (CLI,
    # flow, deployments) pass DEFAULT_PRESET explicitly through RenderSettings.
    preset: str = "tiny"
    base: str | None = None  # Wan2.1-I2V-14B-720P folder/URL (diffusers or original layout)
    flashportrait: str | None = None  # folder/URL with transformer.pt, portrait_encoder.pt, …
    dtype: str = "bfloat16"
    fast: bool = False  # merge the step-distill LoRA and sample the official 4-step schedule

    def __post_init__(self) -> None:
        if (self.base is None) != (self.flashportrait is None):
            raise ValueError(
                "give both --base (the Wan2.1-I2V base) and --flashportrait (the FlashPortrait files), "
                "or neither (a preset with built-in weights)"
            )
        if self.fast and self.base is None:
            raise ValueError("--fast needs the released files (--base and --flashportrait): it merges their LoRA")

    @property
    def released(self) -> bool:
        return self.base is not None

    def describe(self) -> dict[str, object]:
        return {
            "preset": self.preset,
            "base": self.base,
            "flashportrait": self.flashportrait,
            "dtype": self.dtype,
            "fast": self.fast,
        }


def build_from_source(source: ModelSource) -> FlashPortraitComponents:
    if source.released:
        return load_released_components(source.base, source.flashportrait, dtype=source.dtype, fast=source.fast)
    return build_components(get_preset(source.preset))


def weights_digest(source: ModelSource, cache_dir: str | Path | None = None) -> dict[str, str]:
    """SHA-256 of every checkpoint file the source loads (recorded in every sidecar); for a built-in preset, of its
    frozen definition (its weights are a pure function of it)."""
    if not source.released:
        preset = get_preset(source.preset)
        digests = {f"preset:{preset.name}": hashlib.sha256(repr(preset).encode()).hexdigest()}
        if preset.weights is not None:
            digests[preset.weights] = sha256_file(preset_weights_file(preset))
        return digests
    digests: dict[str, str] = {}
    for root in (resolve_local(source.flashportrait, cache_dir), resolve_local(source.base, cache_dir)):
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and path.suffix in (".pt", ".pth", ".safetensors", ".onnx"):
                digests[str(path.relative_to(root))] = sha256_file(path)
    return digests
