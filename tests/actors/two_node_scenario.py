"""Run in a fresh process by test_two_nodes.py: a real multi-node Ray cluster on loopback (ray.cluster_utils),
one video's windows on two nodes, then the loss of a worker node mid-video. Prints one JSON line."""

from __future__ import annotations

import json
import os
import sys

import numpy as np


os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from flashportrait.actors.coordinator import RayDenoiseBackend, WorkerPool, WorkerPoolSettings  # noqa: E402
from flashportrait.model import runtime  # noqa: E402
from flashportrait.model.pipeline_flashportrait import FlashPortraitPipeline, GenerationRequest  # noqa: E402


NODE = {"num_cpus": 1, "object_store_memory": 80 << 20}
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 500}


def request() -> GenerationRequest:
    rng = np.random.default_rng(21)
    return GenerationRequest(
        reference=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        expression_features=rng.standard_normal((41, 554)).astype(np.float32),
        prompt="two nodes",
        seed=9,
        num_inference_steps=4,
    )


def main() -> None:
    # The head holds no CPU, so both workers must run on the two worker nodes.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": 80 << 20,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH,
        },
    )
    nodes = [cluster.add_node(**NODE), cluster.add_node(**NODE)]
    ray.init(address=cluster.address)
    result: dict[str, object] = {}
    pool = WorkerPool(WorkerPoolSettings(workers=2, torch_threads=1, max_restarts=3, step_timeout_s=120))
    try:
        result["worker_nodes"] = sorted(info.node_id for info in pool.infos)
        result["cluster_nodes"] = sorted(n.node_id for n in nodes)
        backend = RayDenoiseBackend(pool)
        clean = backend(request())
        runtime.configure_threads(1)
        single = FlashPortraitPipeline.from_preset("tiny")(request())
        result["two_nodes_equal_single_device"] = bool(np.array_equal(clean.frames, single.frames))

        # Node loss mid-video: a spare node joins, the node of worker 1 dies after step 1 (no graceful exit).
        cluster.add_node(**NODE)
        victim = next(n for n in nodes if n.node_id == pool.infos[1].node_id)

        def lose_node(done: int, total: int) -> None:
            if done == 1 and "killed" not in result:
                cluster.remove_node(victim, allow_graceful=False)
                result["killed"] = victim.node_id

        faulty = backend(request(), progress=lose_node)
        result["after_node_loss_equal"] = bool(np.array_equal(faulty.frames, clean.frames))
        result["worker1_node_after"] = ray.get(pool.actors[1].info.remote(), timeout=60).node_id
    finally:
        pool.close()
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
