"""Checkpoint loading: every official layout (tiny, same key names and nesting) loads with zero missing/unexpected
keys; corrupt, truncated, wrong-architecture and code-carrying files are refused with errors that name them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from released_files import flashportrait_folder, flashportrait_overlay, tiny_tokenizer, write_shards
from safetensors.torch import save_file

from flashportrait.model.checkpoints import (
    CheckpointError,
    empty_weights,
    infer_portrait_encoder_config,
    infer_transformer_config,
    load_flashportrait_transformer,
    load_portrait_encoder,
    module_shapes,
    read_state_dict,
)
from flashportrait.model.components import UMT5Tokenizer, encode_prompt
from flashportrait.model.loading import detect_base_layout, load_released_components
from flashportrait.model.portrait_encoder import PortraitEncoder, PortraitEncoderConfig
from flashportrait.model.presets import FLASHPORTRAIT_14B, FLASHPORTRAIT_14B_FAST
from flashportrait.model.step_distill import merge_step_distill_lora
from flashportrait.model.transformer_flashportrait import FlashPortraitTransformer


FIXTURE = Path(__file__).parents[1] / "fixtures" / "parity"
MARKER = "pwned-by-pickle-7f3a"


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    """The parity fixture's transformer.pt: the whole tiny transformer under Wan-native names."""
    return torch.load(FIXTURE / "transformer.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(official):
    return load_flashportrait_transformer(FIXTURE / "transformer.pt", dtype=torch.float32)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# Layouts -----------------------------------------------------------------------------------------------------------
def test_original_layout_base_plus_overlay_equals_the_whole_file(official, reference, tmp_path):
    base = {k: v for k, v in official.items() if "emo_" not in k}  # stock Wan2.1: no emotion projections
    write_shards(base, tmp_path / "wan")
    torch.save({"state_dict": flashportrait_overlay(official)}, tmp_path / "transformer.pt")  # wrapped, as allowed
    model = load_flashportrait_transformer(
        tmp_path / "transformer.pt", sorted((tmp_path / "wan").glob("*.safetensors")), "wan", torch.float32
    )
    assert_same_weights(model, reference)


def test_diffusers_layout_base_plus_overlay_equals_the_whole_file(official, reference, tmp_path):
    base = {k: v for k, v in reference.state_dict().items() if "emo_" not in k}  # diffusers names
    write_shards(base, tmp_path / "transformer")
    torch.save(flashportrait_overlay(official), tmp_path / "transformer.pt")
    model = load_flashportrait_transformer(
        tmp_path / "transformer.pt",
        sorted((tmp_path / "transformer").glob("*.safetensors")),
        "diffusers",
        torch.float32,
    )
    assert_same_weights(model, reference)


def test_stored_fp32_is_cast_to_the_run_dtype(reference):
    model = load_flashportrait_transformer(FIXTURE / "transformer.pt", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    key = "blocks.1.attn2.emo_v_proj.weight"
    assert torch.equal(model.state_dict()[key], reference.state_dict()[key].to(torch.bfloat16))


def test_missing_emotion_projections_are_an_error_not_random_weights(official, tmp_path):
    torch.save(
        {k: v for k, v in official.items() if "blocks.1.cross_attn.emo_k_proj" not in k}, tmp_path / "transformer.pt"
    )
    with pytest.raises(CheckpointError, match=r"1 missing keys \(would stay random\): blocks\.1\.attn2\.emo_k_proj"):
        load_flashportrait_transformer(tmp_path / "transformer.pt", dtype=torch.float32)


def test_released_dimensions_are_inferred_from_tensor_shapes():
    with empty_weights():
        transformer = FlashPortraitTransformer(**FLASHPORTRAIT_14B.transformer)
        encoder = PortraitEncoder(PortraitEncoderConfig())
    inferred = infer_transformer_config(module_shapes(transformer))
    assert inferred == {**FLASHPORTRAIT_14B.transformer, "patch_size": (1, 2, 2)}
    assert infer_portrait_encoder_config(module_shapes(encoder)) == PortraitEncoderConfig()


def test_released_components_from_the_original_layout(official, reference, tmp_path):
    base = tmp_path / "Wan2.1-I2V-14B-720P"
    shutil.copytree(FIXTURE / "wan_original", base)
    write_shards({k: v for k, v in official.items() if "emo_" not in k}, base)
    (base / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 128, "num_heads": 1}))
    tiny_tokenizer(base / "google" / "umt5-xxl")
    layout = detect_base_layout(base)
    assert layout.kind == "original"
    components = load_released_components(base, flashportrait_folder(tmp_path / "fp", official), dtype="float32")
    assert_same_weights(components.transformer, reference)
    assert components.preset.name == "flashportrait-14b" and components.preset.portrait_encoder.width == 32
    context = encode_prompt(components, "the astronaut talks")
    assert tuple(context.shape) == (1, 512, 16) and not context[0, 21:].any()


