"""The demo model's recipe: one TOML file → data, VAE, transformer, export, evaluation; each stage resumable.

``flashportrait train model/training/demo.toml`` runs every stage in order; ``--stage NAME`` runs one. A stage whose
output exists is skipped (data clips, finished training runs), and an interrupted training run resumes bit-exactly
from its newest checkpoint, so training may span sessions: re-run the same command.

Stages and what they leave in ``out``:

1. ``data``: ``data/train/*.npz``, ``data/held_out/*.npz`` (:mod:`.data`).
2. ``vae``: ``vae/checkpoint-*.safetensors``, ``vae/loss.{csv,png}``, ``vae/summary.json`` (held-out PSNR, the latent
   mean/std the transformer is trained on) (:mod:`.vae_stage`).
3. ``dit``: ``dit/latents.safetensors`` (the frozen parts' outputs, cached), ``dit/checkpoint-*.safetensors``,
   ``dit/loss.{csv,png}`` (:mod:`.dit_stage`).
4. ``export``: the preset's weights file (EMA weights of the VAE, transformer and portrait encoder) and its SHA-256.
5. ``evaluate``: ``evaluation.json`` — the quality figures on the held-out identities (:mod:`.evaluate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file

from ..components import (
    FlashPortraitComponents,
    build_components,
    load_weights_file,
    preset_weights_file,
    safetensors_metadata,
)
from ..presets import ModelPreset, get_preset
from . import STAGES
from .data import Clip, DataConfig, build_dataset
from .dit_stage import DitStageConfig, LatentClip, TrainableParts, dit_loss_fn, precompute, prompt_table
from .loop import CHECKPOINT_GLOB, OptimConfig, TrainingRun
from .vae_stage import VaeStageConfig, latent_statistics, reconstruction_psnr, vae_loss_fn


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; read from a TOML file by :func:`load_config`."""

    preset: str = "demo"
    version: str | None = None  # the exported file's version; None = the preset's
    out: str = "out/training"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    threads: int = 0  # torch CPU threads; 0 = torch's default
    weights_out: str | None = None  # where export writes the weights file; None = the preset's file in the package
    # Continue an earlier export instead of starting from the seeded initialisation: its VAE is reused, frozen (the
    # vae stage is skipped), and its transformer and portrait encoder start the dit stage. The digest is required.
    init_from: str | None = None
    init_sha256: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    vae: VaeStageConfig = field(default_factory=VaeStageConfig)
    vae_optim: OptimConfig = field(default_factory=OptimConfig)
    dit: DitStageConfig = field(default_factory=DitStageConfig)
    dit_optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def __post_init__(self) -> None:
        if self.init_from is not None and not self.init_sha256:
            raise ValueError(
                f"init_from = {self.init_from!r} needs init_sha256 (the file's SHA-256), so a recipe "
                "continues the exact weights it names"
            )

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def base_preset(self) -> ModelPreset:
        """The preset's architecture with its seeded initialisation (no trained weights: they are what we make)."""
        preset = get_preset(self.preset)
        if preset.init_seed is None:
            raise ValueError(f"preset {self.preset!r} has no seeded initialisation; train a preset that has one")
        return dataclasses.replace(preset, weights=None, weights_sha256=None)


