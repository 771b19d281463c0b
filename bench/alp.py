"""Adaptive Latent Prediction against fewer-step solvers and diffusers' cache hooks, at equal transformer budget.

Runs on a tiny FlashPortrait whose transformer this script first trains briefly (bench/_tiny_training.py; cached
under --cache-dir), because a randomly initialised model is degenerate for judging any accelerator. Every row
renders the same multi-window video (11 latent frames → 3 windows of 5, overlap 2, emotion CFG = 2 streams) through
the project's own sampler (WindowDenoiser + step_windows + blend_overlaps), for several seeds, and is compared with
the full-step output of the same seed and step count.

Columns: block-equivalents per window and CFG stream (counted with forward hooks on every block's attn1/attn2/FFN
input projection, batch-weighted, ÷ 3L: a skipped or forecast module is not counted), the call speed-up S ÷ that,
wall time (median over the seeds' runs, model warm), latent rel-L2 / PSNR and decoded-frame PSNR / SSIM against the
full-step output of the same seed, and the peak memory of the ALP state. Adaptive baselines are swept over their
thresholds; every family's Pareto frontier (PSNR against block-equivalents) is read off at 5, 6 and 10
full-step-equivalents per window at 30 steps.

    .venv/bin/python bench/alp.py --quick     # 30 steps, a few rows (≈ 1–2 min once the model is cached)
    .venv/bin/python bench/alp.py             # 30 and 50 steps, 3 seeds, default rows (≈ 5–10 min)
    .venv/bin/python bench/alp.py --sweep     # wider threshold sweeps and every ablation at 50 steps too

Prints one JSON document; writes <out>/alp.md, <out>/alp.json and <out>/alp_pareto.png.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FirstBlockCacheConfig,
    MagCacheConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    UniPCMultistepScheduler,
)
from skimage.metrics import structural_similarity


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _plot import pareto_plot  # noqa: E402
from _tiny_training import (  # noqa: E402
    DIRECTIONS,
    expression_amplitudes,
    expression_features,
    synthetic_reference,
    trained_components,
)

from flashportrait.model.alp import ALP_PRESETS, AdaptiveLatentPredictionConfig, AlpJobStats  # noqa: E402
from flashportrait.model.components import FlashPortraitComponents, build_components, decode_latents  # noqa: E402
from flashportrait.model.pipeline_flashportrait import (  # noqa: E402
    FlashPortraitPipeline,
    GenerationRequest,
    resolve_alp_plan,
)
from flashportrait.model.sampling import (  # noqa: E402
    SamplingConfig,
    WindowDenoiser,
    grid_for,
    initial_noise,
    step_windows,
)
from flashportrait.model.windows import blend_overlaps  # noqa: E402


logger = logging.getLogger("bench.alp")

LATENT_FRAMES = 11  # 41 RGB frames → windows [0, 5), [3, 8), [6, 11)
READOUT_BUDGETS = (5.0, 6.0, 10.0)
WAN_IDENTIFIERS = [r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", r"blocks\.\d+\.ffn"]
REPO = Path(__file__).resolve().parent.parent


# Inputs -----------------------------------------------------------------------------------------------------------
def eval_request(seed: int, steps: int, alp=None) -> GenerationRequest:
    """Held-out inputs (reference, expression trajectory, motion prompt) drawn from the seed; same seed → same bits."""
    rng = np.random.default_rng(10_000 + seed)
    reference = synthetic_reference(rng)
    num_rgb = 4 * (LATENT_FRAMES - 1) + 1
    features = expression_features(expression_amplitudes(rng, num_rgb), 554, rng)
    return GenerationRequest(
        reference=reference,
        expression_features=features,
        prompt=list(DIRECTIONS)[seed % len(DIRECTIONS)],
        seed=seed,
        num_inference_steps=steps,
        context_size=5,
        context_overlap=2,
        alp=alp,
    )


# Counting and sampling --------------------------------------------------------------------------------------------
class BlockCounter:
    """Batch-weighted executions of every block's attn1, attn2 and FFN (their first Linear), ÷ 3L = block-stack
    passes. A hook on the module itself would also fire for forecast outputs; the inner Linear does not."""

    def __init__(self, transformer: torch.nn.Module):
        self.count = 0
        self.layers = len(transformer.blocks)
        for block in transformer.blocks:
            for module in (block.attn1.to_q, block.attn2.to_q, block.ffn.net[0].proj):
                module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.count += int(args[0].shape[0])

    def passes(self) -> float:
        return self.count / (3 * self.layers)


class ContextDenoiser(WindowDenoiser):
    """Each window × stream under its own diffusers ``cache_context``, with the step coordinates the hooks need
    (SeaCache fails open without them), so hook state never mixes windows or streams."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grid = grid_for(self.sampling)

    def transformer_pass(self, window_index, stream, step_index, *args, **kwargs):
        with self.components.transformer.cache_context(
            f"w{window_index}:{stream}",
            step_index=step_index,
            sigma=float(self.grid.sigmas[step_index]),
            num_inference_steps=self.sampling.num_inference_steps,
        ):
            return super().transformer_pass(window_index, stream, step_index, *args, **kwargs)


