"""What the research workbench costs: the compare view and token probabilities, each against a baseline.

    python bench/workbench.py [--models 100m | --models tiny,100m] [--new-tokens 64] [--long-tokens 256]
                              [--repeats 3] [--json bench/workbench.json]

For each model, on this machine's device, greedy, the same question, over the engine as the app
serves it by default (batched: batching_settings(Settings())):
- compare: draining Chat.compare over 4 presets' system messages, against draining Chat.respond for
  one answer (the model card's cautious system message, single turn);
- token probabilities: Engine.score(prompt, answer_ids) of a greedy answer (one forward pass,
  log-softmax, top 5, the tokens' texts), against a plain prefill of the same positions,
  model(input_ids=prompt + answer[:-1]): score_ids feeds exactly those ids (the last answer id
  predicts nothing scored), so both run the transformer over the same number of tokens;
- /chat: decode tokens/s through gradio_client against the launched app, with answer_ids in every
  update (as shipped) and without (ChatUpdate.as_api_dict patched, in this process, to leave them out).
Baseline and candidate alternate within each repeat (their order swaps every repeat), each repeat
gives one paired ratio, and every figure is reported as the median and the min–max over the repeats.
"tiny" and "100m" are random-weight Orca-2-shaped models (tests/make_tiny_model.py) built on the fly;
a hub id or a folder also works.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch
from gradio_client import Client
from make_tiny_model import SIZES, build_tiny_model
from support import free_port

from orca2_space.backends.local.batching import batching_settings
from orca2_space.backends.local.engine import Engine
from orca2_space.chat import Chat, ChatUpdate
from orca2_space.cli import launch
from orca2_space.presets import CAUTIOUS, SYSTEM_PRESETS
from orca2_space.prompt import Prompt
from orca2_space.settings import Settings

QUESTION = "How can you determine if a restaurant is popular among locals or mainly attracts tourists?"
# The first four presets: the cautious default, the paper's empty one, step-by-step, explain-then-answer.
COMPARED_SYSTEMS = list(SYSTEM_PRESETS.values())[:4]


def rate(n_tokens: int, first: float, last: float) -> float:
    """Decode speed: tokens after the first, over the time after the first (as bench/speed.py)."""
    return (n_tokens - 1) / (last - first) if n_tokens > 1 and last > first else 0.0


STARTED = time.perf_counter()


def progress(what: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {what}", file=sys.stderr, flush=True)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def interleaved(baseline: Callable[[], dict], candidate: Callable[[], dict], repeats: int, key: str) -> dict:
    """Baseline and candidate alternately, the order swapped each repeat; `key` is the figure compared
    (a time or a rate), and each repeat's candidate/baseline is one ratio."""
    runs: dict[str, list[dict]] = {"baseline": [], "candidate": []}
    for repeat in range(repeats):
        order = (("baseline", baseline), ("candidate", candidate))
        for label, run in order if repeat % 2 == 0 else order[::-1]:
            runs[label].append(run())
    result = {
        label: {name: spread([r[name] for r in results]) for name in results[0]} for label, results in runs.items()
    }
    ratios = [c[key] / b[key] for b, c in zip(runs["baseline"], runs["candidate"], strict=True)]
    result["ratio"] = spread(ratios)
    return result


def drain_one(chat: Chat, new_tokens: int) -> dict:
    request = chat.request(QUESTION, CAUTIOUS, [], single_turn=True, max_new_tokens=new_tokens)
    start = time.perf_counter()
    for update in chat.respond(request):
        last = update
    return {"seconds": time.perf_counter() - start, "tokens": last.stats.n_tokens}


def drain_compare(chat: Chat, new_tokens: int) -> dict:
    requests = chat.compare_requests(QUESTION, COMPARED_SYSTEMS, max_new_tokens=new_tokens)
    start = time.perf_counter()
    for updates in chat.compare(requests):
        last = updates
    counts = [u.stats.n_tokens for u in last]
    return {"seconds": time.perf_counter() - start, "tokens": sum(counts), "fewest": min(counts), "most": max(counts)}


