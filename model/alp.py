"""Adaptive Latent Prediction (ALP): skip the transformer's block stack on most steps by forecasting its features.

FlashPortrait's headline acceleration (arXiv 2512.16900: "utilizes higher-order latent derivatives at the current
timestep to directly predict latents at future timesteps"); the official code never released it. What we ship, and
why (each choice measured by ``bench/alp.py``; the README's ALP section has the figures):

1. What is forecast: residual features of the transformer on the live input path (``transformer_flashportrait``
   section 5). On a predicted step the cheap parts still run at the current x and t; the block stack is replaced by
   the forecast residual of G block groups (``stack`` = 1 group, ``groups:G``, ``block``), or the paper's per-module
   attn1/attn2/FFN outputs before their gates (``module``). Extrapolating the latent x itself diverged: not offered.
2. Derivatives: Newton divided differences over the last n+1 full steps (exact for polynomials on any grid), or the
   paper's / TaylorSeer's Taylor form Δⁱ/(i!·Kⁱ) (biased on a non-uniform grid; kept for parity).
3. Gains: the paper's s(t) (variation rate, α) and w(l, i) (layer derivative-magnitude ratio), applied to each
   term as printed (``div``: term ÷ (w·s)), inverted (``mul``) or not at all (``none``), clipped to [1/γ, γ].
4. Schedules: ``planned`` (B full steps at equal shares of a calibrated variation profile, shared by every window,
   so the distributed run needs no communication), ``fixed`` (every K) and ``online`` (τ/ρ̃ rule with a hard
   budget, decided per window from that window's own state, so it is deterministic and needs no communication).
5. State: per (window × CFG stream), reset per sampling run; the full/predicted decision is per window (all
   streams together); features come from the blended latents the window continued from.

Sections: 1. config + presets; 2. difference tables; 3. schedules + calibration profiles; 4. the plan that travels
to workers; 5. state per stream and per window; 6. statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .transformer_flashportrait import FeatureSiteLayout, check_granularity


logger = logging.getLogger(__name__)

DERIVATIVES = ("newton", "taylor")
GAIN_MODES = ("none", "div", "mul")
SCHEDULES = ("planned", "fixed", "online")
COORDINATES = ("step", "sigma")
CACHE_DTYPES = ("bfloat16", "float16", "float32")
PROFILE_DIR_ENV = "FLASHPORTRAIT_ALP_PROFILES"


# 1. Configuration and presets -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptiveLatentPredictionConfig:
    """Every ALP choice, validated. ``budget`` / ``budgets`` / ``speedup`` give B, the full steps per window.

    B = ``budget`` if set, else the ``budgets`` entry for the step count, else ⌊S / speedup⌋ (at least 1).
    """

    name: str = "custom"
    granularity: str = "stack"  # stack | groups:G | block | module
    order: int = 2  # n: the highest difference order (ramps up while the history is short)
    derivatives: str = "newton"  # newton | taylor
    coordinate: str = "step"  # τ = step index (paper, TaylorSeer) or σ
    gain_mode: str = "none"  # none | div (paper, as printed) | mul
    alpha: float = 1.5  # exponent of the variation-rate gain s(t)
    gain_clip: float = 2.0  # every gain is clipped to [1/gain_clip, gain_clip]
    schedule: str = "planned"  # planned | fixed | online
    budget: int | None = None
    budgets: tuple[tuple[int, int], ...] = ()  # ((steps, full steps), ...)
    speedup: float = 6.0
    interval: int = 5  # fixed: K
    warmup: int = 1  # steps 0 … warmup−1 are always full
    final_full: bool = False  # the last step is always full
    profile_power: float = 1.0  # planned: equal shares of Σ ρ̃^p
    online_threshold: float = 0.1  # online: next full step after ⌊τ/ρ̃⌋ steps …
    online_min_skip: int = 1  # … clamped to [min, max]
    online_max_skip: int = 10
    cache_dtype: str = "bfloat16"  # dtype of the stored difference factors (math is fp32)
    offload: bool = False  # keep each window's state in host memory between its visits
    profile_dir: str | None = None  # calibration profiles; None → $FLASHPORTRAIT_ALP_PROFILES or ~/.cache

    def __post_init__(self) -> None:
        check_granularity(self.granularity)
        if self.order not in (1, 2, 3):
            raise ValueError(f"ALP order must be 1, 2 or 3, got {self.order}; use 2 (default) or 3 (the paper's)")
        _check_choice("derivatives", self.derivatives, DERIVATIVES)
        _check_choice("coordinate", self.coordinate, COORDINATES)
        _check_choice("gain_mode", self.gain_mode, GAIN_MODES)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("cache_dtype", self.cache_dtype, CACHE_DTYPES)
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (the paper uses 1.5, range 0.5–1.5), got {self.alpha}")
        if not self.gain_clip >= 1:
            raise ValueError(
                f"gain_clip must be ≥ 1 (gains are clipped to [1/gain_clip, gain_clip]), got {self.gain_clip}"
            )
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be ≥ 1 full step per window (step 0 is always full), got {self.budget}")
        if any(b < 1 or s < 1 for s, b in self.budgets):
            raise ValueError(f"budgets must be (steps ≥ 1, full steps ≥ 1) pairs, got {self.budgets}")
        if not self.speedup >= 1:
            raise ValueError(f"speedup must be ≥ 1 (fewer transformer calls by this factor), got {self.speedup}")
        if self.interval < 1 or self.warmup < 1:
            raise ValueError(f"interval and warmup must be ≥ 1, got interval={self.interval} warmup={self.warmup}")
        if not 1 <= self.online_min_skip <= self.online_max_skip:
            raise ValueError(
                f"need 1 ≤ online_min_skip ≤ online_max_skip, got {self.online_min_skip} and {self.online_max_skip}"
            )
        if not self.online_threshold > 0 or not self.profile_power > 0:
            raise ValueError("online_threshold and profile_power must be > 0")

    def full_step_budget(self, num_steps: int) -> int:
        """B for ``num_steps``; a budget above the step count is an error, not silently clipped."""
        table = dict(self.budgets)
        budget = self.budget or table.get(num_steps) or max(1, math.floor(num_steps / self.speedup))
        if budget > num_steps:
            raise ValueError(
                f"ALP budget of {budget} full steps per window exceeds num_inference_steps={num_steps}; lower the "
                f"budget to at most {num_steps} or raise the step count"
            )
        return budget

    @property
    def torch_cache_dtype(self) -> torch.dtype:
        return getattr(torch, self.cache_dtype)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown ALP {name} {value!r}; use one of {', '.join(choices)}")


# The reference's §6.11 starting points, with one change the tiny-model benchmark (bench/alp.py) measured: the last
# step is always full (one of the B), since a forecast last step's error goes straight into the output; it gained
# 0.2–8 dB at B = 5, 6, 8 of 30 and 50 steps and never lost. Every field is a parameter.
ALP_PRESETS: dict[str, AdaptiveLatentPredictionConfig | None] = {
    "off": None,
    "balanced": AdaptiveLatentPredictionConfig(
        name="balanced", budgets=((30, 10), (50, 15)), speedup=3.0, final_full=True
    ),
    "fast": AdaptiveLatentPredictionConfig(name="fast", budgets=((30, 5), (50, 8)), speedup=6.0, final_full=True),
    "paper": AdaptiveLatentPredictionConfig(
        name="paper",
        schedule="fixed",
        interval=5,
        order=3,
        granularity="module",
        derivatives="taylor",
        gain_mode="div",
        alpha=1.5,
    ),
}


def resolve_alp_config(value: str | AdaptiveLatentPredictionConfig | None) -> AdaptiveLatentPredictionConfig | None:
    """A preset name (``off``, ``balanced``, ``fast``, ``paper``), a config, or None (= off)."""
    if value is None or isinstance(value, AdaptiveLatentPredictionConfig):
        return value
    if isinstance(value, str) and value in ALP_PRESETS:
        return ALP_PRESETS[value]
    raise ValueError(
        f"unknown ALP preset {value!r}; choose one of {', '.join(ALP_PRESETS)} or pass an "
        "AdaptiveLatentPredictionConfig"
    )


# 2. Difference tables ---------------------------------------------------------------------------------------------
class DifferenceTable:
    """The last ≤ n+1 full-step values of one feature site, stored as n+1 difference factors (newest node first).

    newton: D₀ = f_a, D₁ = f[a,b], D₂ = f[a,b,c], … (divided differences on the actual τ nodes) and
        f̂(τ) = D₀ + D₁(τ−τ_a) + D₂(τ−τ_a)(τ−τ_b) + D₃(τ−τ_a)(τ−τ_b)(τ−τ_c): exact for polynomials of degree ≤ n.
    taylor: Δⁱ = (Δⁱ⁻¹_a − Δⁱ⁻¹_b)/K with K = τ_a − τ_b (TaylorSeer's recursion), f̂(τ_a + d) = Σ Δⁱ dⁱ / i!;
        this assumes uniform spacing and is O(K)-biased for i ≥ 2 even on polynomials.
    Math is fp32 (fp64 for an fp64 table); factors are stored in ``dtype``.
    """

    def __init__(self, order: int, method: str, dtype: torch.dtype):
        self.order, self.method, self.dtype = order, method, dtype
        self.math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.nodes: list[float] = []
        self.factors: list[torch.Tensor] = []

    def reset(self) -> None:
        self.nodes, self.factors = [], []

    def update(self, tau: float, feature: torch.Tensor) -> float | None:
        """Add the node (τ, f); returns ‖f − f_prev‖ / ‖f_prev‖ (None on the first node)."""
        if self.nodes and tau == self.nodes[0]:
            raise ValueError(f"feature site updated twice at τ={tau}; reset the state between sampling runs")
        new = [feature.to(self.math_dtype)]
        relative = None
        if self.factors:
            previous = self.factors[0].to(self.math_dtype)
            change = torch.linalg.vector_norm(new[0] - previous) / torch.linalg.vector_norm(previous).clamp_min(1e-12)
            relative = float(change)
        for i, old in enumerate(self.factors[: self.order]):
            spacing = tau - (self.nodes[i] if self.method == "newton" else self.nodes[0])
            new.append((new[i] - old.to(self.math_dtype)) / spacing)
        self.nodes = [tau, *self.nodes[: self.order]]
        self.factors = [f.to(self.dtype) for f in new]
        return relative

    def predict(self, tau: float, gains: Sequence[float] | None = None) -> torch.Tensor:
        """f̂(τ) in the math dtype, the i-th term multiplied by ``gains[i-1]``."""
        if not self.factors:
            raise RuntimeError("ALP forecast before any full step: step 0 must be full")
        out = self.factors[0].to(self.math_dtype, copy=True)
        weight = 1.0
        for i in range(1, len(self.factors)):
            if self.method == "newton":
                weight *= tau - self.nodes[i - 1]
            else:
                weight = (tau - self.nodes[0]) ** i / math.factorial(i)
            gain = 1.0 if gains is None else gains[i - 1]
            out.add_(self.factors[i].to(self.math_dtype), alpha=weight * gain)
        return out

    def magnitudes(self) -> list[float]:
        """E_tokens ‖Dᵢ‖ for i = 1 … n_eff (mean over tokens of the channel L2 norm)."""
        return [float(torch.linalg.vector_norm(f.float(), dim=-1).mean()) for f in self.factors[1:]]

    def to(self, device: torch.device | str) -> None:
        pin = torch.device(device).type == "cpu" and torch.cuda.is_available()
        moved = [f.to(device, non_blocking=True) for f in self.factors]
        self.factors = [f.pin_memory() if pin else f for f in moved]

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.factors)


# 3. Schedules and calibration profiles ----------------------------------------------------------------------------
def planned_full_steps(
    profile: Sequence[float], budget: int, power: float = 1.0, warmup: int = 1, final_full: bool = False
) -> tuple[int, ...]:
    """B full steps at equal shares of the cumulative variation C_j = Σ_{0<i≤j} ρ̃_iᵖ.

    ``profile[j]`` is the relative feature change arriving at step j (``profile[0]`` is unused). Steps 0 … warmup−1
    are full; each of the R remaining full steps k = 1 … R goes to the first j with
    C_j ≥ C_w + k·(C_total − C_w)/(R+1), C_w = C_{warmup−1}; with warmup = 1 that is k·C_total/B. A full step thus
    follows right after a large change. Collisions move later (and, at the end of the grid, earlier) so that the
    B steps are distinct; ``final_full`` reserves one of the B for the last step.
    """
    steps = len(profile)
    if not 1 <= budget <= steps:
        raise ValueError(f"budget {budget} must be between 1 and the profile's {steps} steps")
    warm = min(warmup, budget)
    reserved = 1 if final_full and budget > warm and steps > warm else 0
    remaining = budget - warm - reserved
    cumulative, total = [], 0.0
    for j, rate in enumerate(profile):
        total += max(float(rate), 0.0) ** power if j > 0 else 0.0
        cumulative.append(total)
    chosen = list(range(warm))
    start = cumulative[warm - 1]
    for k in range(1, remaining + 1):
        target = start + k * (total - start) / (remaining + 1)
        j = next((j for j, c in enumerate(cumulative) if c >= target - 1e-12 * max(total, 1.0)), steps - 1)
        chosen.append(max(j, chosen[-1] + 1))
    last = steps - 1 - reserved
    for k in range(len(chosen) - 1, warm - 1, -1):  # pull back inside the grid if collisions ran past its end
        chosen[k] = min(chosen[k], last - (len(chosen) - 1 - k))
    if reserved:
        chosen.append(steps - 1)
    return tuple(chosen)


def fixed_full_steps(num_steps: int, interval: int, warmup: int = 1, final_full: bool = False) -> tuple[int, ...]:
    """Full at j < warmup and at every K-th step after the last warm-up step: warmup 1, K 5 → 0, 5, 10, …"""
    steps = [j for j in range(num_steps) if j < warmup or (j - warmup + 1) % interval == 0]
    if final_full and steps[-1] != num_steps - 1:
        steps.append(num_steps - 1)
    return tuple(steps)


@dataclass(frozen=True)
class VariationProfile:
    """ρ̃_j of one all-full calibration run (one window, another seed and input), cached on disk under ``key``."""

    key: str
    num_steps: int
    rates: tuple[float, ...]  # [S]; rates[0] = 0

    def __post_init__(self) -> None:
        if len(self.rates) != self.num_steps:
            raise ValueError(f"profile {self.key!r} has {len(self.rates)} rates for {self.num_steps} steps")


def profile_key(
    model: str, sampler: str, num_steps: int, latent_window: tuple[int, int, int], granularity: str
) -> str:
    """The calibration's identity: model (preset + version), sampler (shift/grid + CFG), S, window shape, sites."""
    frames, height, width = latent_window
    return f"{model}|{sampler}|steps={num_steps}|window={frames}x{height}x{width}|{granularity}"


class ProfileCache:
    """One JSON file per profile key, written atomically; like MagCache's ratios, computed once per model."""

    def __init__(self, directory: str | os.PathLike | None = None):
        default = Path(os.environ.get(PROFILE_DIR_ENV, Path.home() / ".cache" / "flashportrait" / "alp-profiles"))
        self.directory = Path(directory) if directory is not None else default

    def path(self, key: str) -> Path:
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def load(self, key: str) -> VariationProfile | None:
        path = self.path(key)
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        if data.get("key") != key:
            raise ValueError(f"{path} holds the profile for {data.get('key')!r}, not {key!r}; delete the file")
        return VariationProfile(key, int(data["num_steps"]), tuple(float(r) for r in data["rates"]))

    def store(self, profile: VariationProfile) -> Path:
        path = self.path(profile.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(profile), indent=1))
        tmp.replace(path)
        return path


