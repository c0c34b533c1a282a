"""What an evaluation costs: questions × system messages through Chat.evaluate, against the same answers one
at a time and against the engine's own batched throughput, and a chat visitor's first token meanwhile.

    python bench/evaluate.py [--model 100m] [--questions 40] [--new-tokens 64] [--rounds 3] [--json FILE]

On this machine's device, greedy, over the engine as the app serves it by default (batched:
batching_settings(Settings()), --concurrency 8), with --questions arithmetic word problems under the
first four presets' system messages (40 × 4 = 160 answers):
- evaluation: draining Chat.evaluate, the evaluation alone on the server;
- one at a time: the same answers, each drained from Chat.respond before the next is asked (what a
  researcher scripting /chat gets); goal: the evaluation ≥ 3× faster;
- engine batched: the same prompts straight to Engine.generate, --concurrency streams at once, no chat
  layer (the batch's own throughput); goal: the evaluation ≥ 0.9× its answers per second;
- first token: a chat visitor's (Chat.respond through the fair share, as /chat) with the server idle,
  and while an evaluation holds the batch (it gives way to its share; it is stopped afterwards).
Each round runs every measurement once, in a rotated order; figures are the median and the min–max over
the rounds, and each ratio is taken within a round. "tiny" and "100m" are random-weight Orca-2-shaped
models (tests/make_tiny_model.py) built on the fly, whose answers all run to --new-tokens; a hub id or a
folder also works.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from make_tiny_model import SIZES, build_tiny_model

from orca2_space.backends.local.batching import batching_settings
from orca2_space.backends.local.engine import Engine
from orca2_space.chat import Chat
from orca2_space.fairness import Visitor
from orca2_space.grading import Grading, Rule
from orca2_space.presets import SYSTEM_PRESETS
from orca2_space.settings import GenerationParams, Settings

SYSTEMS = list(SYSTEM_PRESETS.values())[:4]
NAMES = ["Sam", "Ana", "Li", "Omar", "Priya", "Jonas", "Mei", "Tom"]
THINGS = ["apples", "stamps", "marbles", "books", "coins"]
CHAT_VISITOR = Visitor("bench chat visitor", "127.0.0.2")
CHAT_QUESTION = "How can you determine if a restaurant is popular among locals or mainly attracts tourists?"
EVALUATION_OWNER = "bench evaluation"


def word_problems(n: int) -> list[dict]:
    """n arithmetic word problems with their answers, all different."""
    return [
        {
            "id": f"q{i}",
            "question": f"{NAMES[i % len(NAMES)]} has {3 + i} {THINGS[i % len(THINGS)]} and gets {2 * i + 1} more. "
            f"How many {THINGS[i % len(THINGS)]} does {NAMES[i % len(NAMES)]} have now?",
            "answer": str(3 + i + 2 * i + 1),
        }
        for i in range(n)
    ]


STARTED = time.perf_counter()


def progress(what: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {what}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, model: str, workdir: Path, questions: int, new_tokens: int):
        folder = str(build_tiny_model(workdir / model, size=model)) if model in SIZES else model
        self.settings = Settings(model=model, max_new_tokens_cap=new_tokens)
        self.batching = batching_settings(self.settings)
        self.engine = Engine.load(folder, batching=self.batching)
        self.chat = Chat(self.engine, self.settings)
        self.records = word_problems(questions)
        self.new_tokens = new_tokens
        self.request = self.chat.evaluation_request(
            self.records, SYSTEMS, Grading(Rule.NUMBER), max_new_tokens=new_tokens
        )
        self.answers = len(self.records) * len(SYSTEMS)

    def evaluation(self) -> dict:
        start = time.perf_counter()
        *_, last = self.chat.evaluate(self.request)
        seconds = time.perf_counter() - start
        tokens = sum(cell.stats["n_tokens"] for cell in last.evaluation.cells)
        assert last.done == self.answers, last.notices
        return {"seconds": seconds, "answers_per_s": self.answers / seconds, "tokens": tokens}

    def one_at_a_time(self) -> dict:
        start, tokens = time.perf_counter(), 0
        for record in self.records:
            for system in SYSTEMS:
                asked = self.chat.request(
                    record["question"], system, [], single_turn=True, max_new_tokens=self.new_tokens
                )
                *_, last = self.chat.respond(asked)
                tokens += last.stats.n_tokens
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "answers_per_s": self.answers / seconds, "tokens": tokens}

    def engine_batched(self) -> dict:
        """The same prompts, --concurrency streams at once straight on the engine."""
        prompts: queue.SimpleQueue = queue.SimpleQueue()
        for record in self.records:
            for system in SYSTEMS:
                prompts.put(self.chat.prompt_for(record["question"], system, None, self.new_tokens))
        params = GenerationParams(max_new_tokens=self.new_tokens)
        counts: list[int] = []

        def stream() -> None:
            while True:
                try:
                    prompt = prompts.get_nowait()
                except queue.Empty:
                    return
                answer = self.engine.generate(prompt, params)
                for _ in answer:
                    pass
                counts.append(answer.stats.n_tokens)

        start = time.perf_counter()
        threads = [threading.Thread(target=stream) for _ in range(self.settings.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "answers_per_s": self.answers / seconds, "tokens": sum(counts)}

    def first_token(self) -> float:
        """A chat visitor's time to the first piece of their answer."""
        asked = self.chat.request(CHAT_QUESTION, SYSTEMS[0], [], single_turn=True, max_new_tokens=8)
        start = time.perf_counter()
        updates = self.chat.respond(asked, visitor=CHAT_VISITOR)
        first = next(update for update in updates if update.answer or update.done)
        seconds = time.perf_counter() - start
        assert first.error is None, first.error
        updates.close()
        return seconds

    def first_token_idle(self) -> dict:
        return {"seconds": self.first_token()}

    def first_token_during(self) -> dict:
        """While an evaluation's answers fill the batch, decoding: the chat arrives, the evaluation gives way."""
        done = threading.Event()

        def evaluate() -> None:
            for _ in self.chat.evaluate(self.request, owner=EVALUATION_OWNER):
                pass
            done.set()

        threading.Thread(target=evaluate, daemon=True).start()
        deadline = time.monotonic() + 120
        while not self.batch_decoding() and not done.is_set():
            if time.monotonic() > deadline:
                raise RuntimeError("the evaluation never filled the batch")
            time.sleep(0.01)
        held = len(self.engine._batcher._sinks)
        seconds = self.first_token()
        self.chat.stop(EVALUATION_OWNER)
        done.wait(60)
        return {"seconds": seconds, "evaluation_answers_in_the_batch": held}

    def batch_decoding(self) -> bool:
        """Whether the batch is full of answers past their prefill (each has written a token)."""
        batcher = self.engine._batcher
        with batcher._lock:
            sent = list(batcher._sent.values())
        return len(sent) >= self.settings.concurrency and min(sent) >= 1

    def measurements(self) -> dict[str, Callable[[], dict]]:
        return {
            "evaluation": self.evaluation,
            "one_at_a_time": self.one_at_a_time,
            "engine_batched": self.engine_batched,
            "first_token_idle": self.first_token_idle,
            "first_token_during": self.first_token_during,
        }

    def run(self, rounds: int) -> dict[str, list[dict]]:
        measure = self.measurements()
        progress("warm-up")
        self.first_token_idle(), self.engine_batched()
        names, runs = list(measure), {}
        for round_ in range(rounds):
            shift = round_ * len(names) // rounds
            for name in names[shift:] + names[:shift]:
                progress(f"round {round_ + 1}: {name}")
                runs.setdefault(name, []).append(measure[name]())
        return runs

    def close(self) -> None:
        self.engine.close()


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def figures(runs: dict[str, list[dict]]) -> dict:
    """Each measurement's figures, and the ratios taken round by round."""
    result = {name: {key: spread([r[key] for r in rs]) for key in rs[0]} for name, rs in runs.items()}
    evaluation = runs["evaluation"]

    def ratios(top: list[dict], bottom: list[dict], key: str) -> dict:
        return spread([t[key] / b[key] for t, b in zip(top, bottom, strict=True)])

    result["ratios"] = {
        "speed_up_over_one_at_a_time": ratios(runs["one_at_a_time"], evaluation, "seconds"),
        "of_engine_batched_throughput": ratios(evaluation, runs["engine_batched"], "answers_per_s"),
        "first_token_during_over_idle": ratios(runs["first_token_during"], runs["first_token_idle"], "seconds"),
    }
    return result