Stepper = Callable[[WindowDenoiser, dict, object, int], dict]


def scheduler_stepper(factory: Callable[[], object], steps: int, windows) -> Stepper:
    """A diffusers multistep scheduler per window (its history is per trajectory); blending stays after every step."""
    schedulers = {w.index: factory() for w in windows}
    for scheduler in schedulers.values():
        scheduler.set_timesteps(steps)

    def step(denoiser: WindowDenoiser, slices: dict, grid, step_index: int) -> dict:
        out = {}
        for index in sorted(slices):
            scheduler = schedulers[index]
            t = scheduler.timesteps[step_index]
            x = slices[index].float()
            velocity = denoiser.velocity(index, x, t.float())
            out[index] = scheduler.step(velocity, t, x).prev_sample.float()
        return out

    return step


def sample(
    components: FlashPortraitComponents,
    request: GenerationRequest,
    sampling: SamplingConfig,
    denoiser_cls: type[WindowDenoiser] = WindowDenoiser,
    stepper: Stepper | None = None,
) -> tuple[torch.Tensor, WindowDenoiser]:
    """The pipeline's step loop (pipeline_flashportrait._sample) with a chosen denoiser class and stepper."""
    preset = components.preset
    plan = request.window_plan(preset)
    inputs = replace(request.conditioning_inputs(preset), sampling=sampling)
    denoiser = denoiser_cls(components, inputs, plan.windows)
    latents = initial_noise(request.seed, request.latent_shape(components, plan.num_latent_frames))
    grid = grid_for(sampling)
    advance = stepper or step_windows
    for step in range(sampling.num_inference_steps):
        slices = {w.index: latents[:, :, w.start : w.stop] for w in plan.windows}
        latents = blend_overlaps(plan, advance(denoiser, slices, grid, step))
    return latents, denoiser


def unipc(shift: float) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
    )


def dpmpp_2m(shift: float) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
    )


# Rows -------------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    family: str
    steps: int
    kind: str  # full | euler | scheduler | hook | alp
    solver_steps: int | None = None
    grid: str = "diffusers"  # euler: diffusers | linspace
    scheduler: str = ""  # unipc | dpmpp2m
    hook: Callable[[list[float] | None], object] | None = None  # hook config factory (MagCache ratios)
    alp: AdaptiveLatentPredictionConfig | None = None
    note: str = ""