def load_config(path: str | Path) -> TrainConfig:
    """Read a training TOML: top-level keys, then tables [data], [vae], [vae.optim], [dit], [dit.optim].

    Raises:
        ValueError: on an unknown key or a bad value, naming the file and the key.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"training config {path} does not exist (see model/training/demo.toml)") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML ({error})") from None
    try:
        vae, dit = dict(raw.pop("vae", {})), dict(raw.pop("dit", {}))
        sections = {
            "data": _build(DataConfig, raw.pop("data", {}), "data"),
            "vae_optim": _build(OptimConfig, vae.pop("optim", {}), "vae.optim"),
            "vae": _build(VaeStageConfig, vae, "vae"),
            "dit_optim": _build(OptimConfig, dit.pop("optim", {}), "dit.optim"),
            "dit": _build(DitStageConfig, dit, "dit"),
        }
        return _build(TrainConfig, {**raw, **sections}, "top level")
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def _build(kind: type, values: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{where}]; known: {sorted(known)}")
    if "betas" in values:
        values = {**values, "betas": tuple(values["betas"])}
    return kind(**values)


# ---- stages -------------------------------------------------------------------------------------------------------


def run_stages(config: TrainConfig, stages: tuple[str, ...] = STAGES, *, max_steps: int | None = None) -> dict:
    """Run ``stages`` in order; ``max_steps`` stops each training stage early (it resumes later). A summary dict."""
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"unknown training stage {stage!r}; stages: {', '.join(STAGES)}")
    if config.threads:
        torch.set_num_threads(config.threads)
    summary: dict[str, Any] = {}
    for stage in stages:
        started = time.perf_counter()
        logger.info("stage %s", stage)
        summary[stage] = STAGE_FUNCTIONS[stage](config, max_steps)
        summary[stage]["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def stage_data(config: TrainConfig, max_steps: int | None = None) -> dict:
    train, held_out = build_dataset(config.data, config.out_dir / "data", progress=_progress("data"))
    return {"train_clips": len(train), "held_out_clips": len(held_out)}


def _progress(name: str):
    def report(done: int, total: int) -> None:
        if done % 10 == 0 or done == total:
            logger.info("%s: %d/%d", name, done, total)

    return report


def load_clips(config: TrainConfig, split: str) -> list[Clip]:
    paths = sorted((config.out_dir / "data" / split).glob("*.npz"))
    if not paths:
        raise FileNotFoundError(f"no {split} clips in {config.out_dir / 'data'}; run the data stage first")
    return [Clip.load(p) for p in paths]


def build_vae(config: TrainConfig) -> AutoencoderKLWan:
    torch.manual_seed(config.base_preset().init_seed + 2)  # the same draw build_components makes
    return AutoencoderKLWan(**config.base_preset().vae)


def stage_vae(config: TrainConfig, max_steps: int | None = None) -> dict:
    if config.init_from:
        metadata = safetensors_metadata(_init_file(config))
        logger.info("vae: reusing the VAE of %s (%s steps), frozen", config.init_from, metadata.get("vae_steps"))
        return {"from": config.init_from, "step": int(metadata.get("vae_steps", 0)), "finished": True}
    folder = config.out_dir / "vae"
    vae = build_vae(config).to(config.torch_device())
    clips = load_clips(config, "train")
    optim = config.vae_optim
    run = TrainingRun("vae", vae, vae_loss_fn(vae, clips, config.vae, optim.batch, optim.seed), optim, folder)
    run.resume()
    run.run(until=max_steps)
    if run.step < optim.steps:
        return {"step": run.step, "finished": False}
    vae = trained_vae(config)
    held_out = load_clips(config, "held_out")
    mean, std = latent_statistics(vae, clips[:: max(1, len(clips) // 48)])
    summary = {
        "step": run.step,
        "finished": True,
        "held_out_psnr_db": round(reconstruction_psnr(vae, held_out), 2),
        "train_psnr_db": round(reconstruction_psnr(vae, clips[:8]), 2),
        "latents_mean": mean,
        "latents_std": std,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _newest_checkpoint(folder: Path) -> Path:
    found = sorted(folder.glob(CHECKPOINT_GLOB))
    if not found:
        raise FileNotFoundError(f"no checkpoint in {folder}; run its training stage first")
    return found[-1]


def _ema_weights(folder: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    tensors = load_file(str(_newest_checkpoint(folder)))
    return {name[len("ema." + prefix) :]: t for name, t in tensors.items() if name.startswith("ema." + prefix)}


def _init_file(config: TrainConfig) -> Path:
    path = Path(config.init_from)
    if not path.is_file():
        raise FileNotFoundError(
            f"init_from = {config.init_from!r} does not exist; make it with the recipe that exported it (see "
            "docs/demo-model.md) or restore it from the repository's history"
        )
    return path


def initial_components(config: TrainConfig) -> FlashPortraitComponents:
    """The seeded parts, overwritten by ``init_from``'s weights when the recipe continues an earlier export."""
    components = build_components(config.base_preset())
    if config.init_from:
        load_weights_file(components, _init_file(config), config.init_sha256)
    return components


def trained_vae(config: TrainConfig) -> AutoencoderKLWan:
    """The VAE with the EMA weights of the newest stage-1 checkpoint (and its latent statistics once known), or the
    one ``init_from`` carries."""
    if config.init_from:
        return initial_components(config).vae.eval().requires_grad_(False)
    vae = build_vae(config)
    vae.load_state_dict(_ema_weights(config.out_dir / "vae"))
    stats = config.out_dir / "vae" / "summary.json"
    if stats.exists():
        summary = json.loads(stats.read_text())
        vae.register_to_config(latents_mean=summary["latents_mean"], latents_std=summary["latents_std"])
    return vae.eval().requires_grad_(False)


def stage_components(config: TrainConfig) -> FlashPortraitComponents:
    """The seeded parts (or ``init_from``'s), with the trained VAE (frozen) in place: what stage 2 trains on."""
    if config.init_from:
        components = initial_components(config)
        components.vae.eval().requires_grad_(False)
        return components
    if not (config.out_dir / "vae" / "summary.json").exists():
        raise FileNotFoundError(f"the VAE stage has not finished in {config.out_dir / 'vae'}; run it first")
    components = build_components(config.base_preset())
    components.vae = trained_vae(config)
    return components


