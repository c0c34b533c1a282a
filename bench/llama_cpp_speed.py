"""The llama.cpp backend against the transformers engine, on the same weights, on this machine.

    python bench/llama_cpp_speed.py [--models tiny,100m] [--types f32,q8_0] [--new-tokens 200] [--rounds 3]
                              [--threads N] [--json bench/llama_cpp_speed.json]

For each model (random-weight Orca-2-shaped models of tests/make_tiny_model.py, built on the fly, and
written as GGUF by tests/make_tiny_gguf.py), greedy, the model card's first reference prompt:
- decode tokens/s and time to first token of one answer, alone: the transformers engine
  (--backend local, fp32) and llama.cpp on each GGUF type;
- Stop latency: the tokens written after cancel(), and the milliseconds until the work ended;
- each process's resident memory (RSS) with the model loaded and after answering, and its peak.
Each process answers once before the rounds, so that one-time costs are not measured.
Each configuration runs in its own process (so that its memory is its own), loaded once; every round
asks each one for an answer in turn, in a rotated order, and each figure is the median over the rounds
with its spread (min-max). The ratio is llama.cpp's decode speed over the engine's in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REFERENCE = json.loads((ROOT / "tests" / "fixtures" / "orca2_reference_ids.json").read_text())["cases"][0]
STOP_AFTER_PIECES = 5


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def load(kind: str, model_dir: str, gguf: str | None, threads: int | None):
    if kind == "transformers":
        from orca2_space.backends.local.engine import Engine

        return Engine.load(model_dir, "fp32")
    from orca2_space.backends.llama_cpp import LlamaCpp
    from orca2_space.settings import LlamaCppSettings

    return LlamaCpp.load(model_dir, LlamaCppSettings(gguf=str(gguf), gguf_threads=threads))


def one_answer(backend, new_tokens: int) -> dict:
    from orca2_space.prompt import Prompt
    from orca2_space.settings import GenerationParams

    start = time.perf_counter()
    answer = backend.generate(Prompt("", REFERENCE["input_ids"]), GenerationParams(max_new_tokens=new_tokens))
    times = [time.perf_counter() for _ in answer]
    n = answer.stats.n_tokens
    # Pieces arrive together when the reader falls behind: the decode rate is over the tokens, not the pieces.
    decode = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else 0.0
    return {"tokens_per_s": decode, "ttft_s": times[0] - start, "tokens": n}


def stop_latency(backend) -> dict:
    from orca2_space.prompt import Prompt
    from orca2_space.settings import GenerationParams

    answer = backend.generate(Prompt("", REFERENCE["input_ids"]), GenerationParams(max_new_tokens=3000))
    for received, _ in enumerate(answer, 1):
        if received == STOP_AFTER_PIECES:
            cancelled = time.perf_counter()
            answer.cancel()
            answer.wait(60)
            return {
                "tokens_after_stop": answer.stats.tokens_after_cancel,
                "stop_ms": 1000 * (time.perf_counter() - cancelled),
            }
    return {"tokens_after_stop": None, "stop_ms": None}


def worker(kind: str, model_dir: str, gguf: str | None, threads: int | None, new_tokens: int) -> None:
    """One configuration, loaded once: each line on stdin asks for a round, answered with one JSON line."""
    backend = load(kind, model_dir, gguf, threads)
    loaded = rss_mib("VmRSS")
    one_answer(backend, 8)  # a first answer's one-time costs (allocations, lazy imports) are not measured
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        figures = {**one_answer(backend, new_tokens), **stop_latency(backend)}
        figures.update(rss_loaded_mib=loaded, rss_mib=rss_mib("VmRSS"), rss_peak_mib=rss_mib("VmHWM"))
        print(json.dumps(figures), flush=True)


class Worker:
    def __init__(self, name: str, args: list[str]):
        self.name = name
        command = [sys.executable, __file__, "--worker", *args]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.rounds: list[dict] = []
        self._read()

    def _read(self) -> dict:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.name} ended without answering")

    def round(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        self.rounds.append(self._read())

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


def median(rounds: list[dict], key: str) -> dict:
    values = [r[key] for r in rounds if r[key] is not None]
    if not values:
        return {"median": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,100m")
    p.add_argument("--types", default="f32,q8_0", help="GGUF types to write and run")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp's decode threads (default: its own)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, model_dir, gguf, threads, new_tokens = args.worker
        worker(kind, model_dir, gguf if gguf != "-" else None, int(threads) or None, int(new_tokens))
        return

    from make_tiny_gguf import write_gguf
    from make_tiny_model import build_tiny_model

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.models.split(","):
            folder = build_tiny_model(Path(scratch) / size, size=size)
            workers = [Worker("transformers fp32", ["transformers", str(folder), "-", "0", str(args.new_tokens)])]
            for file_type in args.types.split(","):
                gguf = write_gguf(folder, Path(scratch) / f"{size}-{file_type}.gguf", file_type)
                config = ["llama.cpp", str(folder), str(gguf), str(args.threads or 0), str(args.new_tokens)]
                workers.append(Worker(f"llama.cpp {file_type}", config))
            for r in range(args.rounds):
                for w in workers[r % len(workers) :] + workers[: r % len(workers)]:
                    w.round()
            for w in workers:
                w.close()
            base = median(workers[0].rounds, "tokens_per_s")["median"] or 0.0
            results[size] = {
                w.name: {key: median(w.rounds, key) for key in w.rounds[0]}
                | {
                    "decode_vs_transformers": (median(w.rounds, "tokens_per_s")["median"] or 0.0) / base
                    if base
                    else None
                }
                for w in workers
            }
            print_table(size, results[size])
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


def print_table(size: str, rows: dict) -> None:
    print(f"\n{size}: median (min-max) over the rounds")
    print(
        f"{'':20} {'decode tok/s':>22} {'first token ms':>20} {'x engine':>8} {'after Stop':>10} {'RSS MiB':>8} {'peak':>6}"
    )
    for name, row in rows.items():
        tps, ttft = row["tokens_per_s"], row["ttft_s"]
        print(
            f"{name:20} {tps['median']:8.0f} ({tps['min']:.0f}-{tps['max']:.0f}) {'':3}"
            f"{1000 * ttft['median']:8.1f} ({1000 * ttft['min']:.0f}-{1000 * ttft['max']:.0f})"
            f" {row['decode_vs_transformers']:8.2f} {row['tokens_after_stop']['median']!s:>10}"
            f" {row['rss_mib']['median']:8.0f} {row['rss_peak_mib']['median']:6.0f}"
        )


if __name__ == "__main__":
    main()