def build_rows(steps: int, mode: str, profile_dir: str) -> list[Row]:
    quick, sweep = mode == "quick", mode == "sweep"
    rows = [Row(f"full ({steps} steps)", "full", steps, "full")]
    budgets = {30: (5, 6, 10), 50: (5, 8, 15)}.get(steps, (5, 10))
    if sweep:
        budgets = (5, 6, 8, 10, 15)
    if quick:
        budgets = (5, 10)
    for n in budgets:
        rows.append(Row(f"Euler {n} steps (diffusers grid)", "Euler (diffusers grid)", steps, "euler", n))
        if not quick or n == 5:
            rows.append(Row(f"UniPC {n} steps", "UniPC (shifted linspace)", steps, "scheduler", n, scheduler="unipc"))
        if not quick:
            rows.append(
                Row(f"Euler {n} steps (shifted linspace)", "Euler (shifted linspace)", steps, "euler", n, "linspace")
            )
            rows.append(
                Row(f"DPM++2M {n} steps", "DPM++2M (shifted linspace)", steps, "scheduler", n, scheduler="dpmpp2m")
            )

    def taylorseer(n: int, order: int, lite: bool = False, identifiers=WAN_IDENTIFIERS, before: int = 3):
        return lambda _: TaylorSeerCacheConfig(
            cache_interval=n,
            max_order=order,
            disable_cache_before_step=before,
            cache_identifiers=None if lite else identifiers,
            use_lite_mode=lite,
        )

    ts = [(3, 1), (5, 1), (8, 1), (5, 2)] if steps == 30 else [(5, 1), (8, 1)]
    ts = [(5, 1)] if quick else ts + ([(6, 1), (10, 1), (5, 3)] if sweep else [])
    for n, order in ts:
        rows.append(Row(f"TaylorSeer N={n} order {order}", "TaylorSeer", steps, "hook", hook=taylorseer(n, order)))
    if not quick:
        rows.append(Row("TaylorSeer lite N=5", "TaylorSeer lite", steps, "hook", hook=taylorseer(5, 1, lite=True)))
    if steps == 30 and not quick:
        rows.append(
            Row(
                "TaylorSeer default identifiers (pitfall)",
                "pitfalls",
                steps,
                "hook",
                hook=lambda _: TaylorSeerCacheConfig(cache_interval=5, max_order=1),
                note="diffusers' default identifiers match no Wan module: nothing is cached",
            )
        )
    mag = [(0.06, 3), (0.25, 3), (0.5, 6), (1.0, 10)] if steps == 30 else [(0.25, 3), (1.0, 10)]
    mag = [(0.5, 6)] if quick else mag + ([(0.12, 3), (2.0, 10), (4.0, 30)] if sweep else [])
    for delta, k in mag:
        rows.append(
            Row(
                f"MagCache δ={delta} K={k}",
                "MagCache",
                steps,
                "hook",
                hook=lambda ratios, d=delta, k=k: MagCacheConfig(
                    threshold=d, max_skip_steps=k, num_inference_steps=steps, mag_ratios=ratios
                ),
            )
        )
    fbc = (0.05, 0.1, 0.2, 0.4) if steps == 30 else (0.1, 0.4)
    fbc = (0.2,) if quick else fbc + ((0.02, 0.8, 1.6) if sweep else ())
    for threshold in fbc:
        rows.append(
            Row(
                f"FirstBlockCache {threshold}",
                "FirstBlockCache",
                steps,
                "hook",
                hook=lambda _, t=threshold: FirstBlockCacheConfig(threshold=t),
            )
        )

    def noisy_channels(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return list(hidden[:, :16].unbind(0))  # the 16 noisy channels of the I2V input (20 more are the condition)

    sea = [(0.25, 2), (0.5, 2), (1.0, 0), (2.0, 0)] if steps == 30 else [(0.5, 2), (2.0, 0)]
    sea = [(1.0, 0)] if quick else sea + ([(4.0, 0), (8.0, 0)] if sweep else [])
    for threshold, consecutive in sea:
        rows.append(
            Row(
                f"SeaCache {threshold} max-consecutive {consecutive or '∞'}",
                "SeaCache",
                steps,
                "hook",
                hook=lambda _, t=threshold, c=consecutive: SeaCacheConfig(
                    threshold=t, max_consecutive_cached=c, raw_vision_callback=noisy_channels
                ),
            )
        )
    if steps == 30 and not quick:
        rows.append(
            Row(
                "SeaCache 1.0 without the I2V callback (pitfall)",
                "pitfalls",
                steps,
                "hook",
                hook=lambda _: SeaCacheConfig(threshold=1.0, max_consecutive_cached=0),
                note="on I2V Wan SeaCache fails open: every step is computed",
            )
        )

    def alp(config: AdaptiveLatentPredictionConfig) -> AdaptiveLatentPredictionConfig:
        return replace(config, profile_dir=profile_dir)

    fast, paper = ALP_PRESETS["fast"], ALP_PRESETS["paper"]
    rows.append(Row("ALP fast", "ALP planned (stack, Newton n=2)", steps, "alp", alp=alp(fast)))
    if not quick:
        for b in (6,) if steps == 30 else ():
            rows.append(
                Row(
                    f"ALP planned B={b}",
                    "ALP planned (stack, Newton n=2)",
                    steps,
                    "alp",
                    alp=alp(replace(fast, budget=b, name=f"planned-{b}")),
                )
            )
    rows.append(Row("ALP balanced", "ALP planned (stack, Newton n=2)", steps, "alp", alp=alp(ALP_PRESETS["balanced"])))
    if steps == 50 and not quick:
        rows.append(
            Row(
                "ALP planned B=5",
                "ALP planned (stack, Newton n=2)",
                steps,
                "alp",
                alp=alp(replace(fast, budget=5, name="planned-5")),
            )
        )
    rows.append(
        Row(
            "ALP paper (fixed K=5, module, Taylor n=3, ÷ gains)",
            "ALP paper reading (fixed K)",
            steps,
            "alp",
            alp=alp(paper),
        )
    )
    if not quick:
        for k in (3, 8) if sweep or steps == 30 else ():
            rows.append(
                Row(
                    f"ALP paper reading K={k}",
                    "ALP paper reading (fixed K)",
                    steps,
                    "alp",
                    alp=alp(replace(paper, interval=k, name=f"paper-K{k}")),
                )
            )
        for tau in (0.05, 0.1, 0.2) if steps == 30 else (0.1,):
            online = replace(fast, schedule="online", online_threshold=tau, budget=steps, name=f"online-{tau}")
            rows.append(
                Row(f"ALP online τ={tau} (no cap)", "ALP online (stack, Newton n=2)", steps, "alp", alp=alp(online))
            )
    ablations = [
        ("order 1", dict(order=1)),
        ("order 3", dict(order=3)),
        ("Taylor differences", dict(derivatives="taylor")),
        ("gains ÷ (paper), stack", dict(gain_mode="div")),
        ("gains ×, stack", dict(gain_mode="mul")),
        ("groups:4 (per block), gains none", dict(granularity="groups:4")),
        ("groups:4 (per block), gains ÷", dict(granularity="groups:4", gain_mode="div")),
        ("groups:2", dict(granularity="groups:2")),
        ("module (per attn1/attn2/FFN)", dict(granularity="module")),
        (
            "module, Taylor n=3, gains ÷ (paper object on the planned schedule)",
            dict(granularity="module", derivatives="taylor", order=3, gain_mode="div"),
        ),
        ("fixed schedule K=6, last step not forced", dict(schedule="fixed", interval=6, final_full=False)),
        ("fixed schedule K=8 + last step", dict(schedule="fixed", interval=8)),
        ("σ coordinate", dict(coordinate="sigma")),
        ("factors in fp32", dict(cache_dtype="float32")),
        ("last step not forced (reference's default)", dict(final_full=False)),
        ("profile power 0.5", dict(profile_power=0.5)),
        ("profile power 1.5", dict(profile_power=1.5)),
    ]
    if quick:
        ablations = [
            a
            for a in ablations
            if a[0]
            in ("gains ÷ (paper), stack", "module (per attn1/attn2/FFN)", "last step not forced (reference's default)")
        ]
    elif steps != 30 and not sweep:
        ablations = []
    for label, change in ablations:
        config = replace(fast, budget=5, name=f"ablation: {label}", **change)
        rows.append(Row(f"ALP B=5 {label}", "ALP ablations (B=5)", steps, "alp", alp=alp(config)))
    return rows


# Running ----------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    latents: torch.Tensor
    passes: float  # block-stack passes, all windows and streams
    seconds: float
    alp: AlpJobStats | None = None


@dataclass
class Harness:
    components: FlashPortraitComponents  # the full, solver and ALP rows
    hook_components: FlashPortraitComponents  # the same weights, for diffusers' hooks (never mixed with ALP's)
    profile_dir: str
    counters: dict = field(default_factory=dict)
    mag_ratios: dict = field(default_factory=dict)
    seconds_calibration: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pipeline = FlashPortraitPipeline(self.components)
        for c in (self.components, self.hook_components):
            self.counters[id(c)] = BlockCounter(c.transformer)

    def sampling(self, request: GenerationRequest, **changes) -> SamplingConfig:
        return replace(request.sampling_config(self.components.preset), **changes)

    def run(self, row: Row, seed: int) -> RunResult:
        request = eval_request(seed, row.steps)
        preset = self.components.preset
        components, sampling, kwargs = self.components, self.sampling(request), {}
        if row.kind == "euler":
            sigmas = None
            if row.grid == "linspace":
                scheduler = unipc(sampling.shift)
                scheduler.set_timesteps(row.solver_steps)
                sigmas = tuple(float(s) for s in scheduler.sigmas[:-1])
            sampling = replace(sampling, num_inference_steps=row.solver_steps, sigmas=sigmas)
        elif row.kind == "scheduler":
            sampling = replace(sampling, num_inference_steps=row.solver_steps)
            factory = {"unipc": unipc, "dpmpp2m": dpmpp_2m}[row.scheduler]
            windows = request.window_plan(preset).windows
            kwargs["stepper"] = scheduler_stepper(lambda: factory(sampling.shift), row.solver_steps, windows)
        elif row.kind == "hook":
            components = self.hook_components
            kwargs["denoiser_cls"] = ContextDenoiser
            components.transformer.enable_cache(row.hook(self.mag_ratios.get(row.steps)))
        elif row.kind == "alp":
            request = replace(request, alp=row.alp)
            plan, seconds = resolve_alp_plan(
                request, preset, request.window_plan(preset), self.pipeline.calibration_run
            )
            self.seconds_calibration[row.name] = self.seconds_calibration.get(row.name, 0.0) + seconds
            sampling = replace(sampling, alp=plan)
        counter = self.counters[id(components)]
        counter.count = 0
        start = time.perf_counter()
        try:
            latents, denoiser = sample(components, request, sampling, **kwargs)
        finally:
            if row.kind == "hook":
                components.transformer.disable_cache()
        seconds = time.perf_counter() - start
        alp = AlpJobStats.collect(sampling.alp, denoiser.alp_window_stats()) if sampling.alp else None
        return RunResult(latents, counter.passes(), seconds, alp)

    def calibrate_magcache(self, steps: int) -> list[float]:
        """MagCache's own calibration mode, on another input (seed 999) than any evaluated; its ratios are printed
        per cache context, so stdout is captured and the per-context lists are averaged."""
        transformer = self.hook_components.transformer
        transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                request = eval_request(999, steps)
                sample(self.hook_components, request, self.sampling(request), denoiser_cls=ContextDenoiser)
        finally:
            transformer.disable_cache()
        printed = [line for line in captured.getvalue().splitlines() if line.startswith("[")]
        lists = [ast.literal_eval(line) for line in printed if not line.startswith("[MagCache]")]
        if not lists:
            raise RuntimeError("MagCache calibration printed no ratios; the diffusers MagCache hook changed")
        ratios = np.mean(np.array(lists, dtype=np.float64), axis=0).tolist()
        self.mag_ratios[steps] = ratios
        return ratios


TIMED_ROWS = (
    "Euler 5 steps (diffusers grid)",
    "TaylorSeer N=5 order 1",
    "MagCache δ=1.0 K=10",
    "FirstBlockCache 0.2",
    "FirstBlockCache 0.4",
    "SeaCache 1.0 max-consecutive ∞",
    "ALP fast",
    "ALP balanced",
    "ALP paper (fixed K=5, module, Taylor n=3, ÷ gains)",
)


def timing_pass(harness: Harness, rows: list[Row], rounds: int) -> list[dict]:
    """Wall time of the headline rows, interleaved round-robin (seed 0, model warm) so that load from other
    processes on a shared machine hits every row alike; the median of ``rounds`` runs per row."""
    timed = [r for r in rows if r.kind == "full" or r.name in TIMED_ROWS]
    seconds: dict[str, list[float]] = {r.name: [] for r in timed}
    split: dict[str, list[tuple[float, float, float]]] = {r.name: [] for r in timed}
    for _ in range(rounds):
        for row in timed:
            run = harness.run(row, 0)
            seconds[row.name].append(run.seconds)
            if run.alp is not None:
                t = run.alp.totals
                split[row.name].append(
                    (t["seconds_transformer_full"], t["seconds_transformer_predicted"], t["seconds_other"])
                )
    full = statistics.median(seconds[timed[0].name])
    out = []
    for row in timed:
        median = statistics.median(seconds[row.name])
        entry = {"name": row.name, "wall_s_median": round(median, 4), "speedup_wall": round(full / median, 2)}
        if split[row.name]:
            parts = np.median(np.array(split[row.name]), axis=0)
            entry.update(
                alp_seconds_transformer_full=round(float(parts[0]), 4),
                alp_seconds_transformer_predicted=round(float(parts[1]), 4),
                alp_seconds_other=round(float(parts[2]), 4),
            )
        out.append(entry)
    return out


# Metrics ----------------------------------------------------------------------------------------------------------
def latent_metrics(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    x, ref = x.double(), ref.double()
    rel_l2 = float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))
    mse = float(((x - ref) ** 2).mean())
    value_range = float(ref.max() - ref.min())
    return rel_l2, (float("inf") if mse == 0 else 10 * np.log10(value_range**2 / mse))