def stage_dit(config: TrainConfig, max_steps: int | None = None) -> dict:
    components = stage_components(config)
    clips = cached_latent_clips(config, components)
    prompts = prompt_table(components)
    device = config.torch_device()
    parts = TrainableParts(components).to(device).requires_grad_(True)
    if config.dit.gradient_checkpointing:
        parts.transformer.enable_gradient_checkpointing()
    optim = config.dit_optim
    tau = components.preset.portrait_encoder.tokens_per_frame
    loss = dit_loss_fn(parts, clips, prompts, config.dit, optim.batch, optim.seed, tau)
    run = TrainingRun("dit", parts, loss, optim, config.out_dir / "dit")
    run.resume()
    losses = run.run(until=max_steps)
    return {"step": run.step, "finished": run.step >= optim.steps, "last_loss": losses[-1] if losses else None}


def cached_latent_clips(config: TrainConfig, components: FlashPortraitComponents) -> list[LatentClip]:
    """Stage 2's frozen inputs per clip, computed once and cached beside the checkpoints (keyed by the VAE)."""
    path = config.out_dir / "dit" / "latents.safetensors"
    vae_source = config.init_sha256 if config.init_from else _newest_checkpoint(config.out_dir / "vae").name
    vae_key = f"{vae_source} agreement>={config.dit.min_feature_agreement}"
    names = [f.name for f in dataclasses.fields(LatentClip)]
    if path.exists():
        if safetensors_metadata(path).get("vae") == vae_key:
            tensors = load_file(str(path))
            count = len({k.split(".")[0] for k in tensors})
            return [LatentClip(**{n: tensors[f"{i}.{n}"] for n in names}) for i in range(count)]
    clips = []
    usable = [c for c in load_clips(config, "train") if not c.feature_agreement() < config.dit.min_feature_agreement]
    logger.info(
        "dit: %d training clips whose features follow the rendered mouth (r >= %.2f or a still mouth)",
        len(usable),
        config.dit.min_feature_agreement,
    )
    for number, clip in enumerate(usable):
        clips.append(precompute(components, clip, config.dit))
        if (number + 1) % 20 == 0:
            logger.info("latents: %d clips", number + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{n}": getattr(c, n).contiguous() for i, c in enumerate(clips) for n in names}
    save_file(tensors, str(path), metadata={"vae": vae_key})
    return clips


def stage_export(config: TrainConfig, max_steps: int | None = None) -> dict:
    """Write the preset's weights file from the EMA weights, and print the SHA-256 to put in the preset."""
    preset = get_preset(config.preset)
    dit_step = int(safetensors_metadata(_newest_checkpoint(config.out_dir / "dit"))["step"])
    if config.init_from:
        earlier = safetensors_metadata(_init_file(config))
        vae = trained_vae(config)
        tensors = {f"vae.{k}": v for k, v in vae.state_dict().items()}
        vae_summary = {
            "latents_mean": vae.config.latents_mean,
            "latents_std": vae.config.latents_std,
            "step": earlier.get("vae_steps", "0"),
        }
        dit_total = int(earlier.get("dit_steps", 0)) + dit_step
        lineage = {"continues": f"{earlier.get('version', '?')} sha256:{config.init_sha256}"}
    else:
        vae_summary = json.loads((config.out_dir / "vae" / "summary.json").read_text())
        tensors = {f"vae.{k}": v for k, v in _ema_weights(config.out_dir / "vae").items()}
        dit_total, lineage = dit_step, {}
    tensors.update(_ema_weights(config.out_dir / "dit"))  # transformer.* and portrait_encoder.*
    metadata = {
        "preset": preset.name,
        "version": config.version or preset.version,
        "latents_mean": json.dumps(vae_summary["latents_mean"]),
        "latents_std": json.dumps(vae_summary["latents_std"]),
        "vae_steps": str(vae_summary["step"]),
        "dit_steps": str(dit_total),
        **lineage,
    }
    path = Path(config.weights_out) if config.weights_out else preset_weights_file(preset)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    canonicalise_safetensors_header(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    logger.info("wrote %s (%.1f MB), sha256 %s", path, path.stat().st_size / 1e6, digest)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest}


def canonicalise_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, so the same weights and metadata give the same
    bytes (and SHA-256) on every export: safetensors writes the metadata from a hash map, in a different order on
    each run, which would make a recipe's digest unreproducible. Offsets count from the end of the header, so the
    tensor data is untouched; the header is padded with spaces to 8 bytes as the format allows."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])


def stage_evaluate(config: TrainConfig, max_steps: int | None = None) -> dict:
    from .evaluate import evaluate_preset

    held_out = load_clips(config, "held_out")
    preset = get_preset(config.preset)
    if config.weights_out:  # the file this recipe exported, not the one shipped with the package
        preset = dataclasses.replace(preset, weights=str(Path(config.weights_out).resolve()), weights_sha256=None)
    result = evaluate_preset(preset, held_out, fps=config.data.fps)
    (config.out_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    return result


STAGE_FUNCTIONS = {
    "data": stage_data,
    "vae": stage_vae,
    "dit": stage_dit,
    "export": stage_export,
    "evaluate": stage_evaluate,
}
