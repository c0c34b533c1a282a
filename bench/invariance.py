"""Batch invariance, measured: does an answer come out token for token the same in a batch as alone?

    python bench/invariance.py [--models 100m] [--weights fp32,bf16] [--prompts 8] [--new-tokens 32]
                               [--sizes 2,4,8] [--json bench/invariance.json]

Each of N prompts of varied lengths is answered on the single path (model.generate: what an answer
without batching, or a replay, runs), then through the batch alone (a batch of 1) and in batches of
2, 4 and 8 beside varied neighbours (other prompts, greedy and sampled, longer and shorter answers).
Greedy answers and seeded sampled ones (gumbel-v1) are both measured. For each batch size it reports
how many of the N answers differ from the single path's, and where the first difference falls (the
token's index in the answer). A kernel that reduces in another order at another batch size shows here:
our replay promise holds exactly where this reads 0. `bench/speed.py --gpu` runs the same check on
the GPU's models.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from make_tiny_model import SIZES, build_tiny_model

from orca2_space.backends.local.batching import BatchingSettings
from orca2_space.backends.local.engine import Engine
from orca2_space.prompt import Prompt
from orca2_space.settings import GenerationParams

SYSTEM = "You are Orca, an AI language model created by Microsoft. You are a cautious assistant."
QUESTIONS = [
    "Hi.",
    "What is 2 + 2?",
    "Name three colours of the rainbow.",
    "How can you determine if a restaurant is popular among locals or mainly attracts tourists?",
    "Why is the sky blue? Explain it to a ten-year-old, step by step, with an everyday comparison.",
    "Summarise the plot of a story in which a lighthouse keeper finds a message in a bottle.",
    "List the steps to make a cup of tea, and say which step people most often get wrong and why.",
    "Is the comment obscene? Options: Yes, No. Comment: what a lovely day for a walk in the park.",
]


def answer_ids(engine: Engine, ids: list[int], params: GenerationParams) -> list[int]:
    answer = engine.generate(Prompt("", ids), params)
    "".join(answer)
    return list(answer.token_ids or [])


def settings_of(kind: str, index: int, new_tokens: int) -> GenerationParams:
    if kind == "greedy":
        return GenerationParams(max_new_tokens=new_tokens)
    return GenerationParams(max_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_p=0.95, seed=index)


def neighbour_settings(j: int, new_tokens: int) -> GenerationParams:
    """Every other neighbour samples; their answers are longer or shorter than the measured one's."""
    length = (new_tokens * 2, max(1, new_tokens // 2), new_tokens + 7)[j % 3]
    if j % 2:
        return GenerationParams(max_new_tokens=length, do_sample=True, seed=100 + j, top_k=20)
    return GenerationParams(max_new_tokens=length)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def check(single: Engine, batched: Engine, n_prompts: int, new_tokens: int, sizes: tuple[int, ...]) -> dict:
    """kind -> batch size -> where each prompt's batched answer first differs from its single path's
    (None: the same). The batched engine must take max(sizes) answers at once."""
    prompts = [
        single.tokenizer.build(
            SYSTEM, [], QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS)), max_new_tokens=new_tokens
        )
        for i in range(n_prompts)
    ]
    found: dict[str, dict[int, list[int | None]]] = {}
    for kind in ("greedy", "sampled"):
        reference = [answer_ids(single, p.input_ids, settings_of(kind, i, new_tokens)) for i, p in enumerate(prompts)]
        found[kind] = {}
        for size in (1, *sizes):
            firsts = []
            for i, prompt in enumerate(prompts):
                # All submitted before any is read: they join the batch together.
                measured = batched.generate(prompt, settings_of(kind, i, new_tokens))
                others = [
                    batched.generate(prompts[(i + j) % n_prompts], neighbour_settings(j, new_tokens))
                    for j in range(1, size)
                ]
                for answer in (measured, *others):
                    "".join(answer)
                firsts.append(first_difference(list(measured.token_ids or []), reference[i]))
            found[kind][size] = firsts
    return found


def table(title: str, found: dict) -> str:
    sizes = list(next(iter(found.values())))
    lines = [
        f"### {title}",
        "",
        "| answers | " + " | ".join(f"batch of {s}" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for kind, by_size in found.items():
        cells = []
        for size in sizes:
            firsts = by_size[size]
            differing = sorted(f for f in firsts if f is not None)
            where = f" (first at token {', '.join(map(str, differing))})" if differing else ""
            cells.append(f"{len(differing)}/{len(firsts)} differ{where}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(found: dict) -> dict:
    """Per kind and batch size: how many answers differ, and the median first difference."""
    out = {}
    for kind, by_size in found.items():
        for size, firsts in by_size.items():
            differing = [f for f in firsts if f is not None]
            median = statistics.median(differing) if differing else None
            out[f"{kind}, {size}"] = {"differ": len(differing), "of": len(firsts), "median_first": median}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="100m", help="tiny, 100m, hub ids or folders, comma-separated")
    parser.add_argument("--weights", default="fp32,bf16", help="weights formats, comma-separated")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sizes", default="2,4,8", help="batch sizes beside the batch of 1, comma-separated")
    parser.add_argument("--json", default=str(ROOT / "bench" / "invariance.json"))
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    command = "python bench/invariance.py " + " ".join(sys.argv[1:])
    print(f"{time.strftime('%Y-%m-%d')} · {command} · {os.cpu_count()} CPUs · torch {torch.__version__}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            folder = str(build_tiny_model(Path(workdir) / name, size=name)) if name in SIZES else name
            for weights in args.weights.split(","):
                single = Engine.load(folder, weights)
                batching = BatchingSettings(max_concurrent=max(sizes), cache_tokens=8192)
                batched = Engine(single.model, single.tokenizer, single.info, batching)
                try:
                    found = check(single, batched, args.prompts, args.new_tokens, sizes)
                finally:
                    batched.close()
                info = single.info
                print(table(f"{name} ({info.quantization}, {info.device})", found), "\n", flush=True)
                results.append({"model": name, "weights": info.quantization, "device": info.device, **summary(found)})
    Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "command": command, "results": results}))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
