"""An honest visitor's first token while one client floods the server, against its time on an idle
server, in the same run.

    python bench/attack.py [--model 100m | --model tiny | --model DIR] [--rounds 3] [--samples 3]
                           [--kinds render,import,export,score,compare,forged] [--flooders 12]
                           [--new-tokens 32] [--app-args="--concurrency 9"] [--json bench/attack.json]

The app runs as `python app.py` behind an emulated Space proxy (--trusted-proxies 1): every request
carries the X-Forwarded-For entry a Space's proxy appends, so the flooder and the honest visitor are
two addresses. The flooder runs in its own process, a raw HTTP client as a script would be, with
--flooders sessions from its one address (past the per-address limit; a new address each flood, so that
none starts owing the budget of bytes the last one spent), each sending one request after another,
refusals included. Its kinds:
- render: the page's "show a conversation" event with hostile text (unclosed \\( $$ \\[);
- import: the page's import event with a file of that text (uploaded each time);
- export: the page's JSON export of a conversation as long as the server takes;
- score: /token_probabilities of a long answer;
- compare: /compare with 4 system messages and long answers;
- forged: /chat with long answers, each request with another forged X-Forwarded-For address.
The page's events are called as the page calls them (by the fn_index the page's config gives, on the
queue or off it as the config says), so the flood follows the page if an event moves onto the queue.

Each round measures, for every kind in a rotated order, the honest visitor's /chat (--samples answers,
one after another) on the idle server and under that flood, in alternating order. Prints, per kind,
the medians of first token (ms), the median of the rounds' ratios (goal: at most 2) with their
spread, and what the flood got (answered, refused with a reason, queue full, errors).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

KINDS = ("render", "import", "export", "score", "compare", "forged")
# What a Space's proxy appends to X-Forwarded-For for each (TEST-NET addresses).
# Each flood comes from an address of its own, as a new attacker would: the budget of bytes one flood
# spent would otherwise still be owed when the next began (ui/guard.py, ByteBudget).
ATTACKERS = (f"203.0.113.{n % 250 + 1}" for n in itertools.count())
HONEST = "198.51.100.7"
# Where the bench makes what a flood sends (the import's file): not the attacker, whose budget of bytes
# the flood before may have spent.
PREPARER = "198.51.100.8"
# What the refusals say: over the visitor's, the address's or the server's limit (fairness.py), or over
# the address's budget of bytes (ui/guard.py).
REFUSALS = (
    "You already have",
    "Your network address already has",
    "Your network address has moved",
    "The server is busy",
)
# Hostile text: each unclosed opener used to make rendering rescan to the end of the text.
HOSTILE = "\\( $$ \\[ "
# "\n", "The", "▁answer": ids any Orca-2-shaped model has.
ANSWER_IDS = [13, 1576, 1234]
SYSTEM_MESSAGES = ["You are Orca.", "You are a cautious assistant.", "Think step by step.", "Answer briefly."]
# Bounds one request of a broken server; no request of a working one comes near it.
REQUEST_SECONDS = 300


# --- The page as a script sees it -----------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One of the server's functions as the page calls it: its fn_index, whether it runs on Gradio's
    queue, and the name of each value it takes, in order (with the API's defaults)."""

    fn_index: int
    queued: bool
    inputs: tuple[str, ...]
    defaults: dict = field(default_factory=dict)

    def data(self, values: dict) -> list:
        missing = [name for name in self.inputs if name not in values and name not in self.defaults]
        if missing:
            raise KeyError(f"no value for {missing} (fn {self.fn_index}): has the page changed?")
        return [values.get(name, self.defaults.get(name)) for name in self.inputs]


# The page's events a flood calls, found by what triggers them, so a renamed function is still found.
PAGE_EVENTS = {"show": ("change", "raw"), "export": ("click", "export-json"), "import": ("upload", "import-json")}
API_ENDPOINTS = ("chat", "compare", "token_probabilities")