def test_released_components_from_the_diffusers_layout_with_the_fast_lora(official, reference, tmp_path):
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    base = tmp_path / "Wan2.1-I2V-14B-720P-Diffusers"
    write_shards({k: v for k, v in reference.state_dict().items() if "emo_" not in k}, base / "transformer")
    (base / "transformer" / "config.json").write_text(json.dumps({"num_attention_heads": 1}))
    AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(base / "vae")
    UMT5EncoderModel(
        UMT5Config(
            vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu"
        )
    ).save_pretrained(base / "text_encoder")
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=16,
            image_size=28,
            patch_size=14,
        )
    ).save_pretrained(base / "image_encoder")
    tiny_tokenizer(base / "tokenizer")
    fp = flashportrait_folder(tmp_path / "fp", official)
    lora = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, 128),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(128, 2),
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0),
    }
    save_file(lora, fp / "fast_lora_rank64.safetensors")
    assert detect_base_layout(base).kind == "diffusers"
    components = load_released_components(base, fp, dtype="float32", fast=True)
    assert components.preset.name == FLASHPORTRAIT_14B_FAST.name
    assert components.preset.sampling.sigmas == pytest.approx((1.0, 0.9375, 0.8333333, 0.625))
    delta = (
        components.transformer.state_dict()["blocks.0.attn1.to_q.weight"]
        - reference.state_dict()["blocks.0.attn1.to_q.weight"]
    )
    # The official merge: up @ down, strength 1, no alpha/rank scaling (alpha 2 / rank 2 would be a no-op anyway,
    # so the check is on the exact product).
    assert torch.allclose(
        delta,
        lora["diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
        @ lora["diffusion_model.blocks.0.self_attn.q.lora_down.weight"],
        atol=1e-5,
    )
    assert isinstance(components.tokenizer, UMT5Tokenizer)


def test_an_incomplete_base_folder_says_what_is_missing(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing: \['transformer/config.json'"):
        detect_base_layout(tmp_path)


# Step-distill LoRA -----------------------------------------------------------------------------------------------
def test_lora_merge_follows_the_official_rules(reference, tmp_path):
    model = load_flashportrait_transformer(FIXTURE / "transformer.pt", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 128, generator=g), torch.randn(128, 4, generator=g)
    tensors = {
        "diffusion_model.blocks.1.cross_attn.o.lora_A.weight": down,
        "diffusion_model.blocks.1.cross_attn.o.lora_B.weight": up,
        "diffusion_model.blocks.1.cross_attn.o.alpha": torch.tensor(8.0),  # ignored, as officially
        "diffusion_model.blocks.0.norm3.diff": torch.full((128,), 0.5),  # norm3 is diffusers' norm2
        "diffusion_model.blocks.0.norm3.diff_b": torch.full((128,), -0.25),
        "diffusion_model.blocks.0.modulation.diff": torch.full((1, 6, 128), 0.125),  # no .weight: the bare name
        "diffusion_model.head.modulation.diff": torch.full((1, 2, 128), 1.0),
        "diffusion_model.not_in_the_model.lora_down.weight": torch.zeros(1, 1),
        "diffusion_model.not_in_the_model.lora_up.weight": torch.zeros(1, 1),
    }
    save_file(tensors, tmp_path / "fast_lora_rank64.safetensors")
    report = merge_step_distill_lora(model, tmp_path / "fast_lora_rank64.safetensors", strength=0.5)
    assert (report.low_rank, report.diffs, report.ignored_alpha) == (1, 4, 1)
    assert report.skipped == ["not_in_the_model.weight"]
    ours, ref = model.state_dict(), reference.state_dict()
    assert torch.allclose(
        ours["blocks.1.attn2.to_out.0.weight"] - ref["blocks.1.attn2.to_out.0.weight"], 0.5 * up @ down, atol=1e-5
    )
    assert torch.allclose(ours["blocks.0.norm2.weight"] - ref["blocks.0.norm2.weight"], torch.full((128,), 0.25))
    assert torch.allclose(ours["blocks.0.norm2.bias"] - ref["blocks.0.norm2.bias"], torch.full((128,), -0.125))
    assert torch.allclose(
        ours["blocks.0.scale_shift_table"] - ref["blocks.0.scale_shift_table"], torch.full((1, 6, 128), 0.0625)
    )
    assert torch.allclose(ours["scale_shift_table"] - ref["scale_shift_table"], torch.full((1, 2, 128), 0.5))
    assert torch.equal(ours["blocks.0.attn2.emo_k_proj.weight"], ref["blocks.0.attn2.emo_k_proj.weight"])


def test_a_lora_for_another_model_is_refused(tmp_path):
    model = load_flashportrait_transformer(FIXTURE / "transformer.pt", dtype=torch.float32)
    save_file(
        {"lora_unet_down.lora_down.weight": torch.zeros(1, 4), "lora_unet_down.lora_up.weight": torch.zeros(4, 1)},
        tmp_path / "other.safetensors",
    )
    with pytest.raises(CheckpointError, match="none of its 2 tensors matches a transformer weight"):
        merge_step_distill_lora(model, tmp_path / "other.safetensors")


# Refused files -----------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs a shell command that writes the marker file — unless unpickling is refused."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo {MARKER} > {self.target}",))


def test_a_pickle_that_carries_code_is_refused_and_never_runs(tmp_path, caplog):
    target = tmp_path / "marker.txt"
    torch.save({"blocks.0.weight": torch.zeros(1), "payload": Payload(target)}, tmp_path / "transformer.pt")
    with pytest.raises(CheckpointError, match=r"refused to load .*transformer\.pt: it is a pickle") as error:
        load_flashportrait_transformer(tmp_path / "transformer.pt")
    assert not target.exists()
    assert MARKER not in str(error.value) and MARKER not in caplog.text


def test_a_corrupt_file_is_refused(tmp_path):
    (tmp_path / "portrait_encoder.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=r"cannot read .*portrait_encoder\.pt: not a complete PyTorch"):
        load_portrait_encoder(tmp_path / "portrait_encoder.pt")


@pytest.mark.parametrize("name", ["transformer.pt", "transformer.safetensors"])
def test_a_truncated_file_is_refused(official, tmp_path, name):
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save(official, path)
    else:
        save_file({k: v.contiguous() for k, v in official.items()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read .*{name}.*(truncated or corrupt|download it again)"):
        read_state_dict(path)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    # portrait_encoder.pt given where transformer.pt belongs.
    with pytest.raises(CheckpointError, match=r"infer the transformer dimensions: key 'patch_embedding\.weight'"):
        load_flashportrait_transformer(FIXTURE / "portrait_encoder.pt")
    extra = read_state_dict(FIXTURE / "portrait_encoder.pt")
    extra["proj_model.extra_proj.weight"] = torch.zeros(1)
    torch.save(extra, tmp_path / "portrait_encoder.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: proj_model\.extra_proj\.weight"):
        load_portrait_encoder(tmp_path / "portrait_encoder.pt")


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint file .*nope\.pt does not exist"):
        read_state_dict(tmp_path / "nope.pt")
