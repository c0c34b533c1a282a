"""How fast answers stream, alone and in a crowd, measured against raw `model.generate` in one run.

    python bench/speed.py [--models tiny,100m | --models microsoft/Orca-2-7b] [--new-tokens 64]
                          [--json bench/speed.json]

For each model, on this machine's device, greedy, the same prompt:
- tokens/s and time to first token of raw model.generate (the baseline), of the app's engine (alone,
  and through the batch), and end to end through gradio_client against the launched app;
- Stop latency: from cancel() to the end of the model's last forward pass, and the steps after it;
- aggregate tokens/s and p50/p95 time to first token with 1, 4, 8 and 16 concurrent chats through
  gradio_client, batched (the default) and one at a time (--batching off);
- the process's peak RSS.
Ratios are against the baseline measured here, in this run. "tiny" and "100m" are random-weight
Orca-2-shaped models (tests/make_tiny_model.py) built on the fly; a hub id or a folder also works.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from conftest import free_port
from gradio_client import Client
from make_tiny_model import SIZES, build_tiny_model
from transformers.generation.streamers import BaseStreamer

from orca2_space.chat import Chat
from orca2_space.cli import launch
from orca2_space.engine import Engine, _generation_config
from orca2_space.prompt import Prompt
from orca2_space.settings import BatchingSettings, GenerationParams, Settings

QUESTION = "How can you determine if a restaurant is popular among locals or mainly attracts tourists?"
SYSTEM = "You are Orca, an AI language model created by Microsoft. You are a cautious assistant."
REPEATS = 3
CROWDS = (1, 4, 8, 16)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def rate(n_tokens: int, first: float, last: float) -> float:
    """Decode speed: tokens after the first, over the time after the first."""
    return (n_tokens - 1) / (last - first) if n_tokens > 1 and last > first else 0.0


def median_run(run) -> dict:
    runs = [run() for _ in range(REPEATS)]
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


class _Clock(BaseStreamer):
    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def raw_generate(engine: Engine, ids: list[int], params: GenerationParams) -> dict:
    """The model card's plain call: the baseline."""
    clock = _Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        tensor = torch.tensor([ids], device=engine.model.device)
        engine.model.generate(
            input_ids=tensor,
            attention_mask=torch.ones_like(tensor),
            generation_config=_generation_config(params),
            streamer=clock,
        )
    tokens = clock.times[1:]  # the first put is the prompt
    return {
        "tokens_per_s": rate(len(tokens), tokens[0], tokens[-1]),
        "ttft_s": tokens[0] - start,
        "tokens": len(tokens),
    }


def engine_stream(engine: Engine, ids: list[int], params: GenerationParams) -> dict:
    start = time.perf_counter()
    generation = engine.generate(Prompt("", ids), params)
    times = [time.perf_counter() for _ in generation]
    n = generation.stats.n_tokens
    return {"tokens_per_s": rate(n, times[0], times[-1]), "ttft_s": times[0] - start, "tokens": n}


def client_stream(client: Client, params: GenerationParams) -> dict:
    start = time.perf_counter()
    job = client.submit(message=QUESTION, system_message=SYSTEM, max_new_tokens=params.max_new_tokens, api_name="/chat")
    first = None
    for update in job:
        if first is None and update["answer"]:
            first = time.perf_counter()
    last = time.perf_counter()
    final = job.outputs()[-1]
    return {"tokens_per_s": rate(final["n_tokens"], first, last), "ttft_s": first - start, "tokens": final["n_tokens"]}


def stop_latency(engine: Engine, ids: list[int]) -> dict:
    """From cancel() to the end of the model's last forward pass (timed by a forward hook)."""
    forward_ends: list[float] = []
    hook = engine.model.register_forward_hook(lambda *args: forward_ends.append(time.perf_counter()))
    try:
        generation = engine.generate(Prompt("", ids), GenerationParams(max_new_tokens=4000 - len(ids)))
        for n, _ in enumerate(generation, 1):
            if n == 20:
                cancelled = time.perf_counter()
                generation.cancel()
        generation.wait(30)
    finally:
        hook.remove()
    after = [t for t in forward_ends if t > cancelled]
    return {"stop_latency_s": (after[-1] - cancelled) if after else 0.0, "steps_after_cancel": len(after)}


def crowd(stream, clients: int) -> dict:
    """`clients` chats at once, each running stream() -> its result."""
    results: list[dict] = []
    lock = threading.Lock()

    def chat(index: int) -> None:
        result = stream()
        with lock:
            results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=chat, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    ttfts = sorted(r["ttft_s"] for r in results)
    return {
        "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "all_streamed": all(r["tokens_per_s"] > 0 for r in results),
    }