def frame_metrics(frames: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    mse = float(((frames.astype(np.float64) - ref.astype(np.float64)) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    ssim = float(np.mean([structural_similarity(a, b, channel_axis=-1, data_range=255) for a, b in zip(frames, ref)]))
    return psnr, ssim


def finite(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 4)


# Pareto -----------------------------------------------------------------------------------------------------------
def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-left envelope: each kept point is better than every cheaper one."""
    best, kept = -np.inf, []
    for cost, psnr in sorted(points):
        if psnr > best:
            kept.append((cost, psnr))
            best = psnr
    return kept


def read_off(points: list[tuple[float, float]], budget: float) -> float | None:
    """PSNR of the family's frontier at ``budget`` (linear between frontier points; the best one below the budget
    when the family never spends that much; None when the family cannot get down to it)."""
    front = frontier(points)
    if not front or budget < front[0][0] - 1e-6:
        return None
    below = [p for p in front if p[0] <= budget + 1e-6]
    above = [p for p in front if p[0] > budget + 1e-6]
    if not above:
        return below[-1][1]
    (c0, p0), (c1, p1) = below[-1], above[0]
    return p0 + (p1 - p0) * (budget - c0) / (c1 - c0)


# Report -----------------------------------------------------------------------------------------------------------
def summarise(row: Row, runs: list[RunResult], refs: dict, full_seconds: float, decode: bool, components) -> dict:
    windows = 3
    streams = 2
    lat = [latent_metrics(r.latents, refs[s]["latents"]) for s, r in zip(refs, runs)]
    out = {
        "name": row.name,
        "family": row.family,
        "steps": row.steps,
        "block_equivalents_per_window_stream": round(statistics.mean(r.passes for r in runs) / (windows * streams), 3),
        "wall_s_median": round(statistics.median(r.seconds for r in runs), 4),
        "latent_rel_l2": finite(statistics.mean(m[0] for m in lat)),
        "latent_psnr_db": finite(statistics.mean(m[1] for m in lat)),
        "note": row.note,
    }
    out["speedup_calls"] = round(row.steps / max(out["block_equivalents_per_window_stream"], 1e-9), 2)
    out["speedup_wall"] = round(full_seconds / out["wall_s_median"], 2)
    if decode:
        frames = [
            frame_metrics(decode_latents(components, r.latents)[1:], refs[s]["frames"]) for s, r in zip(refs, runs)
        ]
        out["frame_psnr_db"] = finite(statistics.mean(m[0] for m in frames))
        out["frame_ssim"] = round(statistics.mean(m[1] for m in frames), 5)
    if runs[0].alp is not None:
        stats = runs[0].alp
        out["alp_state_peak_bytes_per_window"] = max(w.state_bytes_peak for w in stats.windows)
        out["alp_state_peak_bytes_total"] = int(stats.totals["state_bytes_peak"])
        out["alp_full_steps"] = list(stats.windows[0].full_step_indices)
        out["alp_seconds_transformer_full"] = round(
            statistics.median(r.alp.totals["seconds_transformer_full"] for r in runs), 4
        )
        out["alp_seconds_transformer_predicted"] = round(
            statistics.median(r.alp.totals["seconds_transformer_predicted"] for r in runs), 4
        )
        out["alp_seconds_other"] = round(statistics.median(r.alp.totals["seconds_other"] for r in runs), 4)
        out["alp_profile_key"] = stats.profile_key
    return out


def markdown(result: dict) -> str:
    model, training = result["model"], result["model"]["training"]
    lines = [
        "# ALP benchmark (bench/alp.py)",
        "",
        f"Machine: {result['machine']}. Model: {model['preset']} ({model['layers']} blocks, trained "
        f"{training.get('steps')} steps, loss {training.get('loss_first_100', 0):.3f} → "
        f"{training.get('loss_last_100', 0):.3f}). Video: {LATENT_FRAMES} latent frames, 3 windows, "
        f"2 CFG streams; seeds {result['seeds']}; mode {result['mode']}. Metrics are means over the seeds against the "
        "full-step output of the same seed; wall time is the median of the seeds' runs (this machine's CPU is shared, "
        "so wall times are noisy; block-equivalents are counted, not timed).",
        "",
    ]
    for steps, rows in result["tables"].items():
        lines += [
            f"## {steps} steps",
            "",
            "| method | block-eq / window / stream | call speed-up | wall s | wall speed-up | latent rel-L2 "
            "| latent PSNR dB | frame PSNR dB | frame SSIM | ALP state / window |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            state = r.get("alp_state_peak_bytes_per_window")
            lines.append(
                f"| {r['name']}{' — ' + r['note'] if r['note'] else ''} "
                f"| {r['block_equivalents_per_window_stream']:.2f} | {r['speedup_calls']:.2f}× "
                f"| {r['wall_s_median']:.3f} | {r['speedup_wall']:.2f}× | {_fmt(r['latent_rel_l2'], 4)} "
                f"| {_fmt(r['latent_psnr_db'], 1)} | {_fmt(r.get('frame_psnr_db'), 1)} "
                f"| {_fmt(r.get('frame_ssim'), 4)} | {'' if state is None else f'{state / 1024:.1f} KiB'} |"
            )
        lines.append("")
    for steps, rows in result["timings_interleaved"].items():
        lines += [
            f"## Wall time, {steps} steps (headline rows interleaved round-robin, seed 0, median of the rounds)",
            "",
            "| method | wall s | wall speed-up | ALP: s in full transformer passes | s in predicted passes (live path "
            "+ forecast) | s elsewhere (CFG, Euler, copies) |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['name']} | {r['wall_s_median']:.3f} | {r['speedup_wall']:.2f}× "
                f"| {_fmt(r.get('alp_seconds_transformer_full'), 3)} "
                f"| {_fmt(r.get('alp_seconds_transformer_predicted'), 3)} | {_fmt(r.get('alp_seconds_other'), 3)} |"
            )
        lines.append("")
    lines += ["## Pareto read-off (latent PSNR dB at B full-step-equivalents per window and stream, 30 steps)", ""]
    budgets = result["readout_budgets"]
    lines += ["| family | " + " | ".join(f"B = {b:g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for family, values in result["pareto_readout"].items():
        lines.append(
            f"| {family} | " + " | ".join(_fmt(v, 1) if v is not None else "not reached" for v in values) + " |"
        )
    lines += ["", "## Where a baseline beats ALP", ""] + [f"- {line}" for line in result["verdict"]] + [""]
    return "\n".join(lines)


def _fmt(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def verdict(readout: dict[str, list[float | None]], budgets: tuple[float, ...]) -> list[str]:
    lines = []
    alp_families = [f for f in readout if f.startswith("ALP") and "ablation" not in f]
    baselines = [f for f in readout if not f.startswith("ALP") and f not in ("full", "pitfalls")]
    for i, budget in enumerate(budgets):
        alp_best = max(((readout[f][i], f) for f in alp_families if readout[f][i] is not None), default=(None, None))
        base_best = max(((readout[f][i], f) for f in baselines if readout[f][i] is not None), default=(None, None))
        if alp_best[0] is None or base_best[0] is None:
            lines.append(f"B = {budget:g}: not comparable (ALP {alp_best[1]}, baseline {base_best[1]})")
        elif base_best[0] > alp_best[0]:
            lines.append(
                f"B = {budget:g}: **{base_best[1]} beats ALP** ({base_best[0]:.1f} dB vs {alp_best[1]} "
                f"{alp_best[0]:.1f} dB)"
            )
        else:
            lines.append(
                f"B = {budget:g}: {alp_best[1]} {alp_best[0]:.1f} dB leads; best baseline {base_best[1]} "
                f"{base_best[0]:.1f} dB (+{alp_best[0] - base_best[0]:.1f} dB)"
            )
    return lines


def wall_verdict(timings: dict[int, list[dict]]) -> list[str]:
    """Wall time is a separate question from calls: say where a baseline is faster than ALP fast in seconds."""
    lines = []
    for steps, rows in timings.items():
        fast = next((r for r in rows if r["name"] == "ALP fast"), None)
        if fast is None:
            continue
        faster = [
            r for r in rows if not r["name"].startswith(("ALP", "full")) and r["speedup_wall"] > fast["speedup_wall"]
        ]
        for r in faster:
            lines.append(
                f"{steps} steps, wall time: **{r['name']} is faster than ALP fast** ({r['speedup_wall']:.2f}× vs "
                f"{fast['speedup_wall']:.2f}×; on this CPU a predicted step still pays the live path and the per-step "
                "Python overhead, which a 4-block, 80-token model cannot hide)"
            )
        if not faster:
            lines.append(f"{steps} steps, wall time: ALP fast {fast['speedup_wall']:.2f}× is the fastest timed row")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 steps, a few rows per family")
    parser.add_argument("--sweep", action="store_true", help="wider sweeps, ablations at 50 steps too")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="step counts (default 30 50; quick: 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    parser.add_argument("--no-decode", action="store_true", help="skip decoded-frame PSNR/SSIM")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench" / "alp")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "alp-bench")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    mode = "quick" if args.quick else "sweep" if args.sweep else "default"
    steps_list = args.steps or ([30] if args.quick else [30, 50])
    seeds = list(range(args.seeds))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    components, training = trained_components(args.cache_dir)
    hook_components = build_components(components.preset)
    hook_components.transformer.load_state_dict(components.transformer.state_dict())
    profile_dir = str(args.cache_dir / "profiles")
    harness = Harness(components, hook_components, profile_dir)
    harness.run(Row("warm-up", "full", 6, "full"), 0)

    tables, points, timings = {}, {}, {}
    for steps in steps_list:
        logger.info("%d steps: MagCache calibration", steps)
        harness.calibrate_magcache(steps)
        refs, full_runs = {}, []
        for seed in seeds:
            run = harness.run(Row("full", "full", steps, "full"), seed)
            full_runs.append(run)
            frames = None if args.no_decode else decode_latents(components, run.latents)[1:]
            refs[seed] = {"latents": run.latents, "frames": frames}
        full_seconds = statistics.median(r.seconds for r in full_runs)
        rows_out = []
        for row in build_rows(steps, mode, profile_dir):
            runs = full_runs if row.kind == "full" else [harness.run(row, seed) for seed in seeds]
            summary = summarise(row, runs, refs, full_seconds, not args.no_decode, components)
            rows_out.append(summary)
            if summary["latent_psnr_db"] is not None:  # lossless rows (full, the pitfalls) have no finite PSNR
                points.setdefault(steps, {}).setdefault(row.family, []).append(
                    (summary["block_equivalents_per_window_stream"], summary["latent_psnr_db"])
                )
            logger.info(
                "%s: %.2f block-eq, %.1f dB, %.3f s",
                row.name,
                summary["block_equivalents_per_window_stream"],
                summary["latent_psnr_db"] or float("inf"),
                summary["wall_s_median"],
            )
        tables[steps] = rows_out
        timings[steps] = timing_pass(harness, build_rows(steps, mode, profile_dir), 3 if args.quick else 5)

    readout_steps = 30 if 30 in points else steps_list[0]
    families = {f: p for f, p in points[readout_steps].items() if f not in ("full", "pitfalls")}
    readout = {f: [finite(read_off(p, b)) for b in READOUT_BUDGETS] for f, p in families.items()}
    result = {
        "benchmark": "alp",
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
        f"diffusers {diffusers.__version__} (shared 2-core machine; no GPU)",
        "mode": mode,
        "seeds": seeds,
        "steps": steps_list,
        "model": {
            "preset": components.preset.version,
            "layers": len(components.transformer.blocks),
            "training": training,
        },
        "seacache_in_diffusers": hasattr(diffusers, "SeaCacheConfig"),
        "magcache_ratios": {str(k): [round(v, 4) for v in r] for k, r in harness.mag_ratios.items()},
        "alp_calibration_seconds": {k: round(v, 2) for k, v in harness.seconds_calibration.items() if v > 0},
        "tables": {str(k): v for k, v in tables.items()},
        "timings_interleaved": {str(k): v for k, v in timings.items()},
        "readout_steps": readout_steps,
        "readout_budgets": list(READOUT_BUDGETS),
        "pareto_readout": readout,
        "verdict": verdict(readout, READOUT_BUDGETS) + wall_verdict(timings),
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "alp.json").write_text(json.dumps(result, indent=1))
    (args.out / "alp.md").write_text(markdown(result))
    panels = []
    for steps in steps_list:
        fam = {f: p for f, p in points[steps].items() if f not in ("full",)}
        lines = {f: frontier(p) for f, p in fam.items() if "ablation" not in f and f != "pitfalls"}
        panels.append((f"{steps} steps: latent PSNR vs block-equivalents", lines, fam))
    pareto_plot(
        panels,
        args.out / "alp_pareto.png",
        "block-equivalents per window and stream",
        "latent PSNR (dB)",
        READOUT_BUDGETS,
    )
    result["outputs"] = [str(args.out / n) for n in ("alp.md", "alp.json", "alp_pareto.png")]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
