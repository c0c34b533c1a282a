"""Start time and memory of `python app.py`: a local model, against the torch-free front end of an
inference server (--backend inference-server), the runs interleaved, medians printed.

    python tests/make_tiny_model.py /tmp/tiny-orca2
    python bench/startup.py --model /tmp/tiny-orca2 [--runs 3] [--remote-python /path/to/venv/bin/python]

For each run: seconds from the process's start to the page answering HTTP 200 (the page comes up
before a local model has loaded), seconds to the first /chat answer (8 tokens, through
gradio_client), and the process's RSS after that answer. The front end streams from
tests/openai_stub.py; it runs where torch, transformers, accelerate and bitsandbytes can't be
imported (hidden as in tests/test_torch_free.py) and, with --remote-python, also under that
interpreter, e.g. a virtual environment with only requirements-remote.txt installed. Measurements,
not assertions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradio_client import Client
from openai_stub import OpenAIStub, Script
from support import environment_without, free_port

PAGE_SECONDS = 180  # the longest any start may take before the run counts as failed
ANSWER_SECONDS = 120


@dataclass(frozen=True)
class Start:
    page: float  # seconds from the process's start to the page's first HTTP 200
    answer: float  # seconds from the process's start to the first complete /chat answer
    rss_mib: float  # the app's resident memory after that answer


def measure(python: str, args: list[str], env: dict[str, str], log: Path) -> Start:
    """Start the app, time the page and a first answer, read its memory, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [python, "app.py", *args, "--port", str(port)]
    with open(log, "w") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        try:
            page = wait_for_page(url, process, log) - started
            job = Client(url, verbose=False).submit(message="Hi", max_new_tokens=8, api_name="/chat")
            final = job.result(timeout=ANSWER_SECONDS)
            answer = time.perf_counter() - started
            if not final["done"] or final["error"]:
                raise RuntimeError(f"the first answer failed: {final}")
            rss = psutil.Process(process.pid).memory_info().rss / 2**20
        finally:
            process.terminate()
            process.wait(timeout=30)
    return Start(page, answer, rss)


def wait_for_page(url: str, process: subprocess.Popen, log: Path) -> float:
    """The moment the page first answered 200; polled every 20 ms."""
    deadline = time.monotonic() + PAGE_SECONDS
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter()
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"the app did not come up at {url}:\n{log.read_text()[-2000:]}")


def table(results: dict[str, list[Start]]) -> str:
    lines = [
        f"{'app':<44} {'page up (s)':>12} {'first answer (s)':>17} {'RSS (MiB)':>10}",
        "-" * 86,
    ]
    for name, starts in results.items():
        page, answer, rss = (
            statistics.median(getattr(s, field) for s in starts) for field in ("page", "answer", "rss_mib")
        )
        lines.append(f"{name:<44} {page:>12.2f} {answer:>17.2f} {rss:>10.0f}")
    runs = len(next(iter(results.values())))
    lines.append(f"medians of {runs} interleaved runs; Python {sys.version.split()[0]}, {os.cpu_count()} CPU cores")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a local model folder (python tests/make_tiny_model.py DIR)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--remote-python", help="also time the front end under this interpreter (e.g. a venv's)")
    args = p.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="orca2-startup-"))
    with OpenAIStub(Script()) as stub:
        remote = ["--backend", "inference-server", "--base-url", stub.base_url, "--model", args.model]
        apps = {
            f"local ({Path(args.model).name})": (sys.executable, ["--model", args.model], {}),
            "--backend inference-server, torch hidden": (sys.executable, remote, environment_without(logs / "site")),
        }
        if args.remote_python:
            apps["--backend inference-server, --remote-python"] = (args.remote_python, remote, {})
        results: dict[str, list[Start]] = {name: [] for name in apps}
        for run in range(1, args.runs + 1):
            for n, (name, (python, app_args, env)) in enumerate(apps.items()):
                results[name].append(measure(python, app_args, env, logs / f"run{run}-app{n}.log"))
                print(f"run {run}: {name}: {results[name][-1]}", file=sys.stderr)
    print(table(results))


if __name__ == "__main__":
    main()
