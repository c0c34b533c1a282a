"""How fast answers stream, alone and in a crowd, measured against raw `model.generate` in one run.

    python bench/speed.py [--models tiny,100m | --models microsoft/Orca-2-7b] [--weights auto | 8bit,bf16]
                          [--new-tokens 64] [--repeats 3] [--crowds 1,8] [--json bench/speed.json]
    python bench/speed.py --gpu        # on a CUDA machine: 100m in 8-bit and bf16, and Orca-2-7b if cached,
                                       # and bench/invariance.py's check on each

For each model and weights format, on this machine's device, greedy, the same prompt:
- tokens/s and time to first token of raw model.generate (the baseline), of the app's engine (alone,
  and through the batch), and end to end through gradio_client against the launched app;
- Stop latency: from cancel() to the end of the model's last forward pass, and the steps after it;
- aggregate tokens/s and p50/p95 time to first token with N concurrent chats (--crowds), through
  gradio_client to the app (batched, greedy and sampled, and one at a time with --batching off) and
  straight on the batched engine: what the web layer costs is the app's figure over the engine's.
  The clients run in a process of their own (bench/clients.py), so their work is not the server's;
- the process's peak RSS.
Every figure is measured --repeats times, interleaved (each round runs every measurement once, in a
rotated order), and reported as the median with its spread (min-max). Ratios are against the
baseline measured here, in this run. "tiny" and "100m" are random-weight Orca-2-shaped models
(tests/make_tiny_model.py) built on the fly; a hub id or a folder also works.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import invariance
import torch
from clients import QUESTION, SYSTEM, client_stream, crowd, rate
from gradio_client import Client
from make_tiny_model import SIZES, build_tiny_model
from support import free_port
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from orca2_space.backends.local.batching import BatchingSettings
from orca2_space.backends.local.engine import Engine
from orca2_space.backends.sampling import Sampling
from orca2_space.chat import Chat
from orca2_space.cli import launch
from orca2_space.prompt import Prompt
from orca2_space.settings import GenerationParams, Settings

# A sampled chat's settings; each chat draws its own seed.
SAMPLED = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=50)
# A hub model is benched on a GPU only when its weights are already in the cache (nothing downloads).
GPU_MODELS = ("100m", "microsoft/Orca-2-7b")
GPU_WEIGHTS = ("8bit", "bf16")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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
            generation_config=GenerationConfig(**Sampling.of(params).transformers_config()),
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


def app_crowd(url: str, n: int, params: dict) -> dict:
    """n visitors at once, each its own gradio_client, in a process of their own (bench/clients.py),
    connected before the clock starts."""
    command = [sys.executable, str(ROOT / "bench" / "clients.py"), url, str(n), json.dumps(params)]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as clients:
        assert clients.stdin is not None and clients.stdout is not None
        if clients.stdout.readline().strip() != "ready":
            raise RuntimeError("bench/clients.py did not connect its clients")
        clients.stdin.write("go\n")
        clients.stdin.flush()
        return json.loads(clients.stdout.readline())


class Bench:
    """One model in one weights format: its engines and launched apps, and every run's figures."""

    def __init__(self, name: str, weights: str, workdir: Path, new_tokens: int):
        folder = str(build_tiny_model(workdir / name, size=name)) if name in SIZES else name
        self.single = Engine.load(folder, weights)
        model, tokenizer, info = self.single.model, self.single.tokenizer, self.single.info
        self.batched = Engine(model, tokenizer, info, BatchingSettings(max_concurrent=8, cache_tokens=8192))
        self.ids = tokenizer.build(SYSTEM, [], QUESTION, max_new_tokens=new_tokens).input_ids
        self.params = GenerationParams(max_new_tokens=new_tokens)
        self.name = name
        self.apps = {}
        for label, engine in (("app", self.batched), ("app_one_at_a_time", self.single)):
            # Every crowd member is its own visitor; all are on loopback, so the per-address limit is lifted.
            settings = Settings(
                model=name,
                port=free_port(),
                concurrency=8,
                max_queue=64,
                max_new_tokens_cap=new_tokens,
                address_limit=64,
            )
            self.apps[label] = launch(Chat(engine, settings), block=False)
        self.runs: dict[str, list[dict]] = {}

    def measurements(self, crowds: tuple[int, ...]) -> dict:
        """name -> a function that measures it once."""
        ids, params = self.ids, self.params
        url = self.apps["app"].local_url
        found = {
            "raw_generate": lambda: raw_generate(self.single, ids, params),
            "engine": lambda: engine_stream(self.single, ids, params),
            "engine_batched": lambda: engine_stream(self.batched, ids, params),
            "end_to_end": lambda: client_stream(Client(url, verbose=False), {"max_new_tokens": params.max_new_tokens}),
        }
        greedy, sampled = (
            {"max_new_tokens": params.max_new_tokens},
            {"max_new_tokens": params.max_new_tokens, **SAMPLED},
        )
        for n in crowds:
            for label, app in self.apps.items():
                found[f"{label}, {n}"] = lambda url=app.local_url, n=n: app_crowd(url, n, greedy)
            found[f"app_sampled, {n}"] = lambda n=n: app_crowd(url, n, sampled)
            found[f"engine_batched, {n}"] = lambda n=n: crowd([lambda: engine_stream(self.batched, ids, params)] * n)
        return found

    def run(self, repeats: int, crowds: tuple[int, ...]) -> None:
        measure = self.measurements(crowds)
        for run in (measure["engine"], measure["engine_batched"], measure["end_to_end"]):
            run()  # warm-up
        names = list(measure)
        for round_ in range(repeats):
            shift = round_ * len(names) // repeats
            for name in names[shift:] + names[:shift]:
                self.runs.setdefault(name, []).append(measure[name]())

    def result(self) -> dict:
        info = self.single.info
        result = {
            "model": self.name,
            "device": info.device,
            "weights": info.quantization,
            "prompt_tokens": len(self.ids),
            "runs": self.runs,
            "stop": {
                "engine": stop_latency(self.single, self.ids),
                "engine_batched": stop_latency(self.batched, self.ids),
            },
        }
        for app in self.apps.values():
            app.close()
        self.batched.close()
        result["peak_rss_gib"] = peak_rss_gib()
        return result