def page_events(url: str) -> dict[str, Event]:
    """The page's show, export and import events and the API's endpoints, from /config and the API info."""
    config = httpx.get(url + "config", timeout=30).json()
    components = {c["id"]: c for c in config["components"]}
    info = httpx.get(url + "gradio_api/info", timeout=30).json()["named_endpoints"]
    found = {}
    for dependency in config["dependencies"]:
        triggers = {
            (trigger, components.get(target, {}).get("props", {}).get("elem_id"))
            for target, trigger in dependency["targets"]
        }
        for name, trigger in PAGE_EVENTS.items():
            if trigger in triggers:
                roles = tuple(_role(components[i]) for i in dependency["inputs"])
                found[name] = Event(dependency["id"], bool(dependency["queue"]), roles)
        if dependency["api_name"] in API_ENDPOINTS and dependency["api_visibility"] == "public":
            parameters = info["/" + dependency["api_name"]]["parameters"]
            defaults = {p["parameter_name"]: p["parameter_default"] for p in parameters if p["parameter_has_default"]}
            names = tuple(p["parameter_name"] for p in parameters)
            found[dependency["api_name"]] = Event(dependency["id"], bool(dependency["queue"]), names, defaults)
    return found


def _role(component: dict) -> str:
    """Which value the page sends for an input: the kept conversations, the token probabilities looked
    at, the raw-text switch, or the uploaded file."""
    props = component.get("props", {})
    key = props.get("storage_key") or ""
    if key.endswith("conversations"):
        return "stored"
    if key.endswith("looked-at"):
        return "looked"
    if component["type"] == "uploadbutton":
        return "data"
    return props.get("elem_id") or f"component {component['id']}"


# --- A client ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # ok, refused, busy (Gradio's queue is full), stopped, error
    message: str = ""
    first: float | None = None  # seconds to the first piece of an answer
    final: object = None


class Caller:
    """One session from one address, over raw HTTP as the page's script talks to the server."""

    def __init__(self, url: str, address: str):
        self.url = url
        self.session = secrets.token_hex(6)
        self.http = httpx.Client(base_url=url + "gradio_api/", headers={"X-Forwarded-For": address}, timeout=60)

    def call(self, event: Event, values: dict, stop: threading.Event | None = None, forwarded: str = "") -> Outcome:
        body = {"data": event.data(values), "fn_index": event.fn_index, "session_hash": self.session}
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        try:
            if not event.queued:
                return _answered(self.http.post("run/predict", json=body, headers=headers, timeout=REQUEST_SECONDS))
            joined = self.http.post("queue/join", json=body, headers=headers)
            if joined.status_code != 200:
                return _answered(joined)
            return self._listen(joined.json()["event_id"], stop, headers)
        except httpx.HTTPError as error:
            return Outcome("error", f"{type(error).__name__}: {error}")

    def _listen(self, event_id: str, stop: threading.Event | None, headers: dict) -> Outcome:
        """Read the session's stream to this event's end; leaving it early (stop) cancels the event."""
        started, first = time.perf_counter(), None
        params = {"session_hash": self.session}
        with self.http.stream("GET", "queue/data", params=params, headers=headers, timeout=REQUEST_SECONDS) as stream:
            for line in stream.iter_lines():
                if stop is not None and stop.is_set():
                    return Outcome("stopped")
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("event_id") not in (event_id, None):
                    continue
                if message["msg"] == "process_generating" and first is None:
                    first = time.perf_counter() - started
                if message["msg"] == "process_completed":
                    output = message.get("output") or {}
                    if message.get("success"):
                        return Outcome("ok", first=first, final=output.get("data"))
                    return _refusal(str(output.get("error")))
                if message["msg"] == "unexpected_error":
                    return Outcome("error", str(message.get("message")))
        return Outcome("error", "the stream ended without the event's end")

    def upload(self, name: str, content: bytes) -> dict | Outcome:
        """A file as the page uploads it, named as Gradio's FileData; or why the upload was refused."""
        try:
            response = self.http.post("upload", files={"files": (name, content, "application/json")})
        except httpx.HTTPError as error:
            return Outcome("error", f"{type(error).__name__}: {error}")
        if response.status_code != 200:
            # The refusal at the door is plain text here (guard.py), as the page shows it.
            return _refusal(f"HTTP {response.status_code}: {response.text}")
        return {"path": response.json()[0], "orig_name": name, "meta": {"_type": "gradio.FileData"}}

    def close(self) -> None:
        self.http.close()


def _answered(response: httpx.Response) -> Outcome:
    if response.status_code == 200:
        return Outcome("ok", final=response.json().get("data"))
    if response.status_code == 503 and "queue is full" in response.text.lower():
        return Outcome("busy", response.text[:200])
    try:
        said = response.json()
        said = said.get("error") or said.get("detail") or said
    except ValueError:
        said = response.text
    return _refusal(f"HTTP {response.status_code}: {said}")


