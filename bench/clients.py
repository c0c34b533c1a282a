"""Concurrent chats through gradio_client, in a process of their own, so that the clients' work (and
their share of the GIL) is not counted as the server's. bench/speed.py starts it:

    python bench/clients.py URL N PARAMS_JSON

It connects N clients, prints "ready", waits for a line on stdin (the clock starts then), runs the N
chats at once with the /chat settings in PARAMS_JSON, and prints the crowd's figures as one JSON line.
It imports nothing of the app: only gradio_client and the standard library.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import threading
import time

QUESTION = "How can you determine if a restaurant is popular among locals or mainly attracts tourists?"
SYSTEM = "You are Orca, an AI language model created by Microsoft. You are a cautious assistant."
# How often a client looks at the updates gradio_client has received. Iterating a Job instead polls
# every 1 ms per job: ~4.5 ms of CPU per token on a 2-core machine.
READ_SECONDS = 0.02


def rate(n_tokens: int, first: float, last: float) -> float:
    """Decode speed: tokens after the first, over the time after the first."""
    return (n_tokens - 1) / (last - first) if n_tokens > 1 and last > first else 0.0


def client_stream(client, params: dict) -> dict:
    """One /chat answer through gradio_client: its decode speed and first token as the client saw them
    (to within READ_SECONDS)."""
    start = time.perf_counter()
    job = client.submit(message=QUESTION, system_message=SYSTEM, **params, api_name="/chat")
    first = None
    while not job.done():
        if first is None and any(update["answer"] for update in job.outputs()):
            first = time.perf_counter()
        time.sleep(READ_SECONDS)
    last = time.perf_counter()
    final = job.result()
    first = first or last
    return {"tokens_per_s": rate(final["n_tokens"], first, last), "ttft_s": first - start, "tokens": final["n_tokens"]}


def crowd(streams: list) -> dict:
    """The chats at once, each stream() -> its result. Whatever a chat needs (a client) is made before
    the clock starts: connecting is not streaming."""
    results: list[dict] = []
    lock = threading.Lock()

    def chat(index: int) -> None:
        result = streams[index]()
        with lock:
            results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(streams))]
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


def main() -> None:
    from gradio_client import Client

    url, n, params = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    clients = [Client(url, verbose=False) for _ in range(n)]
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(crowd([functools.partial(client_stream, client, params) for client in clients])), flush=True)


if __name__ == "__main__":
    main()
