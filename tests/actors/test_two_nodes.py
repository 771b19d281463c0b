"""A two-node Ray cluster on loopback: one video's workers land on different nodes, the output equals a single
device's, and losing a worker node mid-video costs time but not the video."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow


def test_windows_on_two_nodes_and_node_loss():
    script = Path(__file__).with_name("two_node_scenario.py")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=420, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(result["worker_nodes"])) == 2  # the two workers of one video run on different nodes
    assert set(result["worker_nodes"]) == set(result["cluster_nodes"])  # neither on the CPU-less head
    assert result["two_nodes_equal_single_device"]
    assert result["after_node_loss_equal"]  # the lost worker restarted on the spare node; same bits
    assert result["worker1_node_after"] != result["killed"]
