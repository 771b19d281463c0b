"""Process-level faults: SIGTERM stops a batch within its grace period with a report; a full scratch disk
(RLIMIT_FSIZE) fails the row with a clear reason and leaves nothing behind."""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from waiting import CEILING_S, wait_for


pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "flashportrait"


def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def test_sigterm_stops_the_batch_writes_the_report_and_resume_does_the_rest(tmp_path):
    for name in ("reference.png", "driving_short.mp4"):
        shutil.copy(ROOT / "examples" / name, tmp_path / name)
    rows = [
        {"id": f"job-{i}", "reference": "reference.png", "driving": "driving_short.mp4", "seed": i} for i in range(6)
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = [
        str(CLI),
        "batch",
        str(tmp_path / "m.jsonl"),
        "--out",
        str(out),
        "--workers",
        "0",
        "--steps",
        "3",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for((out / "job-0.json").exists, "first published job", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)  # the grace period a Prefect worker or orchestrator gives
    assert proc.returncode == 143, stderr[-2000:]
    report = {
        r["id"]: r["status"] for r in pq.read_table(io.BytesIO((out / "report.parquet").read_bytes())).to_pylist()
    }
    assert len(report) == 6 and set(report.values()) <= {"done", "cancelled"} and "cancelled" in report.values()
    done = {i for i, s in report.items() if s == "done"}
    files = {p.name for p in out.iterdir()}
    assert all(f"{i}.mp4" in files and f"{i}.json" in files for i in done)
    assert not any(name.startswith(".") or name.endswith(".part") for name in files)  # no temp file left
    assert not any(f"{i}.json" in files for i in report if report[i] == "cancelled")

    resumed = subprocess.run(cmd, env=env(tmp_path), capture_output=True, text=True, timeout=CEILING_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = {
        r["id"]: r["status"] for r in pq.read_table(io.BytesIO((out / "report.parquet").read_bytes())).to_pylist()
    }
    assert {i for i, s in report.items() if s == "skipped"} == done  # the re-run rendered exactly the rest
    assert all(report[i] == "done" for i in report if i not in done)


def test_full_scratch_disk_fails_the_row_cleanly(tmp_path):
    scratch_limit = 60_000  # bytes: smaller than the 105 kB reference image

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (scratch_limit, scratch_limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    out = tmp_path / "clip.mp4"
    proc = subprocess.run(
        [
            str(CLI),
            "render",
            "--reference",
            "examples/reference.png",
            "--driving",
            "examples/driving_short.mp4",
            "--out",
            str(out),
            "--steps",
            "1",
        ],
        cwd=ROOT,
        env=env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "File too large" in proc.stderr and "reference" in proc.stderr
    assert not out.exists() and not (tmp_path / "clip.json").exists()