def greedy_answer(chat: Chat, new_tokens: int) -> tuple[Prompt, list[int], ChatUpdate]:
    """A greedy answer's ids, and the exact prompt it was written for."""
    request = chat.request(QUESTION, CAUTIOUS, [], single_turn=True, max_new_tokens=new_tokens)
    for update in chat.respond(request):
        last = update
    prompt = chat.inspect(QUESTION, CAUTIOUS, [], max_new_tokens=len(last.answer_ids))
    return prompt, list(last.answer_ids), last


def rescoring(engine: Engine, prompt: Prompt, answer_ids: list[int], repeats: int) -> dict:
    positions = prompt.input_ids + answer_ids[:-1]  # what score_ids runs the transformer over

    def prefill(logits_to_keep: int = 0) -> dict:
        start = time.perf_counter()
        with torch.inference_mode():
            tensor = torch.tensor([positions], device=engine.model.device)
            engine.model(input_ids=tensor, logits_to_keep=logits_to_keep)
        return {"seconds": time.perf_counter() - start}

    def score() -> dict:
        start = time.perf_counter()
        tokens = engine.score(prompt, answer_ids)
        assert len(tokens) == len(answer_ids)
        return {"seconds": time.perf_counter() - start}

    prefill(), score()  # warm-up
    result = interleaved(prefill, score, repeats, "seconds")
    # The plain forward runs the output head on every position, the prompt's too; score only on the
    # answer's. Against a prefill whose head covers the answer's positions only, what is left is the
    # log-softmax, the top 5 and the texts.
    result["answer_head"] = interleaved(lambda: prefill(len(answer_ids)), score, repeats, "seconds")
    result |= {"prompt_tokens": len(prompt.input_ids), "answer_tokens": len(answer_ids), "positions": len(positions)}
    return result


def client_stream(client: Client, new_tokens: int) -> dict:
    job = client.submit(
        message=QUESTION, system_message=CAUTIOUS, max_new_tokens=new_tokens, single_turn=True, api_name="/chat"
    )
    first = None
    for update in job:
        if first is None and update["answer"]:
            first = time.perf_counter()
    last = time.perf_counter()
    final = job.outputs()[-1]
    return {
        "tokens_per_s": rate(final["n_tokens"], first, last),
        "tokens": final["n_tokens"],
        "last_update_bytes": len(json.dumps(final)),
    }


def without_answer_ids(update: ChatUpdate) -> dict:
    shown = SHIPPED_AS_API_DICT(update)
    del shown["answer_ids"]
    return shown


SHIPPED_AS_API_DICT = ChatUpdate.as_api_dict


def api_streaming(client: Client, new_tokens: int, repeats: int) -> dict:
    """/chat with answer_ids in every update (the candidate) vs without (the baseline), one server."""

    def shipped() -> dict:
        ChatUpdate.as_api_dict = SHIPPED_AS_API_DICT
        return client_stream(client, new_tokens)

    def stripped() -> dict:
        ChatUpdate.as_api_dict = without_answer_ids
        try:
            return client_stream(client, new_tokens)
        finally:
            ChatUpdate.as_api_dict = SHIPPED_AS_API_DICT

    stripped(), shipped()  # warm-up
    return interleaved(stripped, shipped, repeats, "tokens_per_s")


def bench_model(name: str, workdir: Path, new_tokens: int, long_tokens: int, repeats: int) -> dict:
    folder = str(build_tiny_model(workdir / name, size=name)) if name in SIZES else name
    settings = Settings(model=name, port=free_port(), max_new_tokens_cap=max(new_tokens, long_tokens))
    batching = batching_settings(settings)
    engine = Engine.load(folder, batching=batching)
    chat = Chat(engine, settings)
    result = {
        "model": name,
        "device": engine.info.device,
        "weights": engine.info.quantization,
        "batching": {"max_concurrent": batching.max_concurrent, "cache_tokens": batching.cache_tokens},
    }
    progress(f"{name} loaded; compare vs one answer")
    drain_one(chat, new_tokens), drain_compare(chat, new_tokens)  # warm-up
    result["compare"] = interleaved(
        lambda: drain_one(chat, new_tokens), lambda: drain_compare(chat, new_tokens), repeats, "seconds"
    )
    result["rescoring"] = {}
    for n in dict.fromkeys((new_tokens, long_tokens)):
        progress(f"re-scoring a {n}-token answer")
        prompt, answer_ids, last = greedy_answer(chat, n)
        result["rescoring"][str(n)] = rescoring(engine, prompt, answer_ids, repeats)
        result["rescoring"][str(n)]["stop_reason"] = last.stats.stop_reason.value
    app = launch(chat, block=False)
    try:
        client = Client(app.local_url, verbose=False)
        result["api"] = {}
        for n in dict.fromkeys((new_tokens, long_tokens)):
            progress(f"/chat with and without answer_ids, {n} tokens")
            result["api"][str(n)] = api_streaming(client, n, repeats)
    finally:
        app.close()
        engine.close()
    return result


