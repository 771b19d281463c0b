"""One settings model for every entry point: each field settable from the CLI, the flows and the deployments, range
checks in one place, environment overrides, and a job hash that survives new settings."""

from __future__ import annotations

import inspect
from typing import Any, get_args

import pytest
from pydantic import Field

from flashportrait.flows import deployments as dep
from flashportrait.flows.cli import build_parser, main
from flashportrait.flows.manifest import Job
from flashportrait.flows.publishing import JOB_HASH_SCHEMA, job_hash
from flashportrait.flows.render import render_manifest
from flashportrait.flows.settings import RenderSettings, option_flag, settings_from_args


RELEASED = {"base": "/models/wan", "flashportrait": "/models/fp"}  # the two travel together


def changed_value(name: str) -> Any:
    """A valid value of field ``name`` other than its default, derived from the field itself, so a new field is
    covered by every test below without editing them."""
    info = RenderSettings.model_fields[name]
    extra = info.json_schema_extra or {}
    default = info.default
    if choices := extra.get("choices") or list(get_args(info.annotation)) * (name == "dtype"):
        return next(c for c in choices if c != default)
    if info.annotation is bool:
        return not default
    if name == "limits":
        return {"max_fps": 90.0}
    if isinstance(default, list):
        return ["s3", "https"] if name == "allowed_schemes" else ["x-" + name]
    if name in RELEASED:
        return RELEASED[name]
    if "int" in str(info.annotation):
        return 7 if default is None else default + 1
    return f"value-of-{name}"


def settings_with(name: str) -> RenderSettings:
    values = {name: changed_value(name)}
    if name in ("base", "flashportrait", "fast"):
        values = {**RELEASED, **values}
    return RenderSettings(**values)


def cli_args(name: str, value: Any) -> list[str]:
    option = option_flag(name)
    if name == "limits":
        return [f"--{key.replace('_', '-')}={v}" for key, v in value.items()]
    if isinstance(value, bool):
        return [option if value else "--no-" + option[2:]]
    if isinstance(value, list):
        return [arg for item in value for arg in (option, str(item))]
    return [option, str(value)]


FIELDS = sorted(RenderSettings.model_fields)


@pytest.mark.parametrize("name", FIELDS)
def test_every_entry_point_can_set_every_field(name):
    expected = settings_with(name)
    extra: list[str] = []
    if name == "fast":
        extra = cli_args("base", RELEASED["base"]) + cli_args("flashportrait", RELEASED["flashportrait"])
    if name in ("base", "flashportrait"):
        other = "flashportrait" if name == "base" else "base"
        extra = cli_args(other, RELEASED[other])
    typed = cli_args(name, changed_value(name)) + extra
    parser = build_parser()
    # The CLI: render, batch and both deployment commands.
    for command in (
        ["render", "--reference", "r.png", "--driving", "d.mp4", "--out", "o.mp4"],
        ["batch", "m.jsonl", "--out", "out/"],
        ["deploy", "--input-prefix", "s3://b/in/", "--output-root", "s3://b/out"],
        ["serve", "--input-prefix", "s3://b/in/", "--output-root", "s3://b/out"],
    ):
        got = settings_from_args(parser.parse_args(command + typed))
        assert getattr(got, name) == getattr(expected, name), (command[0], name)
    # The deployments store it (force stays per run) and a run rebuilds the same settings from the parameters.
    stored = dep.DeploymentSettings(input_prefix="s3://b/in/", output_root="s3://b/out", render=expected).parameters()
    if name != "force":
        assert RenderSettings(**stored["settings"]) == expected
    # The flows take the one settings model.
    for flow in (render_manifest, dep.render_manifest_version, dep.bulk_render):
        parameter = inspect.signature(flow.fn).parameters["settings"]
        assert "RenderSettings" in str(parameter.annotation)


def test_ranges_are_checked_by_the_model_and_reach_the_cli_as_usage_errors(capsys):
    with pytest.raises(ValueError, match="crf"):
        RenderSettings(crf=52)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        RenderSettings(preset="huge")
    with pytest.raises(ValueError, match="unknown limit"):
        RenderSettings(limits={"max_pixels": 1})
    with pytest.raises(ValueError, match="min_fps"):
        RenderSettings(limits={"min_fps": 50, "max_fps": 40})
    with pytest.raises(ValueError, match="give both --base"):
        RenderSettings(base="/models/wan")
    code = main(["render", "--reference", "r.png", "--driving", "d.mp4", "--out", "o.mp4", "--crf", "52"])
    assert code == 2 and "crf" in capsys.readouterr().err


def test_environment_overrides_defaults_and_explicit_values_win(monkeypatch):
    monkeypatch.setenv("FLASHPORTRAIT_CRF", "23")
    monkeypatch.setenv("FLASHPORTRAIT_WORKERS", "3")
    monkeypatch.setenv("FLASHPORTRAIT_OUTPUT_ROOT", "s3://b/out")  # another setting's variable: ignored here
    assert RenderSettings().crf == 23
    assert RenderSettings(crf=30).crf == 30
    args = build_parser().parse_args(["render", "--reference", "r", "--driving", "d", "--out", "o.mp4"])
    assert settings_from_args(args).workers == 3  # the command's own default (0) yields to the environment
    args = build_parser().parse_args(["render", "--reference", "r", "--driving", "d", "--out", "o", "--crf", "5"])
    assert settings_from_args(args).crf == 5


def test_only_output_settings_enter_the_hash_and_a_new_setting_leaves_old_hashes_alone():
    job = Job(id="a", reference="s3://b/r.png", driving="s3://b/d.mp4", line=1)
    inputs = {"reference": "etag:1", "driving": "etag:2"}
    plain = RenderSettings()
    before = job_hash(job, plain.output_parameters(), inputs)
    # Where and how a job runs does not change its output.
    elsewhere = RenderSettings(workers=7, ray_address="head:6379", force=True, limits={"max_fps": 60.0})
    assert job_hash(job, elsewhere.output_parameters(), inputs) == before
    # What decides the bits does.
    assert job_hash(job, RenderSettings(crf=20).output_parameters(), inputs) != before

    class GrownSettings(RenderSettings):  # a release that adds an output setting with a backwards default
        denoise_strength: float = Field(1.0, json_schema_extra={"output": True})

    assert job_hash(job, GrownSettings().output_parameters(), inputs) == before
    assert job_hash(job, GrownSettings(denoise_strength=0.5).output_parameters(), inputs) != before
    # A manifest field set to its default hashes as if it were absent.
    assert job_hash(job.model_copy(update={"seed": 42}), plain.output_parameters(), inputs) == before
    assert JOB_HASH_SCHEMA == 2


def test_the_hash_is_pinned():
    """A change to the hash's inputs must be deliberate (see JOB_HASH_SCHEMA's migration rule)."""
    job = Job(id="a", reference="s3://b/r.png", driving="s3://b/d.mp4", steps=3, line=1)
    settings = RenderSettings(preset="tiny", alp="balanced")
    assert settings.output_parameters() == {
        "preset": "tiny",
        "alp": "balanced",
        "extractor": "landmark",
        "preset_version": "tiny-v1",
    }
    digest = job_hash(job, settings.output_parameters(), {"reference": "etag:1", "driving": "etag:2"})
    assert digest == PINNED_DIGEST


PINNED_DIGEST = "196dfb0809ab58e5bfe72890718f48c9cce277687bece5799d12a4699731883a"