# 4. The plan that travels with the job's sampling config ---------------------------------------------------------
@dataclass(frozen=True)
class AlpPlan:
    """A config resolved for one sampling run: the static full steps (planned, fixed, or all for a calibration run;
    None for ``online``, which decides per window) and the calibration profile's key for the sidecar."""

    config: AdaptiveLatentPredictionConfig
    num_steps: int
    full_steps: tuple[int, ...] | None
    budget: int
    profile_key: str | None = None

    @classmethod
    def build(
        cls, config: AdaptiveLatentPredictionConfig, num_steps: int, profile: VariationProfile | None = None
    ) -> AlpPlan:
        budget = config.full_step_budget(num_steps)
        if config.schedule == "fixed":
            steps = fixed_full_steps(num_steps, config.interval, config.warmup, config.final_full)
            return cls(config, num_steps, steps, len(steps))
        if config.schedule == "online":
            return cls(config, num_steps, None, budget)
        if profile is None:
            raise ValueError("the planned ALP schedule needs a calibration profile; resolve it with resolve_alp_plan")
        if profile.num_steps != num_steps:
            raise ValueError(
                f"calibration profile {profile.key!r} is for {profile.num_steps} steps but sampling uses {num_steps}; "
                f"calibrate for {num_steps} steps (delete the cached profile or use its step count)"
            )
        steps = planned_full_steps(profile.rates, budget, config.profile_power, config.warmup, config.final_full)
        return cls(config, num_steps, steps, budget, profile.key)

    @classmethod
    def calibration(cls, config: AdaptiveLatentPredictionConfig, num_steps: int) -> AlpPlan:
        """Every step full: the run records ρ̃_j at every step, which is the variation profile."""
        return cls(replace(config, schedule="fixed", interval=1), num_steps, tuple(range(num_steps)), num_steps)