def spread(runs: list[dict], key: str, scale: float = 1.0) -> tuple[float, float, float]:
    """Median, min and max of one figure over the runs."""
    values = [r[key] * scale for r in runs]
    return statistics.median(values), min(values), max(values)


def shown(figure: tuple[float, float, float], digits: int = 1) -> str:
    median, low, high = figure
    return f"{median:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def ratio(runs: list[dict], base: list[dict], key: str) -> tuple[float, float, float]:
    """The median of the round-by-round ratios, and their spread (each round measured both)."""
    values = [r[key] / b[key] if b[key] else 0.0 for r, b in zip(runs, base)]
    return statistics.median(values), min(values), max(values)


def table(result: dict) -> str:
    runs = result["runs"]
    base = runs["raw_generate"]
    lines = [
        f"### {result['model']} ({result['weights']}, {result['device']}, prompt {result['prompt_tokens']} tokens)",
        "",
        "| path | tokens/s | × raw | first token, ms |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("raw_generate", "raw model.generate"),
        ("engine", "engine, alone"),
        ("engine_batched", "engine, batch of 1"),
        ("end_to_end", "gradio_client → app"),
    ):
        r = runs[key]
        speed, vs_raw, ttft = spread(r, "tokens_per_s"), ratio(r, base, "tokens_per_s"), spread(r, "ttft_s", 1000)
        lines.append(f"| {label} | {shown(speed)} | {shown(vs_raw, 2)} | {shown(ttft, 0)} |")
    for key, r in result["stop"].items():
        stop = f"{r['stop_latency_s'] * 1000:.0f} ms after cancel, {r['steps_after_cancel']} forward step(s)"
        lines.append(f"| Stop, {key} | {stop} | | |")
    lines += [
        "",
        "| N chats at once | tokens/s | × 1 chat | app ÷ engine | first token p50 / p95, ms |",
        "|---|---|---|---|---|",
    ]
    crowds = sorted({int(k.split(", ")[1]) for k in runs if ", " in k})
    for label, words in (
        ("engine_batched", "engine, batched"),
        ("app", "app, batched"),
        ("app_sampled", "app, batched, sampled"),
        ("app_one_at_a_time", "app, one at a time"),
    ):
        for n in crowds:
            r, one = runs[f"{label}, {n}"], runs[f"{label}, {crowds[0]}"]
            vs_engine = (
                shown(ratio(r, runs[f"engine_batched, {n}"], "aggregate_tokens_per_s"), 2) if label == "app" else ""
            )
            ttft = f"{spread(r, 'ttft_p50_s', 1000)[0]:.0f} / {spread(r, 'ttft_p95_s', 1000)[0]:.0f}"
            lines.append(
                f"| {words}, {n} | {shown(spread(r, 'aggregate_tokens_per_s'))} "
                f"| {shown(ratio(r, one, 'aggregate_tokens_per_s'), 2)} | {vs_engine} | {ttft} |"
            )
    for n in crowds[1:]:
        p95 = ratio(runs[f"app_sampled, {n}"], runs[f"app, {n}"], "ttft_p95_s")
        lines.append(f"\nfirst token p95 at {n} chats, sampled ÷ greedy: {shown(p95, 2)}")
    lines.append(f"\npeak RSS {result['peak_rss_gib']:.2f} GiB")
    return "\n".join(lines)


