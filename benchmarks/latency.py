"""Latency: commit of an enqueue to the start of its handler, at a steady rate."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import psycopg

from benchmarks import tasks as bench
from benchmarks.harness import Bench, log, percentile


def measure_latency(b: Bench, reset: bool) -> dict[str, Any]:
    config = b.config
    if reset:
        b.reset()
    latency_file = b.tmpdir / "latency.txt"
    latency_file.unlink(missing_ok=True)
    worker = b.spawn_worker(
        bench.LATENCY_QUEUE,
        10,
        burst=False,
        tag="latency",
        env={bench.LATENCY_FILE_ENV: str(latency_file)},
    )
    commits: dict[int, float] = {}
    before: dict[int, float] = {}

    def recorded() -> dict[int, float]:
        if not latency_file.exists():
            return {}
        seen: dict[int, float] = {}
        for line in latency_file.read_text().splitlines():
            seq, at = line.split()
            seen[int(seq)] = float(at)
        return seen

    try:
        with psycopg.connect(b.dsn, autocommit=True) as connection:
            # Ready means: LISTEN is up and a job went through end to end.
            deadline = time.monotonic() + 60
            bench.record_latency.enqueue(connection, seq=-1)
            while -1 not in recorded():
                if worker.poll() is not None:
                    raise RuntimeError(
                        f"latency worker exited with {worker.returncode}:\n{b.worker_log('latency')}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"latency worker never ran a job:\n{b.worker_log('latency')}")
                time.sleep(0.05)
            warmup = round(config.latency_warmup_seconds * config.latency_rate)
            total = warmup + round(config.latency_seconds * config.latency_rate)
            interval = 1 / config.latency_rate
            started = time.perf_counter()
            for seq in range(total):
                target = started + seq * interval
                while (pause := target - time.perf_counter()) > 0:
                    time.sleep(pause)
                before[seq] = time.time()
                bench.record_latency.enqueue(connection, seq=seq)  # autocommit: committed on return
                commits[seq] = time.time()
            produced = time.perf_counter() - started
        deadline = time.monotonic() + 15
        while len(seen := recorded()) < total + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        if worker in b.children:
            b.children.remove(worker)
    measured = [seq for seq in range(warmup, total)]
    missing = [seq for seq in measured if seq not in seen]
    latencies = sorted((seen[seq] - commits[seq]) * 1000 for seq in measured if seq in seen)
    from_call = sorted((seen[seq] - before[seq]) * 1000 for seq in measured if seq in seen)
    result = {
        "jobs": len(measured),
        "missing": len(missing),
        "target_rate": config.latency_rate,
        "achieved_rate": total / produced,
        "p50_ms": percentile(latencies, 0.50),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": latencies[-1] if latencies else None,
        "min_ms": latencies[0] if latencies else None,
        "from_enqueue_call_p50_ms": percentile(from_call, 0.50),
        "from_enqueue_call_p99_ms": percentile(from_call, 0.99),
        "enqueue_call_p50_ms": percentile(sorted((commits[s] - before[s]) * 1000 for s in measured), 0.50),
    }
    if missing:
        raise RuntimeError(f"latency: {len(missing)} of {len(measured)} jobs never started")
    log(
        f"latency at {result['achieved_rate']:.0f} jobs/s: p50 {result['p50_ms']:.2f} ms, "
        f"p95 {result['p95_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, max {result['max_ms']:.2f} ms"
    )
    return result