# 5. State ---------------------------------------------------------------------------------------------------------
class StreamState:
    """ALP state of one (window, CFG stream): a difference table per feature site and their derivative magnitudes.

    ``update(site, τ, f)`` adds a full-step feature; ``predict(site, τ)`` forecasts it; ``reset()`` forgets all.
    """

    def __init__(self, config: AdaptiveLatentPredictionConfig, layout: FeatureSiteLayout):
        self.config, self.layout = config, layout
        self.tables = [
            DifferenceTable(config.order, config.derivatives, config.torch_cache_dtype) for _ in layout.kinds
        ]
        self.gains: list[list[float]] | None = None  # per site, per order i ≥ 1; None = all 1
        self.relative_changes: list[float] = []  # this full step's per-site ‖Δf‖/‖f‖

    def reset(self) -> None:
        for table in self.tables:
            table.reset()
        self.gains, self.relative_changes = None, []

    def update(self, site: int, tau: float, feature: torch.Tensor) -> None:
        relative = self.tables[site].update(tau, feature)
        if relative is not None:
            self.relative_changes.append(relative)

    def predict(self, site: int, tau: float) -> torch.Tensor:
        return self.tables[site].predict(tau, None if self.gains is None else self.gains[site])

    def derivative_rate(self) -> float | None:
        """ρ = mean over sites of E_tokens‖D₁‖ (the absolute variation rate behind s(t))."""
        first = [m[0] for m in (t.magnitudes() for t in self.tables) if m]
        return sum(first) / len(first) if first else None

    def set_gains(self, s: float) -> None:
        """Paper's gains per site g and order i: w = r^(−1/2), r = m_{g,i} / mean of m_{·,i} over sites of the same
        kind (1 when a kind has one site); ``div`` → 1/(w·s), ``mul`` → w·s, clipped to [1/γ, γ]."""
        mode, clip = self.config.gain_mode, self.config.gain_clip
        if mode == "none":
            self.gains = None
            return
        magnitudes = [t.magnitudes() for t in self.tables]
        gains = []
        for site, kind in enumerate(self.layout.kinds):
            peers = [g for g, k in enumerate(self.layout.kinds) if k == kind]
            row = []
            for i, m in enumerate(magnitudes[site]):
                mean = sum(magnitudes[p][i] for p in peers) / len(peers)
                w = (m / mean) ** -0.5 if m > 0 and mean > 0 else 1.0
                gain = 1.0 / (w * s) if mode == "div" else w * s
                row.append(min(max(gain, 1.0 / clip), clip))
            gains.append(row)
        self.gains = gains

    def to(self, device: torch.device | str) -> None:
        for table in self.tables:
            table.to(device)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables)