def _shown(s: dict, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def _ms(s: dict) -> str:
    return _shown({k: v * 1000 for k, v in s.items() if k != "runs"}, "{:.0f}")


def table(bench: Bench, result: dict) -> str:
    info, r, ratios = bench.engine.info, result, result["ratios"]
    rows = [
        (
            f"{info.name} ({info.quantization}, {info.device}); {len(bench.records)} questions × {len(SYSTEMS)} system "
            f"messages = {bench.answers} answers of {bench.new_tokens} tokens; batch of {bench.batching.max_concurrent}, "
            f"{bench.batching.cache_tokens}-token cache; median (min–max) of {len(r['evaluation']['seconds']['runs'])} "
            "rounds"
        ),
        "",
        "| measurement | figure | goal |",
        "|---|---|---|",
        (
            f"| evaluation, s (answers/s) | {_shown(r['evaluation']['seconds'], '{:.1f}')} "
            f"({_shown(r['evaluation']['answers_per_s'])}) | |"
        ),
        f"| the same answers one at a time, s | {_shown(r['one_at_a_time']['seconds'], '{:.1f}')} | |",
        f"| … the evaluation's speed-up | {_shown(ratios['speed_up_over_one_at_a_time'])}× | ≥ 3× |",
        (
            f"| the engine's own batch, same prompts, {bench.settings.concurrency} streams, s | "
            f"{_shown(r['engine_batched']['seconds'], '{:.1f}')} | |"
        ),
        f"| … the evaluation's answers/s over the engine's | {_shown(ratios['of_engine_batched_throughput'])} | ≥ 0.9 |",
        f"| a chat's first token, idle, ms | {_ms(r['first_token_idle']['seconds'])} | |",
        (
            f"| a chat's first token while an evaluation runs, ms | {_ms(r['first_token_during']['seconds'])} | "
            "one batch step + its prefill |"
        ),
        f"| … over idle | {_shown(ratios['first_token_during_over_idle'])}× | |",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="100m", help="tiny, 100m, a hub id or a folder")
    parser.add_argument("--questions", type=int, default=40, help="questions, each under 4 system messages")
    parser.add_argument("--new-tokens", type=int, default=64, help="every answer's length (random weights never stop)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least 3)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    command = shlex.join(["python", "bench/evaluate.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as workdir:
        bench = Bench(args.model, Path(workdir), args.questions, args.new_tokens)
        try:
            result = figures(bench.run(args.rounds))
        finally:
            bench.close()
    print(table(bench, result))
    print(f"\n{command}")
    if args.json:
        document = {"command": command, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), **result}
        Path(args.json).write_text(json.dumps(document, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