def _refusal(message: str) -> Outcome:
    return Outcome("refused" if any(words in message for words in REFUSALS) else "error", message[:300])


def honest_answer(url: str, new_tokens: int, address: str = HONEST, first_only: bool = False) -> Outcome:
    """The honest visitor's /chat through the API's own route (/gradio_api/call/v2/chat): the seconds to
    its first piece of text, and its last update; with first_only, it leaves at the first piece (which
    stops the answer)."""
    started, first, final = time.perf_counter(), None, None
    with httpx.Client(base_url=url + "gradio_api/", headers={"X-Forwarded-For": address}, timeout=60) as http:
        sent = http.post("call/v2/chat", json={"message": "How are you?", "max_new_tokens": new_tokens})
        if sent.status_code != 200:
            return _answered(sent)
        path = f"call/chat/{sent.json()['event_id']}"
        with http.stream("GET", path, timeout=REQUEST_SECONDS) as stream:
            event = ""
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("generating", "complete"):
                    final = json.loads(line[5:])[0]
                    if first is None and final["answer"]:
                        first = time.perf_counter() - started
                        if first_only:
                            return Outcome("ok", first=first, final=final)
                elif line.startswith("data:") and event == "error":
                    return _refusal(line[5:].strip())
    if final is None or not final["done"] or final["error"]:
        return Outcome("error", f"no complete answer: {final}")
    return Outcome("ok", first=first, final=final)


# --- What a flooder sends -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big each hostile request is; the defaults are at or near the server's default caps."""

    hostile_chars: int = 400_000  # the "400 KB post"
    exchanges: int = 500  # --max-exchanges' default
    score_tokens: int = 2000
    flood_tokens: int = 256  # each flooding answer's max_new_tokens


def _exchange(question: str, answer: str) -> dict:
    return {"question": question, "answer": answer, "system_message": "s", "single_turn": False, "settings": {}}


def _stored(exchanges: list[dict]) -> dict:
    conversation = {"id": "c0ffee", "created": "2026-12-02T00:00:00+00:00", "exchanges": exchanges}
    return {"open": "c0ffee", "conversations": [conversation]}