@dataclass
class _StreamCall:
    """The ``FeatureCache`` handed to one transformer call: binds a stream's state to this step's τ."""

    state: StreamState
    tau: float
    forecasting: bool
    seconds: float = 0.0  # time spent in ALP's own arithmetic during the call

    def record(self, site: int, feature: torch.Tensor) -> None:
        start = time.perf_counter()
        self.state.update(site, self.tau, feature)
        self.seconds += time.perf_counter() - start

    def forecast(self, site: int) -> torch.Tensor:
        start = time.perf_counter()
        out = self.state.predict(site, self.tau)
        self.seconds += time.perf_counter() - start
        return out


class WindowState:
    """ALP state of one window: its streams' states, the full/predicted decision, rates and statistics.

    The first stream (``cond``) carries the window's variation rates: ρ̃ (relative change per step, for the online
    rule and the calibration profile) and ρ (absolute, for s(t)).
    """

    def __init__(self, plan: AlpPlan, window: int, streams: Sequence[str], layout: FeatureSiteLayout):
        self.plan, self.window, self.layout = plan, window, layout
        self.streams = {name: StreamState(plan.config, layout) for name in streams}
        self.rates: list[float] = []  # ρ at every full step from the second on
        self.variation: list[tuple[int, float]] = []  # (step, ρ̃) at every full step from the second on
        self.full_steps: list[int] = []
        self.predicted_steps = 0
        self.next_online_full = 0
        self.state_bytes_peak = 0
        self.seconds_full = self.seconds_predicted = self.seconds_alp = self.seconds_other = 0.0
        self.step_transformer_seconds = 0.0

    def reset(self) -> None:
        self.__init__(self.plan, self.window, tuple(self.streams), self.layout)

    def is_full(self, step: int) -> bool:
        plan, config = self.plan, self.plan.config
        if plan.full_steps is not None:
            return step in plan.full_steps
        if step < config.warmup or not self.full_steps:
            return True
        remaining_budget = plan.budget - len(self.full_steps)
        if config.final_full and step == plan.num_steps - 1:
            return True
        reserve = 1 if config.final_full else 0
        return step >= self.next_online_full and remaining_budget > reserve

    def call(self, stream: str, step: int, tau: float, full: bool) -> _StreamCall:
        state = self.streams[stream]
        if full:
            state.relative_changes = []
        return _StreamCall(state, tau, forecasting=not full)

    def finish_step(self, step: int, full: bool) -> None:
        """After every stream's call: rates, gains, the online rule, memory."""
        if full:
            self.full_steps.append(step)
            cond = next(iter(self.streams.values()))
            if cond.relative_changes:
                gap = step - self.full_steps[-2]
                rate_rel = sum(cond.relative_changes) / len(cond.relative_changes) / gap
                self.variation.append((step, rate_rel))
                self.rates.append(cond.derivative_rate() or 0.0)
                skip = math.floor(self.plan.config.online_threshold / max(rate_rel, 1e-12))
            else:
                skip = self.plan.config.online_min_skip
            config = self.plan.config
            self.next_online_full = step + min(max(skip, config.online_min_skip), config.online_max_skip)
            s = self._variation_gain()
            for state in self.streams.values():
                state.set_gains(s)
        else:
            self.predicted_steps += 1
        self.state_bytes_peak = max(self.state_bytes_peak, self.nbytes)

    def _variation_gain(self) -> float:
        """s = (ρ_a / mean ρ over this window's full steps so far)^α; 1 until two rates exist."""
        if len(self.rates) < 2:
            return 1.0
        mean = sum(self.rates) / len(self.rates)
        return (self.rates[-1] / mean) ** self.plan.config.alpha if mean > 0 else 1.0

    def to(self, device: torch.device | str) -> None:
        for state in self.streams.values():
            state.to(device)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.streams.values())

    def stats(self) -> AlpWindowStats:
        return AlpWindowStats(
            window=self.window,
            full_steps=len(self.full_steps),
            predicted_steps=self.predicted_steps,
            full_step_indices=tuple(self.full_steps),
            streams=len(self.streams),
            block_equivalents=float(len(self.full_steps) * len(self.streams)),
            state_bytes_peak=self.state_bytes_peak,
            seconds_transformer_full=self.seconds_full,
            seconds_transformer_predicted=self.seconds_predicted,
            seconds_alp=self.seconds_alp,
            seconds_other=self.seconds_other,
            variation=tuple(self.variation),
        )


