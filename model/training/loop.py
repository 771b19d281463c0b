"""The training loop both stages share: AdamW with warm-up, gradient clipping, EMA, safetensors checkpoints that
resume bit-exactly, a progress bar with loss and ETA, and a loss curve (CSV and PNG) beside the checkpoints.

Bit-exact resume without saving RNG states: every random draw of step ``k`` (data order, crops, timesteps, noise,
dropout) comes from a generator seeded with ``(seed, k)`` (:func:`step_generator`), and the learning rate is a
pure function of the step, so a checkpoint needs only the weights, the EMA weights, the optimizer's moments and
the step. The data order is a seeded permutation per epoch (:func:`epoch_order`), also a pure function.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..components import safetensors_metadata


logger = logging.getLogger(__name__)

CHECKPOINT_GLOB = "checkpoint-*.safetensors"
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class OptimConfig:
    """One stage's optimisation settings (the official trainer's: AdamW wd 3e-2, warm-up then constant, clip 1)."""

    steps: int = 1000
    batch: int = 4
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 3e-2
    warmup_steps: int = 100
    lr_final: float | None = None  # None: constant after warm-up (official); else cosine decay to it at `steps`
    clip_grad: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be >= 1 (got steps={self.steps}, batch={self.batch})")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (got {self.ema_decay}); 0.999 is usual")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 (got {self.checkpoint_every})")
        if self.lr_final is not None and not 0 <= self.lr_final <= self.lr:
            raise ValueError(f"lr_final must be in [0, lr={self.lr}] (got {self.lr_final})")

    def lr_at(self, step: int) -> float:
        """Linear warm-up from lr/100 over ``warmup_steps``, then constant (the official constant_with_warmup), or
        with ``lr_final`` a cosine decay to it: a continuation of a trained model ends on small steps, which the
        EMA alone does not replace."""
        if step < self.warmup_steps:
            return self.lr * (0.01 + 0.99 * step / self.warmup_steps)
        if self.lr_final is None:
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.lr_final + 0.5 * (self.lr - self.lr_final) * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of every random draw of one step: a pure function of (seed, step)."""
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step) % (2**63))


def epoch_order(seed: int, epoch: int, size: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator("cpu").manual_seed(seed * 7919 + epoch))


def batch_indices(seed: int, step: int, batch: int, size: int) -> list[int]:
    """The dataset indices of step ``step``: consecutive slices of per-epoch seeded permutations."""
    out = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(position, size)
        out.append(int(epoch_order(seed, epoch, size)[offset]))
    return out


LossFn = Callable[[int, torch.Generator], torch.Tensor]


