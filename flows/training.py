"""The ``train`` flow: a training recipe run as a Prefect flow, its stages executed on a Ray worker.

``flashportrait train CONFIG`` runs the same stages in the calling process; this flow is for a cluster, where
Prefect records the run (parameters, logs, the summary as an artifact) and Ray places the work on a node with the
device it asks for. Every stage resumes, so a retried or re-run flow continues where the last one stopped.
"""

from __future__ import annotations

import json

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flashportrait.actors.cluster import RayClusterSettings, connect
from flashportrait.actors.training import TrainingRequest, train_on_worker
from flashportrait.model.training import STAGES


@flow(name="train")
def train(
    config: str,
    stages: list[str] | None = None,
    max_steps: int | None = None,
    out: str | None = None,
    ray_address: str | None = None,
    gpus: float = 0.0,
    cpus: float = 1.0,
) -> dict:
    """Run ``stages`` (default: all) of the recipe at ``config`` on a Ray worker; returns the stages' summary."""
    logger = get_run_logger()
    chosen = tuple(s for s in STAGES if s in (stages or STAGES))
    unknown = sorted(set(stages or ()) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown training stage(s) {unknown}; stages: {', '.join(STAGES)}")
    info = connect(RayClusterSettings(address=ray_address))
    logger.info("training %s (stages %s) on Ray cluster %s", config, ", ".join(chosen), info.address)
    summary = train_on_worker(TrainingRequest(config, chosen, max_steps, out, gpus, cpus))
    create_markdown_artifact(
        key="training-summary", markdown=f"```json\n{json.dumps(summary, indent=2)}\n```", description=config
    )
    return summary
