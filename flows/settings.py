"""The run settings: one pydantic model, the one parameter of every entry point that renders.

``flashportrait render`` / ``batch`` / ``deploy`` / ``serve`` generate their options from these fields
(:func:`add_settings_options`), the ``render-manifest`` flow and both deployments' flows take a ``settings``
parameter of this type, and ``FLASHPORTRAIT_<FIELD>`` environment variables override the defaults of a process
(pydantic-settings; explicit values win). Each field is typed and range-checked here, once: adding a setting is one
edit to this class (``tests/flows/test_settings.py`` fails if an entry point cannot set a field).

Which settings decide the output bits is declared per field (``OUTPUT`` in its ``json_schema_extra``): those enter
every job's hash through :meth:`RenderSettings.output_parameters`, the rest (where to run, what inputs are allowed)
do not.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields as dataclass_fields
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flashportrait.infra.limits import Limits, env_name, flag
from flashportrait.infra.urls import UrlPolicy
from flashportrait.model.alp import ALP_PRESETS
from flashportrait.model.expression import available_extractors
from flashportrait.model.loading import ModelSource
from flashportrait.model.presets import DEFAULT_PRESET, PRESETS, get_preset


ENV_PREFIX = "FLASHPORTRAIT_"
ENCODER_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)
OUTPUT = {"output": True}  # json_schema_extra of a field that decides the output bits


def _cli(flag_name: str | None = None, *, output: bool = False, metavar: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"output": output}
    if flag_name:
        extra["flag"] = flag_name
    if metavar:
        extra["metavar"] = metavar
    return extra


class RenderSettings(BaseSettings):
    """How to render; the same for every job of a run (a manifest row may override steps, size, fps, seed, prompt and
    alp)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # Model
    preset: str = Field(
        DEFAULT_PRESET,
        description="model preset (demo = the CPU-trained demo model; tiny = random weights, for tests)",
        json_schema_extra={**_cli(output=True), "choices": sorted(PRESETS)},
    )
    base: str | None = Field(
        None,
        description="Wan2.1-I2V-14B-720P folder or URL (diffusers or original layout): run the released model",
        json_schema_extra=_cli(output=True, metavar="URL"),
    )
    flashportrait: str | None = Field(
        None,
        description="folder or URL of the released FlashPortrait files (transformer.pt, portrait_encoder.pt, "
        "pd_fpg.pth, the ONNX face models, fast_lora_rank64.safetensors); needs --base",
        json_schema_extra=_cli(output=True, metavar="URL"),
    )
    fast: bool = Field(
        False,
        description="merge the released step-distill LoRA and sample 4 steps",
        json_schema_extra=_cli(output=True),
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16",
        description="precision of the released transformer, T5 and CLIP",
        json_schema_extra=_cli(output=True),
    )
    extractor: str | None = Field(
        None,
        description="expression feature extractor: landmark (download-free, dlib), pdfgc (the released model's; "
        "needs its files), pixel (coarse, for tests); unset = pdfgc with the released files, else landmark",
        json_schema_extra={**_cli(output=True), "choices": available_extractors()},
    )
    # Sampling and encoding
    steps: int | None = Field(
        None,
        ge=1,
        description="denoising steps (unset = the preset's; a manifest row's 'steps' wins)",
        json_schema_extra=_cli(output=True, metavar="N"),
    )
    alp: str | None = Field(
        None,
        description="Adaptive Latent Prediction: skip most transformer calls by forecasting their features "
        "(balanced ≈ 3×, fast ≈ 6× fewer calls; paper = the paper's fixed-K reading); unset = off; a row's 'alp' "
        "wins",
        json_schema_extra={**_cli(output=True), "choices": list(ALP_PRESETS)},
    )
    crf: int = Field(
        18,
        ge=0,
        le=51,
        description="H.264 constant rate factor, 0 (lossless) to 51",
        json_schema_extra=_cli(output=True, metavar="N"),
    )
    encoder_preset: str = Field(
        "medium",
        description="x264 speed/size preset",
        json_schema_extra={**_cli(output=True), "choices": list(ENCODER_PRESETS)},
    )
    lenient_decode: bool = Field(
        False,
        description="keep the frames of a truncated or damaged driving video instead of failing the row; the "
        "sidecar records what was dropped (default: fail closed)",
        json_schema_extra=_cli(output=True),
    )
    allow_faceless_reference: bool = Field(
        False,
        description="render a row whose reference image shows no face, with a centred crop, instead of failing it "
        "(default: fail the row)",
        json_schema_extra=_cli(output=False),
    )
    # Where and how to run (not part of the output's identity)
    workers: int = Field(
        2,
        ge=0,
        description="Ray worker actors that share each video's windows; 0 = run in this process without Ray",
        json_schema_extra=_cli(metavar="N"),
    )
    ray_address: str | None = Field(
        None,
        description="a running Ray cluster (host:port or 'auto'); unset = $RAY_ADDRESS, else a local cluster",
        json_schema_extra=_cli(metavar="ADDRESS"),
    )
    scratch_dir: str | None = Field(
        None,
        description="folder for each job's scratch files (unset = the system's temporary folder)",
        json_schema_extra=_cli(metavar="DIR"),
    )
    force: bool = Field(
        False,
        description="re-render and replace outputs already published (default: skip rows published with the same "
        "job hash)",
        json_schema_extra=_cli(),
    )
    # Input policy and limits
    allowed_schemes: list[str] = Field(
        ["s3", "file"],
        description="URL scheme rows may use (repeatable; http/https also need --allow-http-host)",
        json_schema_extra=_cli("allow-scheme", metavar="SCHEME"),
    )
    allowed_http_hosts: list[str] = Field(
        [],
        description="host that http(s) inputs may come from (repeatable)",
        json_schema_extra=_cli("allow-http-host", metavar="HOST"),
    )
    allowed_local_roots: list[str] = Field(
        [],
        description="folder local inputs may live in besides the manifest's own folder (repeatable)",
        json_schema_extra=_cli("allow-local-root", metavar="DIR"),
    )
    allowed_prefixes: list[str] = Field(
        [],
        description="if given, remote inputs must start with one of these prefixes (repeatable)",
        json_schema_extra=_cli("allow-prefix", metavar="URL"),
    )
    limits: dict[str, float] = Field(
        {},
        description="overrides of the resource limits (each also FLASHPORTRAIT_<NAME>; see infra/limits.py)",
        json_schema_extra=_cli(),
    )

    @field_validator("preset", "alp", "extractor", "encoder_preset")
    @classmethod
    def _one_of_its_choices(cls, value: str | None, info: ValidationInfo) -> str | None:
        """The fields with a ``choices`` list (the same list the CLI offers); unset (None) stays allowed."""
        choices = cls.model_fields[info.field_name].json_schema_extra["choices"]
        if value is not None and value not in choices:
            name = info.field_name.replace("_", " ")
            unset = " or leave it unset" if cls.model_fields[info.field_name].default is None else ""
            raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(choices)}{unset}")
        return value

    @field_validator("allowed_schemes")
    @classmethod
    def _schemes(cls, value: list[str]) -> list[str]:
        return [scheme.lower().removesuffix("://") for scheme in value]

    @field_validator("limits")
    @classmethod
    def _limits(cls, value: dict[str, float]) -> dict[str, float]:
        known = {f.name for f in dataclass_fields(Limits)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown limit(s) {unknown}; known: {', '.join(sorted(known))}")
        Limits.from_env({}, **value)  # range checks (> 0, min_fps < max_fps) with the limit's own message
        return value

    @model_validator(mode="after")
    def _released_files_together(self) -> RenderSettings:
        if (self.base is None) != (self.flashportrait is None):
            raise ValueError(
                "the released model needs its two folders: give both --base (Wan2.1-I2V-14B-720P) and "
                f"--flashportrait (its files); got base={self.base!r}, flashportrait={self.flashportrait!r}"
            )
        if self.fast and self.base is None:
            raise ValueError("--fast merges the released step-distill LoRA: it needs --base and --flashportrait")
        return self

    # -- derived ---------------------------------------------------------------------------------------------------
    @property
    def resolved_extractor(self) -> str:
        """The extractor a run uses: the one set, else pdfgc for the released model, else landmark."""
        return self.extractor or ("pdfgc" if self.flashportrait else "landmark")

    def url_policy(self) -> UrlPolicy:
        return UrlPolicy(
            allowed_schemes=frozenset(self.allowed_schemes),
            http_hosts=frozenset(h.lower() for h in self.allowed_http_hosts),
            local_roots=tuple(self.allowed_local_roots),
            allowed_prefixes=tuple(self.allowed_prefixes),
        )

    def resource_limits(self) -> Limits:
        return Limits.from_env(**self.limits)

    def model_source(self) -> ModelSource:
        return ModelSource(
            preset=self.preset, base=self.base, flashportrait=self.flashportrait, dtype=self.dtype, fast=self.fast
        )

    def output_parameters(self) -> dict[str, Any]:
        """The settings that decide the output bits, as they enter every job's hash: the output fields that differ
        from their defaults (a new field with a default leaves earlier hashes unchanged), the extractor as resolved,
        and the preset's version (new weights are new outputs)."""
        values: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            if not (info.json_schema_extra or {}).get("output"):
                continue
            value = getattr(self, name)
            if value != info.default:
                values[name] = value
        values["extractor"] = self.resolved_extractor
        values["preset_version"] = get_preset(self.preset).version
        return values

    def deployment_parameters(self) -> dict[str, Any]:
        """What a deployment stores: only the values set away from the defaults (the rest stay overridable by the
        worker's environment), without ``force`` (a per-run choice)."""
        return self.model_dump(exclude_defaults=True, exclude={"force"})


def settings_error_message(error: ValidationError, *, as_flags: bool = False) -> str:
    """One line per problem, naming the field (``as_flags``: its command-line option), without pydantic's links."""
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        where = ".".join(loc) or "settings"
        if as_flags and loc and loc[0] in RenderSettings.model_fields:
            where = "--" + flag(loc[1]) if loc[0] == "limits" and len(loc) > 1 else option_flag(loc[0])
        message = item["msg"].removeprefix("Value error, ")
        message = message.replace("greater than or equal to ", "≥ ").replace("less than or equal to ", "≤ ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


# The command line -------------------------------------------------------------------------------------------------
_GROUPS = {
    "released model": ("base", "flashportrait", "fast", "dtype"),
    "input policy and limits": (
        "lenient_decode",
        "allow_faceless_reference",
        "allowed_schemes",
        "allowed_http_hosts",
        "allowed_local_roots",
        "allowed_prefixes",
        "limits",
    ),
}
_GROUP_HELP = {
    "released model": "Run the released FlashPortrait-14B instead of a built-in preset (docs/released-model.md).",
    "input policy and limits": "What rows may point at, and the resource limits enforced before decoding. Every "
    "limit can also be set with the environment variable FLASHPORTRAIT_<NAME> (e.g. FLASHPORTRAIT_MAX_INPUT_PIXELS); "
    "flags win.",
}


def option_flag(name: str) -> str:
    info = RenderSettings.model_fields[name]
    return "--" + ((info.json_schema_extra or {}).get("flag") or flag(name))


def add_settings_options(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """One option per settings field (a limit per :class:`Limits` field), generated from the model; every default is
    None so that only what the user typed overrides the model (and its environment variables). ``defaults`` changes
    a field's default for one command (``render`` runs in-process: workers 0)."""
    defaults = defaults or {}
    groups = {title: parser.add_argument_group(title, _GROUP_HELP[title]) for title in _GROUPS}
    for name, info in RenderSettings.model_fields.items():
        if name == "limits":
            continue
        title = next((t for t, names in _GROUPS.items() if name in names), None)
        target = groups[title] if title else parser
        extra = info.json_schema_extra or {}
        default = defaults.get(name, info.default)
        shown = "unset" if default is None else ", ".join(default) if isinstance(default, list) else default
        help_text = f"{info.description} (default: {shown}; env {ENV_PREFIX}{name.upper()})"
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text.replace("%", "%%")}
        annotation = info.annotation
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kwargs.update(action="append", metavar=extra.get("metavar"))
        else:
            choices = extra.get("choices") or _literal_choices(annotation)
            if choices:
                kwargs["choices"] = choices
            else:
                kwargs["metavar"] = extra.get("metavar")
                kwargs["type"] = int if _is_int(annotation) else str
        target.add_argument(option_flag(name), **kwargs)
    limits_group = groups["input policy and limits"]
    current = Limits()
    for f in dataclass_fields(Limits):
        limits_group.add_argument(
            f"--{flag(f.name)}",
            dest=f"limit__{f.name}",
            type=type(getattr(current, f.name)),
            default=None,
            metavar="N",
            help=f"limit {f.name} (default {getattr(current, f.name)}; env {env_name(f.name)})",
        )
    parser.set_defaults(_settings_defaults=defaults)


def settings_from_args(args: argparse.Namespace) -> RenderSettings:
    """The settings the options of :func:`add_settings_options` describe (unset options keep the model's defaults).

    Raises:
        ValueError: one line per invalid value, naming its field.
    """
    command_defaults = getattr(args, "_settings_defaults", {})
    # A command's own default (render: workers 0) yields to the environment variable, as the model's defaults do.
    values: dict[str, Any] = {
        k: v for k, v in command_defaults.items() if f"{ENV_PREFIX}{k.upper()}" not in os.environ
    }
    for name in RenderSettings.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    limits = {
        key.removeprefix("limit__"): value
        for key, value in vars(args).items()
        if key.startswith("limit__") and value is not None
    }
    if limits:
        values["limits"] = limits
    try:
        return RenderSettings(**values)
    except ValidationError as error:
        raise ValueError(settings_error_message(error, as_flags=True)) from None


def _literal_choices(annotation: Any) -> list[str] | None:
    from typing import get_args, get_origin

    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return None


def _is_int(annotation: Any) -> bool:
    from typing import get_args

    return annotation is int or int in get_args(annotation)
