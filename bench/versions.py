"""bench/speed.py on two commits of this repository, in alternation: is the change no slower?

    python bench/versions.py BASE [HEAD] [--rounds 3] [--models 100m] [--new-tokens 64] [--crowds 1,8]

Each round runs speed.py once (--repeats 1) from a checkout of each commit, in a rotated order, so
that what else the machine does falls on both alike. Each figure is the median over the rounds, with
its spread (min-max); "after ÷ before" is the median of the round-by-round ratios. The checkouts are
git worktrees in a temporary folder; each commit's own speed.py measures it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What speed.py reports for each measurement: tokens/s for one answer, aggregate tokens/s for a crowd.
FIGURES = ("tokens_per_s", "aggregate_tokens_per_s")


def checkout(commit: str, folder: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(folder), commit], check=True)
    return folder


def speed(tree: Path, out: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, "bench/speed.py", "--repeats", "1", "--json", str(out)]
    command += ["--models", args.models, "--new-tokens", str(args.new_tokens), "--crowds", args.crowds]
    subprocess.run(command, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def figures(result: dict) -> dict[str, float]:
    """measurement -> its throughput, for every model benched."""
    found = {}
    for bench in result["results"]:
        for name, runs in bench["runs"].items():
            key = next(k for k in FIGURES if k in runs[0])
            found[f"{bench['model']}: {name}"] = runs[0][key]
    return found


def spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("head", nargs="?", default="HEAD")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="100m")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--crowds", default="1,8")
    args = parser.parse_args()
    command = "python bench/versions.py " + " ".join(sys.argv[1:])
    print(f"{time.strftime('%Y-%m-%d')} · {command}", flush=True)
    rounds: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as work:
        trees = {
            "before": checkout(args.base, Path(work) / "before"),
            "after": checkout(args.head, Path(work) / "after"),
        }
        try:
            for round_ in range(args.rounds):
                for label in ("before", "after") if round_ % 2 == 0 else ("after", "before"):
                    result = speed(trees[label], Path(work) / f"{label}-{round_}.json", args)
                    rounds[label].append(figures(result))
                    print(f"round {round_ + 1}: {label} done", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print("\n| measurement (tokens/s) | before | after | after ÷ before |\n|---|---|---|---|")
    for name in rounds["before"][0]:
        before = [r[name] for r in rounds["before"]]
        after = [r[name] for r in rounds["after"]]
        ratios = [a / b for a, b in zip(after, before) if b]
        shown = spread(ratios, 2) if len(ratios) == len(before) else "— (a round measured 0)"
        print(f"| {name} | {spread(before, 1)} | {spread(after, 1)} | {shown} |")


if __name__ == "__main__":
    main()
