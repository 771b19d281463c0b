"""Tiny released-model folders in the official layouts, built from the parity fixture (shared by the checkpoint
tests and the end-to-end released-model test)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


FIXTURE = Path(__file__).parent / "fixtures" / "parity"


def official_transformer() -> dict[str, torch.Tensor]:
    """The parity fixture's transformer.pt: the whole tiny transformer under Wan-native names."""
    return torch.load(FIXTURE / "transformer.pt", weights_only=True)


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, stem: str = "diffusion_pytorch_model") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:])):
        save_file({k: tensors[k].contiguous() for k in part}, folder / f"{stem}-0000{i + 1}-of-00002.safetensors")


def flashportrait_overlay(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What FlashPortrait fine-tuned at least: every attention weight of every block, plus the new projections."""
    return {k: v for k, v in official.items() if ".self_attn." in k or ".cross_attn." in k}


def tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "▁abcdefghijklmnopqrstuvwxyz"]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)


def flashportrait_folder(root: Path, official) -> Path:
    root.mkdir(parents=True)
    torch.save(flashportrait_overlay(official), root / "transformer.pt")
    shutil.copy(FIXTURE / "portrait_encoder.pt", root / "portrait_encoder.pt")
    return root


def original_layout_base(root: Path, official: dict[str, torch.Tensor]) -> Path:
    """A Wan2.1-I2V base folder in the original layout (config.json + shards + Wan .pth files + tokenizer)."""
    shutil.copytree(FIXTURE / "wan_original", root)
    write_shards({k: v for k, v in official.items() if "emo_" not in k}, root)
    (root / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 128, "num_heads": 1}))
    tiny_tokenizer(root / "google" / "umt5-xxl")
    return root
