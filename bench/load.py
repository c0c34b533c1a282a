"""Many visitors at once, against `python app.py` started here: nothing lost, nothing hung, memory back.

    python bench/load.py [--clients 16] [--requests 4] [--max-new-tokens 32] [--model DIR]
                         [--concurrency 1] [--max-queue 8] [--json bench/load.json]

Loopback only, bounded in count and time. Each client (gradio_client, in its own thread) sends its
requests one after another; every request must end in a complete answer or the queue's clear
"busy, try again" refusal. Prints a table and writes JSON: outcomes, latency p50/p95, aggregate
tokens/s, and the server's RSS before, at the peak, and after the load (ratios to the start).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradio_client import Client
from make_tiny_model import build_tiny_model


def run_load(url: str, clients: int, requests: int, max_new_tokens: int, timeout: float) -> list[dict]:
    """Every request's outcome: ok (with tokens), busy, or error (with its message)."""
    outcomes: list[dict] = []
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        client = Client(url, verbose=False)
        for n in range(requests):
            start = time.perf_counter()
            try:
                job = client.submit(
                    message=f"visitor {index}, question {n}", max_new_tokens=max_new_tokens, api_name="/chat"
                )
                final = job.result(timeout=timeout)
                outcome = {
                    "outcome": "ok" if final["done"] and not final["error"] else "error",
                    "tokens": final["n_tokens"] or 0,
                }
            except Exception as error:  # noqa: BLE001 - each refusal is counted, not raised
                # Gradio's queue, or the fair share (fairness.py), saying the server is full.
                busy = any(words in str(error).lower() for words in ("queue is full", "server is busy"))
                outcome = {"outcome": "busy" if busy else "error", "tokens": 0, "message": str(error)[:200]}
            outcome["seconds"] = time.perf_counter() - start
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout * requests + 60
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = sum(thread.is_alive() for thread in threads)
    outcomes += [{"outcome": "hung", "tokens": 0, "seconds": float("nan")}] * hung
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", help="model folder (default: a tiny random Orca-2-shaped model)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument(
        "--timeout", type=float, default=120, help="seconds one request may take before it counts as hung"
    )
    parser.add_argument("--json", default=str(ROOT / "bench" / "load.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        model = args.model or str(build_tiny_model(Path(folder) / "tiny"))
        port = 7800 + os.getpid() % 100
        url = f"http://127.0.0.1:{port}/"
        server = subprocess.Popen(
            [
                sys.executable,
                "app.py",
                "--model",
                model,
                "--port",
                str(port),
                "--concurrency",
                str(args.concurrency),
                "--max-queue",
                str(args.max_queue),
                # Each client is its own visitor; all are on loopback, so the per-address limit is lifted.
                "--address-limit",
                "64",
                "--log-level",
                "WARNING",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(600):
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            process = psutil.Process(server.pid)
            Client(url, verbose=False).predict(message="warm-up", max_new_tokens=4, api_name="/chat")
            rss_start = process.memory_info().rss
            peak = [rss_start]
            sampling = threading.Event()

            def sample_rss():
                while not sampling.wait(0.1):
                    peak.append(process.memory_info().rss)

            sampler = threading.Thread(target=sample_rss, daemon=True)
            sampler.start()
            started = time.perf_counter()
            outcomes = run_load(url, args.clients, args.requests, args.max_new_tokens, args.timeout)
            wall = time.perf_counter() - started
            sampling.set()
            time.sleep(2)  # let the server settle
            rss_after = process.memory_info().rss
        finally:
            server.terminate()
            server.wait(timeout=30)

    counts = Counter(o["outcome"] for o in outcomes)
    ok_latency = sorted(o["seconds"] for o in outcomes if o["outcome"] == "ok")
    tokens = sum(o["tokens"] for o in outcomes)
    mib = 2**20
    result = {
        "clients": args.clients,
        "requests_per_client": args.requests,
        "outcomes": dict(counts),
        "lost": args.clients * args.requests - len(outcomes),
        "latency_p50_s": statistics.median(ok_latency) if ok_latency else None,
        "latency_p95_s": ok_latency[int(0.95 * (len(ok_latency) - 1))] if ok_latency else None,
        "aggregate_tokens_per_s": tokens / wall,
        "rss_start_mib": rss_start / mib,
        "rss_peak_mib": max(peak) / mib,
        "rss_after_mib": rss_after / mib,
        "rss_after_vs_start": rss_after / rss_start,
        "errors": [o["message"] for o in outcomes if o["outcome"] == "error"][:5],
    }
    print(f"{args.clients} clients x {args.requests} requests, concurrency {args.concurrency}, queue {args.max_queue}")
    for key, value in result.items():
        print(f"  {key:<24} {value:.2f}" if isinstance(value, float) else f"  {key:<24} {value}")
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