def cached(name: str) -> bool:
    """Whether a hub model's weights are in the local cache (a GPU bench never downloads)."""
    if name in SIZES or os.path.isdir(name):
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,100m", help="tiny, 100m, hub ids or folders, comma-separated")
    parser.add_argument(
        "--weights", default="auto", help="weights formats (auto, fp32, bf16, 8bit, 4bit), comma-separated"
    )
    parser.add_argument(
        "--gpu", action="store_true", help=f"models {','.join(GPU_MODELS)} (if cached) as {','.join(GPU_WEIGHTS)}"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--crowds", default="1,8", help="numbers of chats at once, comma-separated; the first is the baseline"
    )
    parser.add_argument(
        "--invariance", action="store_true", help="also bench/invariance.py's check on each model (on with --gpu)"
    )
    parser.add_argument("--json", default=str(ROOT / "bench" / "speed.json"))
    args = parser.parse_args()
    models, weights = args.models.split(","), args.weights.split(",")
    if args.gpu:
        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA GPU")
        models, weights = [m for m in GPU_MODELS if cached(m)], list(GPU_WEIGHTS)
    crowds = tuple(int(n) for n in args.crowds.split(","))
    command = "python bench/speed.py " + " ".join(sys.argv[1:])
    print(f"{time.strftime('%Y-%m-%d')} · {command} · {os.cpu_count()} CPUs · torch {torch.__version__}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            for fmt in weights:
                bench = Bench(name.strip(), fmt, Path(workdir), args.new_tokens)
                bench.run(args.repeats, crowds)
                found = None
                if args.gpu or args.invariance:
                    found = invariance.check(bench.single, bench.batched, 8, args.new_tokens, (2, 4, 8))
                results.append(bench.result())
                print(table(results[-1]), "\n", flush=True)
                if found is not None:
                    results[-1]["invariance"] = invariance.summary(found)
                    print(invariance.table("batch invariance (bench/invariance.py)", found), "\n", flush=True)
    facts = {"date": time.strftime("%Y-%m-%d"), "command": command, "cpus": os.cpu_count()}
    Path(args.json).write_text(
        json.dumps({**facts, "torch_threads": torch.get_num_threads(), "results": results}, indent=2)
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
