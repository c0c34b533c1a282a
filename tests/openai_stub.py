"""A scriptable server for /v1/completions, for what a real server won't do on demand: take token
ids like vLLM, refuse fields, fail with a 500, fall silent mid-answer.

The real-server tests use `transformers serve`; this covers the faults and dialects around it.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


@dataclass
class Script:
    takes_ids: bool = True
    takes_extras: bool = True  # vLLM's top-level top_k / repetition_penalty / stop_token_ids
    pieces: tuple[str, ...] = ("\nThe", " answer")
    status: int = 200
    silent_after_first_piece: float = 0.0  # seconds to stall once the first piece is sent
    error_in_stream: str | None = None
    garbage_in_stream: bool = False
    # Answers a request for "prompt_logprobs" as vLLM does (with stub_prompt_logprobs); False: leaves them out.
    prompt_logprobs: bool = True
    requests: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)  # each request's, names in lower case


def stub_prompt_logprobs(ids: list[int], k: int) -> list[dict | None]:
    """vLLM's prompt_logprobs, made up but of its shape: None for the first id, then per position
    {id: {"logprob", "rank", "decoded_token"}} with the k most likely ids and the prompt's own. At even
    positions the prompt's id ranks first (p 0.5); at odd ones it ranks 9th (p 0.01), after k others."""
    positions: list[dict | None] = [None]
    for position, token in enumerate(ids[1:], 1):
        others = [(token + n) % 32000 for n in range(1, k + 2)]
        if position % 2 == 0:
            ranked = [(token, 0.5), *zip(others[: k - 1], (0.2, 0.1, 0.05, 0.02, 0.01), strict=False)]
        else:
            ranked = [*zip(others[:k], (0.4, 0.2, 0.1, 0.05, 0.02), strict=False), (token, 0.01)]
        entry = {}
        for rank, (other, p) in enumerate(ranked, 1):
            entry[str(other)] = {"logprob": math.log(p), "rank": rank if other != token or rank == 1 else 9}
            entry[str(other)]["decoded_token"] = f"<{other}>"
        positions.append(entry)
    return positions


def completion(body: dict, script: Script) -> dict:
    """A whole (not streamed) completion: the script's pieces, and prompt_logprobs if asked for."""
    choice = {"index": 0, "text": "".join(script.pieces), "finish_reason": "length", "logprobs": None}
    if body.get("prompt_logprobs") is not None and script.prompt_logprobs and isinstance(body["prompt"], list):
        choice["prompt_logprobs"] = stub_prompt_logprobs(body["prompt"], body["prompt_logprobs"])
    return {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": body["model"], "choices": [choice]}


class OpenAIStub:
    def __init__(self, script: Script):
        self.script = script
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._json(200, {"object": "list", "data": [{"id": "orca", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.script.requests.append(body)
                stub.script.headers.append({name.lower(): value for name, value in self.headers.items()})
                script = stub.script
                if script.status != 200:
                    return self._json(script.status, {"error": {"message": "the stub was told to fail"}})
                if isinstance(body["prompt"], list) and not script.takes_ids:
                    return self._json(400, {"detail": "prompt must be a string."})
                extras = {"top_k", "repetition_penalty", "stop_token_ids", "generation_config"} & set(body)
                if extras and not script.takes_extras:
                    return self._json(422, {"detail": f"Unexpected fields in the request: {sorted(extras)}"})
                if not body.get("stream"):
                    return self._json(200, completion(body, script))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for n, piece in enumerate(script.pieces):
                    self._event({"choices": [{"index": 0, "text": piece, "finish_reason": None}]})
                    if n == 0 and script.silent_after_first_piece:
                        time.sleep(script.silent_after_first_piece)
                        return
                    if n == 0 and script.error_in_stream:
                        return self._event({"error": script.error_in_stream})
                    if n == 0 and script.garbage_in_stream:
                        self.wfile.write(b"data: <html>Bad Gateway</html>\n\n")
                        return
                self._event({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
                self.wfile.write(b"data: [DONE]\n\n")

            def _event(self, data: dict) -> None:
                self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

            def _json(self, status: int, data: dict) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_port}/v1"

    def __enter__(self) -> Self:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