def hostile_store(chars: int) -> dict:
    """A conversation of 8 exchanges whose text is unclosed math openers, `chars` characters in all."""
    text = (HOSTILE * (chars // 16 // len(HOSTILE) + 1))[: chars // 16]
    return _stored([_exchange(text, text) for _ in range(8)])


def long_store(exchanges: int) -> dict:
    """A conversation as long as the server takes, each exchange about 1 KB."""
    return _stored([_exchange(f"Question {n}: " + "why? " * 40, "Because. " * 90) for n in range(exchanges)])


Request = Callable[[Caller, int, threading.Event], Outcome]


def requests_of(kind: str, events: dict[str, Event], sizes: Sizes, setup: Caller, address: str) -> Request:
    """What a flooder of this kind sends as its n-th request. A request the server can't stop once it
    runs (the page's events, a scoring) is read to its end when the flood stops, so that a flood ends
    when the server's work for it has: the next idle measurement would count what was left otherwise.
    An answer is left at once, which stops it (stop)."""
    if kind == "render":
        store = hostile_store(sizes.hostile_chars)
        return lambda caller, n, stop: caller.call(events["show"], {"stored": store, "raw": False})
    if kind == "export":
        store = long_store(sizes.exchanges)
        return lambda caller, n, stop: caller.call(events["export"], {"stored": store, "looked": {}})
    if kind == "import":
        # The page's own export of the hostile conversation: a file the page accepts.
        exported = setup.call(events["export"], {"stored": hostile_store(sizes.hostile_chars), "looked": {}})
        assert exported.kind == "ok", exported
        content = json.loads(exported.final[0])["text"].encode()

        uploads = itertools.count()

        def imported(caller: Caller, n: int, stop: threading.Event) -> Outcome:
            # Gradio files an upload under its content's hash, and an import deletes what it read: each
            # upload is made its own file (trailing spaces: the same JSON), as each visitor's would be.
            unique = content + b" " * next(uploads)
            uploaded = caller.upload("chat.json", unique)
            if isinstance(uploaded, Outcome):
                return uploaded
            values = {"data": uploaded, "stored": {}, "looked": {}, "raw": False}
            return caller.call(events["import"], values)

        return imported
    if kind == "score":
        ids = (ANSWER_IDS * sizes.score_tokens)[: sizes.score_tokens]
        values = {"message": "Score this", "answer_ids": ids}
        return lambda caller, n, stop: caller.call(events["token_probabilities"], values)
    if kind == "compare":
        values = {
            "message": "Tell me everything",
            "system_messages": SYSTEM_MESSAGES,
            "max_new_tokens": sizes.flood_tokens,
        }
        return lambda caller, n, stop: caller.call(events["compare"], values, stop)
    if kind == "forged":
        values = {"message": "Tell me everything", "max_new_tokens": sizes.flood_tokens}

        def forged(caller: Caller, n: int, stop: threading.Event) -> Outcome:
            # What the script writes, then what the proxy appends: the address it saw.
            forwarded = f"10.{n % 250}.{secrets.randbelow(250)}.{secrets.randbelow(250)}, {address}"
            return caller.call(events["chat"], values, stop, forwarded=forwarded)

        return forged
    raise ValueError(f"no flood of kind {kind}")


class Flood:
    """`flooders` sessions from the attacker's address (a new one unless given), each sending one request
    after another until stop(); what each request came to is counted, with the refusals' and errors'
    messages."""

    def __init__(
        self, url: str, kind: str, flooders: int, sizes: Sizes = Sizes(), pause: float = 0.0, address: str = ""
    ):
        self.url, self.kind, self.flooders, self.sizes = url, kind, flooders, sizes
        self.address = address or next(ATTACKERS)
        # Seconds a sender waits after a refusal: none for an attacker; a test leaves its CPU to the server.
        self.pause = pause
        self.outcomes: Counter[str] = Counter()
        # By outcome: what the refusals and errors said, and how often.
        self.messages: dict[str, Counter[str]] = {}
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Flood:
        setup = Caller(self.url, PREPARER)
        request = requests_of(self.kind, page_events(self.url), self.sizes, setup, self.address)
        setup.close()
        self._threads = [
            threading.Thread(target=self._send, args=(request,), daemon=True) for _ in range(self.flooders)
        ]
        self.started = time.perf_counter()
        for thread in self._threads:
            thread.start()
        return self

    def _send(self, request: Request) -> None:
        caller = Caller(self.url, self.address)
        n = 0
        while not self._stop.is_set():
            with self._lock:
                self.sent += 1
            outcome = request(caller, n, self._stop)
            n += 1
            with self._lock:
                self.outcomes[outcome.kind] += 1
                if outcome.message:
                    self.messages.setdefault(outcome.kind, Counter())[outcome.message[:160]] += 1
            if outcome.kind == "refused":
                self._stop.wait(self.pause)
        caller.close()

    def stop(self) -> dict:
        """Stops sending and waits for the senders: each leaves an answer it reads (which stops it) and reads
        any other request to its end (requests_of)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_SECONDS)
        seconds = time.perf_counter() - self.started
        return {
            "outcomes": dict(self.outcomes),
            "requests_per_s": sum(self.outcomes.values()) / seconds,
            "messages": {kind: dict(said.most_common(3)) for kind, said in self.messages.items()},
            "senders_left": sum(thread.is_alive() for thread in self._threads),
        }


def _flood_process(url: str, kind: str, flooders: int, sizes: Sizes, address: str, stop, ready, results) -> None:
    flood = Flood(url, kind, flooders, sizes, address=address).start()
    ready.set()
    stop.wait()
    results.put(flood.stop())


# --- The bench ------------------------------------------------------------------------------------


def honest_samples(url: str, samples: int, new_tokens: int) -> list[Outcome]:
    """First tokens only: the rest of an answer under some floods takes minutes, and isn't measured."""
    return [honest_answer(url, new_tokens, first_only=True) for _ in range(samples)]


def under_flood(url: str, kind: str, args, sizes: Sizes) -> tuple[list[Outcome], dict]:
    """The honest visitor's answers while a flood of this kind runs in its own process."""
    context = multiprocessing.get_context("spawn")
    stop, ready, results = context.Event(), context.Event(), context.Queue()
    flood = (url, kind, args.flooders, sizes, next(ATTACKERS))
    process = context.Process(target=_flood_process, args=(*flood, stop, ready, results))
    process.start()
    try:
        if not ready.wait(120):
            raise RuntimeError(f"the {kind} flood did not start")
        time.sleep(args.settle)  # every sender has a request in by now
        answers = honest_samples(url, args.samples, args.new_tokens)
    finally:
        stop.set()
    tally = results.get(timeout=REQUEST_SECONDS)
    process.join(60)
    time.sleep(args.settle)  # the server lets go of the flood's last requests
    return answers, tally


def first_token(answers: list[Outcome]) -> float:
    """The median seconds to the first piece, over the answers that came (inf if none did)."""
    times = [a.first for a in answers if a.kind == "ok" and a.first is not None]
    return statistics.median(times) if times else float("inf")


def launch_app(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    command = [
        sys.executable,
        "app.py",
        "--model",
        model,
        "--port",
        str(port),
        "--trusted-proxies",
        "1",
        "--max-new-tokens-cap",
        "4000",
        "--log-level",
        "WARNING",
        *extra,
    ]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200 and honest_answer(url, 2).kind == "ok":
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"the app did not come up at {url}")


def run(url: str, args, sizes: Sizes) -> dict:
    kinds = args.kinds.split(",")
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for round_ in range(args.rounds):
        shift = round_ % len(kinds)
        for n, kind in enumerate(kinds[shift:] + kinds[:shift]):
            flooded_first = (round_ + n) % 2 == 1  # half the pairs measure under the flood first
            if flooded_first:
                flooded, tally = under_flood(url, kind, args, sizes)
            idle = honest_samples(url, args.samples, args.new_tokens)
            if not flooded_first:
                flooded, tally = under_flood(url, kind, args, sizes)
            record = {
                "idle_s": first_token(idle),
                "flooded_s": first_token(flooded),
                "flood": tally,
                "honest": Counter(a.kind for a in flooded),
                "honest_errors": [a.message for a in flooded if a.kind != "ok"][:2],
            }
            record["ratio"] = record["flooded_s"] / record["idle_s"]
            runs[kind].append(record)
            print(
                f"round {round_ + 1}, {kind}: {record['idle_s'] * 1000:.0f} ms idle, "
                f"{record['flooded_s'] * 1000:.0f} ms flooded ({record['ratio']:.2f}×); flood {tally['outcomes']}",
                flush=True,
            )
    return runs


def spread(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    values = [v * scale for v in values]
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def table(runs: dict[str, list[dict]]) -> str:
    lines = [
        "| flood | first token idle, ms | under the flood, ms | ratio (goal ≤ 2) | honest answers | flood's requests |",
        "|---|---|---|---|---|---|",
    ]
    for kind, records in runs.items():
        honest = sum((Counter(r["honest"]) for r in records), Counter())
        flood = sum((Counter(r["flood"]["outcomes"]) for r in records), Counter())
        rate = statistics.median(r["flood"]["requests_per_s"] for r in records)
        lines.append(
            f"| {kind} | {spread([r['idle_s'] for r in records], 1000)} "
            f"| {spread([r['flooded_s'] for r in records], 1000)} | {spread([r['ratio'] for r in records], digits=2)} "
            f"| {dict(honest)} | {dict(flood)}, {rate:.1f}/s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="100m", help="tiny or 100m (built here, random weights), or a folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=3, help="honest answers per measurement (their median)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--flooders", type=int, default=12, help="the flooder's sessions (the address limit is 8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="the honest visitor's max_new_tokens")
    parser.add_argument("--flood-tokens", type=int, default=Sizes.flood_tokens)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds a flood runs before the honest visitor asks")
    parser.add_argument(
        "--app-args", default="", help='more flags for app.py, in one string: --app-args="--concurrency 9"'
    )
    parser.add_argument("--json", default=str(ROOT / "bench" / "attack.json"))
    args = parser.parse_args()
    sizes = Sizes(flood_tokens=args.flood_tokens)
    command = "python bench/attack.py " + " ".join(sys.argv[1:])
    print(f"{time.strftime('%Y-%m-%d')} · {command} · {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model in ("tiny", "100m"):
            from make_tiny_model import build_tiny_model

            model = str(build_tiny_model(Path(folder) / model, size=model))
        port = 7800 + os.getpid() % 100
        server = launch_app(model, port, args.app_args.split())
        try:
            runs = run(f"http://127.0.0.1:{port}/", args, sizes)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"\n{command}\n\n{table(runs)}")
    facts = {"date": time.strftime("%Y-%m-%d"), "command": command, "cpus": os.cpu_count(), "sizes": sizes.__dict__}
    Path(args.json).write_text(json.dumps({**facts, "runs": runs}, indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
