"""Training on a Ray worker: the recipe's stages run in one task that holds the device (a GPU where the cluster
has one), so a Prefect flow can schedule a training run on the same cluster that renders."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from flashportrait.model.training.recipe import load_config, run_stages


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingRequest:
    config: str  # path of the recipe TOML, readable on the worker's node
    stages: tuple[str, ...]
    max_steps: int | None = None
    out: str | None = None  # overrides the recipe's output folder (on the worker's node)
    gpus: float = 0.0
    cpus: float = 1.0


def _train(request: TrainingRequest) -> dict:
    import dataclasses

    config = load_config(request.config)
    if request.out:
        config = dataclasses.replace(config, out=request.out)
    return run_stages(config, request.stages, max_steps=request.max_steps)


def train_on_worker(request: TrainingRequest) -> dict:
    """Run the stages in one Ray task on a worker with the requested CPUs/GPUs; the stages' summary."""
    task = ray.remote(num_cpus=request.cpus, num_gpus=request.gpus, max_retries=0)(_train)
    return ray.get(task.remote(request))