class AdaptiveLatentPrediction:
    """ALP for one sampling run of one job on one process: a ``WindowState`` per window it advances."""

    def __init__(self, plan: AlpPlan, streams: Sequence[str], layout: FeatureSiteLayout, device: torch.device | str):
        self.plan, self.streams, self.layout, self.device = plan, tuple(streams), layout, torch.device(device)
        self.windows: dict[int, WindowState] = {}

    def window(self, index: int) -> WindowState:
        if index not in self.windows:
            self.windows[index] = WindowState(self.plan, index, self.streams, self.layout)
        state = self.windows[index]
        if self.plan.config.offload:
            state.to(self.device)
        return state

    def park(self, index: int) -> None:
        """Between a window's visits its state may live in (pinned) host memory."""
        if self.plan.config.offload and self.device.type != "cpu":
            self.windows[index].to("cpu")

    def window_stats(self) -> list[AlpWindowStats]:
        return [self.windows[k].stats() for k in sorted(self.windows)]


# 6. Statistics ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AlpWindowStats:
    """Per window: block-equivalents are whole-stack transformer passes (all streams); a predicted step costs none."""

    window: int
    full_steps: int
    predicted_steps: int
    full_step_indices: tuple[int, ...]
    streams: int
    block_equivalents: float
    state_bytes_peak: int
    seconds_transformer_full: float
    seconds_transformer_predicted: float  # the live path plus the forecast
    seconds_alp: float  # ALP's own arithmetic (updates, forecasts), inside the two above
    seconds_other: float  # CFG combination, Euler update, host transfers
    variation: tuple[tuple[int, float], ...]  # (step, ρ̃) of the cond stream at full steps


