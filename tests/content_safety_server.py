"""A local HTTP server that speaks Azure AI Content Safety's text API (api-version 2023-10-01).

    POST /contentsafety/text:analyze?api-version=2023-10-01
    Ocp-Apim-Subscription-Key: <key>
    {"text": "..."}
    → {"blocklistsMatch": [], "categoriesAnalysis": [{"category": "Hate", "severity": 0}, ...]}

Severity comes from trigger words (case-insensitive) set by the test. The server can also answer
with an HTTP error, answer slowly, or drop the request, so the app's handling of a failing service
is tested against the real azure-ai-contentsafety client over real HTTP. Every request is recorded.

Run it by hand (e.g. to watch filtering in a browser):
    python tests/content_safety_server.py --port 8123 --key test-key --flag "attack=Violence:6"
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

CATEGORIES = ("Hate", "SelfHarm", "Sexual", "Violence")
PATH = "/contentsafety/text:analyze"
API_VERSION = "2023-10-01"
MAX_TEXT = 10_000


@dataclass
class Behaviour:
    key: str = "test-key"
    # trigger word → (category, severity)
    triggers: dict[str, tuple[str, int]] = field(default_factory=dict)
    status: int | None = None  # answer every request with this HTTP status instead
    retry_after: str | None = None  # Retry-After header sent with `status`
    delay: float = 0.0  # seconds to wait before answering


@dataclass
class Recorded:
    path: str
    query: str
    key: str | None
    text: str | None


class ContentSafetyServer:
    def __init__(self, behaviour: Behaviour | None = None, host: str = "127.0.0.1", port: int = 0):
        self.behaviour = behaviour or Behaviour()
        self.requests: list[Recorded] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                path, _, query = self.path.partition("?")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    text = json.loads(body).get("text")
                except (ValueError, AttributeError):
                    text = None
                server.requests.append(Recorded(path, query, self.headers.get("Ocp-Apim-Subscription-Key"), text))
                b = server.behaviour
                if b.delay:
                    time.sleep(b.delay)
                if path != PATH or f"api-version={API_VERSION}" not in query:
                    return self._error(404, "NotFound", "Resource not found")
                if self.headers.get("Ocp-Apim-Subscription-Key") != b.key:
                    return self._error(401, "401", "Access denied due to invalid subscription key.")
                if b.status is not None:
                    return self._error(b.status, str(b.status), "Injected failure", b.retry_after)
                if not isinstance(text, str) or not text:
                    return self._error(400, "InvalidRequestBody", "The text is empty.")
                if len(text) > MAX_TEXT:
                    return self._error(400, "InvalidRequestBody", f"The text exceeds {MAX_TEXT} characters.")
                severities = dict.fromkeys(CATEGORIES, 0)
                lowered = text.lower()
                for word, (category, severity) in b.triggers.items():
                    if word.lower() in lowered:
                        severities[category] = max(severities[category], severity)
                answer = {
                    "blocklistsMatch": [],
                    "categoriesAnalysis": [{"category": c, "severity": s} for c, s in severities.items()],
                }
                self._send(200, answer)

            def _error(self, status, code, message, retry_after=None):
                headers = {"Retry-After": retry_after} if retry_after else {}
                self._send(status, {"error": {"code": code, "message": message}}, headers)

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that gave up on a slow answer is expected here

        self._httpd = Server((host, port), Handler)
        self.endpoint = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def texts(self) -> list[str]:
        return [r.text for r in self.requests if r.text is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--key", default="test-key")
    parser.add_argument("--flag", action="append", default=[], metavar="WORD=Category:severity")
    args = parser.parse_args()
    triggers = {}
    for item in args.flag:
        word, _, rest = item.partition("=")
        category, _, severity = rest.partition(":")
        triggers[word] = (category, int(severity))
    with ContentSafetyServer(Behaviour(key=args.key, triggers=triggers), port=args.port) as server:
        print(f"Content Safety stand-in at {server.endpoint} (key {args.key!r}); Ctrl+C to stop", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
