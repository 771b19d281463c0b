"""Soak: N small jobs on a loopback Ray cluster while a seeded schedule injects faults; nothing may be lost.

Run: .venv/bin/python bench/soak.py [--jobs 40] [--seed 7] [--cap-s 900]

Everything is on this machine: moto's S3 server behind the loopback fault proxy (tests/reliability/s3_fault_proxy),
a local Ray cluster started by each `flashportrait batch` process (2 workers), the tiny preset.
Faults, from one seeded schedule:
- S3: 503 SlowDown on a seeded fraction of UploadPart / PutObject / GetObject requests (within the retry budget);
- actor kills: SIGKILL of a random WindowWorker process at seeded moments (Ray restarts it, the step is retried);
- one flow kill: the first batch process group is SIGKILLed after a seeded number of published rows; a second
  batch run then resumes, and must render exactly the rest.
Prints JSON: jobs done / failed / lost (lost = rows with no terminal status and no published output; must be 0),
faults injected, S3 retries answered, p50/p95 job time, wall time. Exits 1 if anything was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reliability.s3_fault_proxy import FaultProxy, Rule  # noqa: E402


def worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()[1:] if "ray::WindowWorker" in line]


def start_moto() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def setup_bucket(endpoint: str, jobs: int) -> str:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="soak")
    for name in ("reference.png", "driving_short.mp4"):
        s3.upload_file(str(ROOT / "examples" / name), "soak", f"in/{name}")
    rows = [
        {"id": f"job-{i:03d}", "reference": "reference.png", "driving": "driving_short.mp4", "seed": i}
        for i in range(jobs)
    ]
    s3.put_object(Bucket="soak", Key="in/m.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    return "s3://soak/in/m.jsonl"


def published(endpoint: str) -> set[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="soak", Prefix="out/")
    return {
        o["Key"][4:-5]
        for page in pages
        for o in page.get("Contents", [])
        if o["Key"].endswith(".json") and not o["Key"].startswith("out/_")
    }


def run_batch(
    manifest: str,
    env: dict[str, str],
    kill_after: int | None,
    moto_endpoint: str,
    rng: random.Random,
    cap_at: float,
    kills: list[str],
) -> int:
    cmd = [
        str(Path(sys.executable).parent / "flashportrait"),
        "batch",
        manifest,
        "--out",
        "s3://soak/out",
        "--workers",
        "2",
        "--steps",
        "2",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stop = threading.Event()
    stderr_tail: list[bytes] = []

    def drain() -> None:
        for line in proc.stderr:
            stderr_tail[:] = (stderr_tail + [line])[-20:]

    def kill_actors() -> None:
        while not stop.wait(rng.uniform(4.0, 9.0)):
            pids = worker_pids()
            if pids:
                victim = rng.choice(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(f"actor {victim}")
                except ProcessLookupError:
                    pass

    threads = [threading.Thread(target=drain, daemon=True), threading.Thread(target=kill_actors, daemon=True)]
    for t in threads:
        t.start()
    try:
        while proc.poll() is None:
            if time.monotonic() > cap_at:
                os.killpg(proc.pid, signal.SIGKILL)
                raise TimeoutError("soak exceeded its wall-clock cap")
            if kill_after is not None and len(published(moto_endpoint)) >= kill_after:
                os.killpg(proc.pid, signal.SIGKILL)
                kills.append(f"flow after {kill_after} published rows")
                proc.wait(timeout=30)
                return -9
            time.sleep(0.5)
        return proc.returncode
    finally:
        stop.set()
        if proc.returncode not in (0, 1, -9):
            sys.stderr.write(b"".join(stderr_tail).decode(errors="replace"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cap-s", type=float, default=900.0, help="hard wall-clock cap for the whole soak")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    # moto accepts any credentials; these are set for this process and every batch it starts.
    os.environ.update(AWS_ACCESS_KEY_ID="soak", AWS_SECRET_ACCESS_KEY="soak", AWS_DEFAULT_REGION="us-east-1")
    started = time.monotonic()
    cap_at = started + args.cap_s
    server, moto_endpoint = start_moto()
    rules = [
        Rule(action="status", operation=op, status=503, code="SlowDown", probability=0.08)
        for op in ("UploadPart", "PutObject", "GetObject", "CompleteMultipartUpload")
    ]
    kills: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="fp-soak-") as tmp,
        FaultProxy(moto_endpoint, rules, seed=args.seed) as proxy,
    ):
        manifest = setup_bucket(moto_endpoint, args.jobs)
        env = {
            **os.environ,
            **proxy.env(),
            "AWS_ACCESS_KEY_ID": "soak",
            "AWS_SECRET_ACCESS_KEY": "soak",
            "AWS_DEFAULT_REGION": "us-east-1",
            "RAY_AUTH_MODE": "disabled",
            "PREFECT_HOME": f"{tmp}/prefect",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "RAY_TMPDIR": tempfile.mkdtemp(prefix="fpsk", dir="/tmp"),
        }
        flow_kill_after = rng.randint(args.jobs // 4, args.jobs // 2)
        first = run_batch(manifest, env, flow_kill_after, moto_endpoint, rng, cap_at, kills)
        second = run_batch(manifest, env, None, moto_endpoint, rng, cap_at, kills)
        import boto3

        s3 = boto3.client("s3", endpoint_url=moto_endpoint)
        report = {r["id"]: r for r in _read_report(s3)}
        done_ids = published(moto_endpoint)
        failed = sorted(i for i, r in report.items() if r["status"] == "failed")
        lost = sorted(
            f"job-{i:03d}" for i in range(args.jobs) if f"job-{i:03d}" not in done_ids and f"job-{i:03d}" not in failed
        )
        times = [
            json.loads(s3.get_object(Bucket="soak", Key=f"out/{i}.json")["Body"].read())["result"]["seconds_total"]
            for i in sorted(done_ids)
        ]
        pending = s3.list_multipart_uploads(Bucket="soak").get("Uploads", [])
        result = {
            "machine": f"{os.cpu_count()} CPU cores, no GPU; tiny preset, 2 Ray workers, moto S3 behind a fault proxy",
            "jobs": args.jobs,
            "done": len(done_ids),
            "failed": len(failed),
            "lost": len(lost),
            "lost_ids": lost,
            "failed_reasons": sorted({report[i]["reason"] for i in failed})[:5],
            "faults": {"kills": kills, "s3_errors_injected": proxy.injected()},
            "batch_exit_codes": [first, second],
            "second_run_skipped": sum(r["status"] == "skipped" for r in report.values()),
            "pending_multipart_uploads": len(pending),
            "job_seconds_p50": statistics.median(times) if times else None,
            "job_seconds_p95": statistics.quantiles(times, n=20)[-1] if len(times) >= 20 else max(times, default=None),
            "wall_s": time.monotonic() - started,
        }
    server.stop()
    print(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 and result["done"] + result["failed"] == args.jobs else 1


def _read_report(s3) -> list[dict]:
    import io

    import pyarrow.parquet as pq

    body = s3.get_object(Bucket="soak", Key="out/report.parquet")["Body"].read()
    return pq.read_table(io.BytesIO(body)).to_pylist()


if __name__ == "__main__":
    sys.exit(main())