def _figure(s: dict, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def table(result: dict) -> str:
    batching = result["batching"]
    rows = [
        (
            f"{result['model']} ({result['weights']}, {result['device']}, batched: {batching['max_concurrent']} at once, "
            f"{batching['cache_tokens']}-token cache); median (min–max)"
        ),
        "",
        "| measurement | baseline | workbench | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    c = result["compare"]
    rows.append(
        f"| 4 system messages compared vs one answer, wall s | {_figure(c['baseline']['seconds'])} "
        f"({c['baseline']['tokens']['median']:.0f} tokens) | {_figure(c['candidate']['seconds'])} "
        f"({c['candidate']['tokens']['median']:.0f} tokens, {c['candidate']['fewest']['min']:.0f}–"
        f"{c['candidate']['most']['max']:.0f} each) | {_figure(c['ratio'])} | ≤ 2× |"
    )
    for n, r in result["rescoring"].items():
        rows.append(
            f"| re-scoring a {r['answer_tokens']}-token answer vs a prefill of {r['positions']} positions, ms | "
            f"{_figure({k: v * 1000 for k, v in r['baseline']['seconds'].items() if k != 'runs'}, '{:.0f}')} | "
            f"{_figure({k: v * 1000 for k, v in r['candidate']['seconds'].items() if k != 'runs'}, '{:.0f}')} | "
            f"{_figure(r['ratio'])} | ≤ 1.2× |"
        )
        h = r["answer_head"]
        rows.append(
            f"| … vs the same prefill with the head on the answer's {r['answer_tokens']} positions only, ms | "
            f"{_figure({k: v * 1000 for k, v in h['baseline']['seconds'].items() if k != 'runs'}, '{:.0f}')} | "
            f"{_figure({k: v * 1000 for k, v in h['candidate']['seconds'].items() if k != 'runs'}, '{:.0f}')} | "
            f"{_figure(h['ratio'])} | (no goal: the log-softmax, top 5 and texts alone) |"
        )
    for n, r in result["api"].items():
        rows.append(
            f"| /chat, {n} new tokens, tokens/s: without answer_ids vs with | {_figure(r['baseline']['tokens_per_s'], '{:.1f}')} "
            f"| {_figure(r['candidate']['tokens_per_s'], '{:.1f}')} | {_figure(r['ratio'])} | no loss beyond noise |"
        )
    for n, r in result["api"].items():
        rows.append(
            f"  /chat, {n} new tokens: {r['candidate']['tokens']['median']:.0f} tokens; last update "
            f"{r['candidate']['last_update_bytes']['median']:.0f} bytes with answer_ids, "
            f"{r['baseline']['last_update_bytes']['median']:.0f} without"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="100m", help="tiny, 100m, hub ids or folders, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64, help="answer length for every measurement")
    parser.add_argument(
        "--long-tokens", type=int, default=256, help="a longer answer, for re-scoring and /chat (short ones are noise)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per figure (at least 3)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    command = shlex.join(["python", "bench/workbench.py", *sys.argv[1:]])
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            results.append(bench_model(name.strip(), Path(workdir), args.new_tokens, args.long_tokens, args.repeats))
            print(table(results[-1]), flush=True)
    print(f"\n{command}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": command,
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "results": results,
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
