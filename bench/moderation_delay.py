"""How much later does a moderated answer reach the reader? Measured, not asserted.

    python bench/moderation_delay.py [--latency 0.15] [--answers 5] [--json bench/moderation_delay.json]

One run, one model, one answer text: a tiny scripted Orca-2-shaped model writes clean sentences,
the real Azure SDK talks to the local Content Safety stand-in, which waits --latency seconds per
check (a round trip to Azure). Each answer is generated with moderation off (the baseline) and on;
the table gives time to first visible text and to the finished answer, and the delay moderation
adds, absolute and as a ratio against the baseline measured in the same run.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from content_safety_server import Behaviour, ContentSafetyServer
from make_tiny_model import build_tiny_model

from orca2_space.backends.local.engine import Engine
from orca2_space.chat import Chat
from orca2_space.moderation import AzureContentSafety, Moderation
from orca2_space.prompt import IM_END, OrcaTokenizer
from orca2_space.settings import ModerationSettings, Settings

# Sentences whose token ids are all distinct, as a scripted model needs.
ANSWER = "\nLocals often visit on weekdays. Menus written only in English may hint at tourists; reviews help too! Done"


def timed_answer(chat: Chat, moderation: bool) -> dict[str, float]:
    start = time.perf_counter()
    first_visible = None
    for update in chat.respond(
        chat.request("Is this restaurant popular with locals?", "", [], moderation=moderation, max_new_tokens=200)
    ):
        if update.answer and first_visible is None:
            first_visible = time.perf_counter() - start
    return {"first_visible_s": first_visible or float("nan"), "done_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.15, help="seconds the stand-in service takes per check")
    parser.add_argument("--answers", type=int, default=5)
    parser.add_argument("--json", default=str(ROOT / "bench" / "moderation_delay.json"))
    args = parser.parse_args()

    tokenizer = OrcaTokenizer(ROOT / "tests" / "fixtures" / "orca2-tokenizer" / "tokenizer.model")
    with (
        tempfile.TemporaryDirectory() as folder,
        ContentSafetyServer(Behaviour(key="bench", delay=args.latency)) as server,
    ):
        engine = Engine.load(str(build_tiny_model(folder, script=[*tokenizer.encode_text(ANSWER), IM_END])))
        rules = ModerationSettings(endpoint=server.endpoint, key="bench", default_on=False)
        moderation = Moderation(AzureContentSafety(server.endpoint, "bench", rules.timeout, rules.retries), rules)
        chat = Chat(engine, Settings(moderation=rules), moderation)
        timed_answer(chat, False)  # warm-up
        runs = {mode: [timed_answer(chat, mode == "on") for _ in range(args.answers)] for mode in ("off", "on")}
        checks_per_answer = len(server.requests) / args.answers

    result = {"latency_s": args.latency, "answers": args.answers, "checks_per_answer": checks_per_answer}
    print(
        f"moderation stand-in latency {args.latency * 1000:.0f} ms per check, {checks_per_answer:.1f} checks per answer "
        f"(question, sentences, whole answer)\n"
    )
    print(f"{'metric':<22}{'off (baseline)':>16}{'on':>10}{'added':>10}{'ratio':>8}")
    for metric in ("first_visible_s", "done_s"):
        off = statistics.median(r[metric] for r in runs["off"])
        on = statistics.median(r[metric] for r in runs["on"])
        result[metric] = {"off": off, "on": on, "added": on - off, "ratio": on / off}
        print(f"{metric:<22}{off * 1000:>13.1f} ms{on * 1000:>7.0f} ms{(on - off) * 1000:>7.0f} ms{on / off:>7.1f}x")
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
