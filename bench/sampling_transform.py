"""What a sampled decode step's transform costs, measured against a plain argmax in one run.

    python bench/sampling_transform.py [--rows 1,8] [--vocab 32003] [--repeats 5] [--steps 50]
                                       [--threads N] [--json bench/sampling_transform.json]

Per batch step of R rows of random float32 scores [R, vocab], the typical sampled settings (temperature
0.7, top-k 50, top-p 0.9; every other row with a repetition penalty of 1.1 over a 300-token history),
each row its own seed and position:
- argmax: the greedy step (the baseline);
- gumbel-v1 as first written (tests/support_gumbel_v1.py) then argmax: what issue 22 measured;
- seeded_sampling.next_token_scores then argmax: the package's transform now;
- the batch's hook (batch_sampling's prepare_tensor_args and __call__ on R scheduled requests) then argmax;
- the first version's parts, each alone, to show where its time goes.
Every figure is the median over --repeats rounds (each round runs every measurement for --steps steps,
in a rotated order), in ms per step, with its spread (min-max) and its ratio to the baseline of the
same round. Each round also checks that both versions choose the same tokens. --threads sets torch's
threads (default: its own): on a machine others share, 1 keeps their load from stalling torch's
parallel loops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import support_gumbel_v1 as first
import torch
from transformers.generation.continuous_batching.requests import RequestState

from orca2_space.backends.local import batch_sampling
from orca2_space.backends.local.seeded_sampling import next_token_scores
from orca2_space.backends.sampling import Sampling

HISTORY = 300
PROMPT = 200  # of the history, the prompt; the rest is the answer so far


def settings_for(rows: int) -> list[Sampling]:
    return [
        Sampling(
            256,
            do_sample=True,
            temperature=0.7,
            top_p=0.9,
            top_k=50,
            repetition_penalty=1.1 if row % 2 else 1.0,
            seed=1000 + row,
        )
        for row in range(rows)
    ]


def inputs(rows: int, vocab: int, step: int):
    generator = torch.Generator().manual_seed(step)
    scores = torch.randn(rows, vocab, generator=generator) * 3
    histories = [torch.randint(0, vocab, (HISTORY,), generator=generator) for _ in range(rows)]
    return scores, histories, [HISTORY - PROMPT + step] * rows


def scheduled(settings: list[Sampling], histories: list[torch.Tensor]) -> list:
    """The batch's view of R requests with a new token: what prepare_tensor_args reads."""
    requests = []
    for sampling, history in zip(settings, histories, strict=True):
        ids = history.tolist()
        state = RequestState(
            request_id=str(len(requests)),
            initial_tokens=ids[:PROMPT],
            logit_processor_kwargs=batch_sampling.request_kwargs(sampling),
        )
        state.generated_tokens.extend(ids[PROMPT:])
        requests.append(SimpleNamespace(state=state))
    return requests


def measurements(rows: int, vocab: int) -> dict[str, Callable[[int], Callable[[], object]]]:
    settings = settings_for(rows)
    hook = batch_sampling._SeededBatchSampler()

    def with_inputs(transform):
        return lambda step: transform(*inputs(rows, vocab, step))

    def batch_step(scores, histories, positions):
        requests = scheduled(settings, histories)
        return lambda: hook(scores, hook.prepare_tensor_args(requests)).argmax(-1)

    def part(name: str):
        def run(scores, histories, positions):
            chosen = settings
            if name == "penalty (per-row loop)":
                return lambda: [first._penalised(s, h, 1.1) for s, h in zip(scores[1::2], histories[1::2])]
            if name == "float + clone":
                return lambda: scores.float().clone()
            if name == "temperature":
                return lambda: first._tempered(scores, chosen)
            if name == "top-k (full sort)":
                return lambda: first._top_k(scores, chosen)
            top_k = first._top_k(first._tempered(scores, chosen), chosen)
            if name == "top-p (full sort, softmax, cumsum)":
                return lambda: first._top_p(top_k, chosen)
            return lambda: first.gumbel_noise([s.seed or 0 for s in chosen], positions, vocab, scores.device)

        return run

    figures: dict[str, Callable] = {
        "argmax (baseline)": lambda s, h, p: lambda: s.argmax(-1),
        "gumbel-v1 as first written": lambda s, h, p: lambda: first.next_token_scores(s, settings, h, p).argmax(-1),
        "next_token_scores now": lambda s, h, p: lambda: next_token_scores(s, settings, h, p).argmax(-1),
        "batch hook now": batch_step,
    }
    for name in (
        "float + clone",
        "penalty (per-row loop)",
        "temperature",
        "top-k (full sort)",
        "top-p (full sort, softmax, cumsum)",
        "noise (hash, double log, rows x vocab)",
    ):
        figures[f"  first version's {name}"] = part(name)
    return {name: with_inputs(prepare) for name, prepare in figures.items()}


def timed(prepare: Callable[[int], Callable[[], object]], steps: int) -> float:
    """ms per step, the inputs made before the clock starts."""
    calls = [prepare(step) for step in range(steps)]
    start = time.perf_counter()
    for call in calls:
        call()
    return (time.perf_counter() - start) / steps * 1000


def same_choices(rows: int, vocab: int, steps: int) -> bool:
    settings = settings_for(rows)
    for step in range(steps):
        scores, histories, positions = inputs(rows, vocab, step)
        ours = next_token_scores(scores, settings, histories, positions)
        theirs = first.next_token_scores(scores, settings, histories, positions)
        if not torch.equal(ours.argmax(-1), theirs.argmax(-1)) or not torch.equal(ours.isfinite(), theirs.isfinite()):
            return False
    return True


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--vocab", type=int, default=32003)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, help="torch's threads (default: its own)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "sampling_transform.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python bench/sampling_transform.py " + " ".join(sys.argv[1:])
    print(
        f"{time.strftime('%Y-%m-%d')} · {command} · {os.cpu_count()} CPUs · {torch.get_num_threads()} torch threads"
        f" · torch {torch.__version__}",
        flush=True,
    )
    results = {}
    for rows in (int(r) for r in args.rows.split(",")):
        named = measurements(rows, args.vocab)
        names = list(named)
        for name in names:  # warm-up
            timed(named[name], 3)
        rounds: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.repeats):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                rounds[name].append(timed(named[name], args.steps))
        same = same_choices(rows, args.vocab, args.steps)
        base = rounds[names[0]]
        print(f"\n{rows} row(s) × {args.vocab} · same tokens and kept sets as the first version: {same}")
        print(f"{'':<56}{'ms per step':>22}{'× argmax':>20}")
        for name in names:
            ratios = [value / b for value, b in zip(rounds[name], base, strict=True)]
            print(f"{name:<56}{spread(rounds[name], 3):>22}{spread(ratios, 1):>20}")
        results[rows] = {
            "same_choices": same,
            "ms_per_step": {n: statistics.median(v) for n, v in rounds.items()},
        }
    Path(args.json).write_text(json.dumps({"command": command, "results": results}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