class TrainingRun:
    """Runs ``loss_fn`` for ``config.steps`` steps over ``model``'s trainable parameters, checkpointing to
    ``folder``; a folder with checkpoints resumes from the newest one that matches ``model`` and ``config``."""

    def __init__(self, name: str, model: nn.Module, loss_fn: LossFn, config: OptimConfig, folder: str | Path):
        self.name = name
        self.model = model
        self.loss_fn = loss_fn
        self.config = config
        self.folder = Path(folder)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(f"{name}: the model has no trainable parameters (requires_grad is off everywhere)")
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.ema = {n: p.detach().clone() for n, p in self.params.items()}
        self.step = 0

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def checkpoint_path(self, step: int) -> Path:
        return self.folder / f"checkpoint-{step:07d}.safetensors"

    def save(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            tensors[f"model.{name}"] = param.detach().contiguous()
            tensors[f"ema.{name}"] = self.ema[name].contiguous()
            state = self.optimizer.state.get(param)
            if state:
                tensors[f"adam.exp_avg.{name}"] = state["exp_avg"].contiguous()
                tensors[f"adam.exp_avg_sq.{name}"] = state["exp_avg_sq"].contiguous()
                tensors[f"adam.step.{name}"] = state["step"].reshape(1).contiguous()
        metadata = {"step": str(self.step), "stage": self.name, "config": json.dumps(asdict(self.config))}
        path = self.checkpoint_path(self.step)
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial), metadata=metadata)
        partial.replace(path)  # a checkpoint is whole or absent
        for old in sorted(self.folder.glob(CHECKPOINT_GLOB))[:-KEEP_CHECKPOINTS]:
            old.unlink()
        return path

    def resume(self) -> bool:
        """Load the newest checkpoint in the folder, if any; True when one was loaded."""
        found = sorted(self.folder.glob(CHECKPOINT_GLOB))
        if not found:
            return False
        path = found[-1]
        tensors = load_file(str(path))
        missing = [n for n in self.params if f"model.{n}" not in tensors]
        if missing:
            raise ValueError(
                f"{path} does not match the {self.name} model (missing {missing[:3]}…); it was made by another "
                "config: point the output folder elsewhere or delete it"
            )
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(tensors[f"model.{name}"])
                self.ema[name].copy_(tensors[f"ema.{name}"])
                if f"adam.exp_avg.{name}" in tensors:
                    self.optimizer.state[param] = {
                        "step": tensors[f"adam.step.{name}"].reshape(()).clone(),
                        "exp_avg": tensors[f"adam.exp_avg.{name}"].clone(),
                        "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"].clone(),
                    }
        self.step = int(safetensors_metadata(path)["step"])
        logger.info("%s: resumed from %s (step %d)", self.name, path.name, self.step)
        return True

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self, *, until: int | None = None, show_progress: bool = True) -> list[float]:
        """Train to ``until`` (default: the configured steps) and return this call's per-step losses."""
        from tqdm import tqdm

        target = min(self.config.steps, until or self.config.steps)
        losses: list[float] = []
        bar = tqdm(total=target, initial=self.step, desc=self.name, disable=not show_progress, dynamic_ncols=True)
        self.model.train()
        self._open_log()
        started = time.perf_counter()
        while self.step < target:
            loss = self._one_step()
            losses.append(loss)
            self._log(loss)
            self.step += 1
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.config.lr_at(self.step):.1e}")
            bar.update(1)
            if self.step % self.config.checkpoint_every == 0 or self.step == target:
                self.save()
                write_loss_plot(self.folder)
        bar.close()
        self.model.eval()
        if losses:
            logger.info(
                "%s: %d steps in %.0f s, last loss %.4f",
                self.name,
                len(losses),
                time.perf_counter() - started,
                losses[-1],
            )
        return losses

    def _one_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.step, step_generator(self.config.seed, self.step))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: loss is {loss.item()} at step {self.step}; lower the lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.config.clip_grad)
        self.optimizer.step()
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for name, param in self.params.items():
                self.ema[name].lerp_(param.detach(), 1 - decay)
        return float(loss.detach())

    def _open_log(self) -> None:
        """Start loss.csv, or cut it back to the resumed step (rows past the checkpoint belong to lost work)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "loss.csv"
        if self.step == 0 or not path.exists():
            path.write_text("step,loss,lr\n")
            return
        rows = path.read_text().splitlines()[: self.step + 1]  # the header and steps 0 … step−1
        path.write_text("\n".join(rows) + "\n")

    def _log(self, loss: float) -> None:
        with open(self.folder / "loss.csv", "a") as file:
            file.write(f"{self.step},{loss:.6f},{self.config.lr_at(self.step):.3e}\n")

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in self.ema.items()}


def write_loss_plot(folder: Path) -> Path | None:
    """loss.csv → loss.png (raw loss and a 50-step moving average, log scale)."""
    path = folder / "loss.csv"
    if not path.exists():
        return None
    with open(path) as file:
        rows = list(csv.DictReader(file))
    if len(rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    window = max(1, min(50, len(losses) // 5))
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot(steps, losses, color="0.75", linewidth=0.6, label="loss")
    axis.plot(steps, smooth, color="C0", linewidth=1.4, label=f"{window}-step mean")
    if min(losses) > 0 and max(losses) / max(min(losses), 1e-12) > 10:
        axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(f"{folder.name}: loss (last {smooth[-1]:.4g})")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    out = folder / "loss.png"
    figure.savefig(out)
    plt.close(figure)
    return out