@dataclass(frozen=True)
class AlpJobStats:
    preset: str
    schedule: str
    granularity: str
    order: int
    num_steps: int
    budget: int
    planned_full_steps: tuple[int, ...] | None
    profile_key: str | None
    windows: tuple[AlpWindowStats, ...]
    seconds_calibration: float = 0.0
    totals: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def collect(
        cls, plan: AlpPlan, windows: Sequence[AlpWindowStats], seconds_calibration: float = 0.0
    ) -> AlpJobStats:
        ordered = tuple(sorted(windows, key=lambda w: w.window))
        totals = {
            "full_steps": sum(w.full_steps for w in ordered),
            "predicted_steps": sum(w.predicted_steps for w in ordered),
            "block_equivalents": sum(w.block_equivalents for w in ordered),
            "state_bytes_peak": sum(w.state_bytes_peak for w in ordered),
            "seconds_transformer_full": sum(w.seconds_transformer_full for w in ordered),
            "seconds_transformer_predicted": sum(w.seconds_transformer_predicted for w in ordered),
            "seconds_alp": sum(w.seconds_alp for w in ordered),
            "seconds_other": sum(w.seconds_other for w in ordered),
        }
        config = plan.config
        return cls(
            preset=config.name,
            schedule=config.schedule,
            granularity=config.granularity,
            order=config.order,
            num_steps=plan.num_steps,
            budget=plan.budget,
            planned_full_steps=plan.full_steps,
            profile_key=plan.profile_key,
            windows=ordered,
            seconds_calibration=seconds_calibration,
            totals=totals,
        )

    def to_dict(self) -> dict:
        """JSON-ready, for the sidecar and the run report."""
        data = asdict(self)
        data["totals"] = dict(self.totals)
        return data