def bench_model(name: str, workdir: Path, new_tokens: int) -> dict:
    folder = str(build_tiny_model(workdir / name, size=name)) if name in SIZES else name
    single = Engine.load(folder)
    batched = Engine(single.model, single.tokenizer, single.info, BatchingSettings(max_concurrent=8, cache_tokens=8192))
    ids = single.tokenizer.build(SYSTEM, [], QUESTION, max_new_tokens=new_tokens).input_ids
    params = GenerationParams(max_new_tokens=new_tokens)
    engine_stream(single, ids, params), engine_stream(batched, ids, params)  # warm-up
    result = {
        "model": name,
        "device": single.info.device,
        "weights": single.info.quantization,
        "prompt_tokens": len(ids),
        "raw_generate": median_run(lambda: raw_generate(single, ids, params)),
        "engine": median_run(lambda: engine_stream(single, ids, params)),
        "engine_batched": median_run(lambda: engine_stream(batched, ids, params)),
    }
    result["stop"] = {"engine": stop_latency(single, ids), "engine_batched": stop_latency(batched, ids)}
    apps = {}
    for label, engine in (("batched", batched), ("one_at_a_time", single)):
        # Every crowd member is its own visitor; all are on loopback, so the per-address limit is lifted.
        settings = Settings(
            model=name, port=free_port(), concurrency=8, max_queue=64, max_new_tokens_cap=new_tokens, address_limit=64
        )
        apps[label] = launch(Chat(engine, settings), block=False)
    client = Client(apps["batched"].local_url, verbose=False)
    client_stream(client, params)  # warm-up
    result["end_to_end"] = median_run(lambda: client_stream(client, params))
    result["crowds"] = {
        label: {
            str(n): crowd(lambda url=app.local_url: client_stream(Client(url, verbose=False), params), n)
            for n in CROWDS
        }
        for label, app in apps.items()
    }
    # The same crowds straight on the engine: what the batch gives before Gradio's share of the CPU.
    result["crowds"]["engine_batched"] = {str(n): crowd(lambda: engine_stream(batched, ids, params), n) for n in CROWDS}
    for app in apps.values():
        app.close()
    batched.close()
    result["peak_rss_gib"] = peak_rss_gib()
    return result


def table(result: dict) -> str:
    base = result["raw_generate"]["tokens_per_s"]
    rows = [f"{result['model']} ({result['weights']}, {result['device']}, prompt {result['prompt_tokens']} tokens)"]
    rows.append(f"  {'path':<28}{'tokens/s':>10}{'× raw':>8}{'TTFT ms':>10}")
    for key, label in (
        ("raw_generate", "raw model.generate"),
        ("engine", "engine, alone"),
        ("engine_batched", "engine, batch of 1"),
        ("end_to_end", "gradio_client → app"),
    ):
        r = result[key]
        rows.append(
            f"  {label:<28}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / base:>8.2f}{r['ttft_s'] * 1000:>10.0f}"
        )
    for key, r in result["stop"].items():
        rows.append(
            f"  Stop, {key:<22} {r['stop_latency_s'] * 1000:.0f} ms after cancel, {r['steps_after_cancel']} forward step(s)"
        )
    rows.append(f"  {'N chats at once':<28}{'tokens/s':>10}{'× 1 chat':>10}{'TTFT p50':>10}{'p95 ms':>8}")
    for label, crowds in result["crowds"].items():
        one = crowds["1"]["aggregate_tokens_per_s"]
        label = {"batched": "app, batched", "one_at_a_time": "app, one at a time", "engine_batched": "engine, batched"}[
            label
        ]
        for n, r in crowds.items():
            row = f"  {label + ', ' + n:<28}{r['aggregate_tokens_per_s']:>10.1f}{r['aggregate_tokens_per_s'] / one:>10.2f}"
            rows.append(row + f"{r['ttft_p50_s'] * 1000:>10.0f}{r['ttft_p95_s'] * 1000:>8.0f}")
    rows.append(f"  peak RSS {result['peak_rss_gib']:.2f} GiB")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,100m", help="tiny, 100m, hub ids or folders, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", default=str(ROOT / "bench" / "speed.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            results.append(bench_model(name.strip(), Path(workdir), args.new_tokens))
            print(table(results[-1]), flush=True)
    Path(args.json).write_text(
        json.dumps({"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "results": results}, indent=2)
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
