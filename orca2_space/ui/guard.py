"""What every HTTP request passes before Gradio sees it: the visitor's address read as --trusted-proxies
says, cross-origin reading for the page's own origin only (with a login or a share link), a limit on
wrong passwords per address, a cap on the size of a request's body, API calls that name an
endpoint and bring the values it takes, queued events that name one of the app's, and no work at all
for an address whose fair share is full or just refused it, or that has moved more than its budget of
bytes through the server (ByteBudget).

Gradio adds its own CORS middleware outside anything an app can add through launch(), so the guard
wraps the whole app from the app's lifespan, which runs before the server accepts a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..fairness import ByteBudget, FairShare, visitor_address
from ..settings import Settings

log = logging.getLogger(__name__)

API_CALL = re.compile(r"^/gradio_api/call/(?P<by_name>v2/)?(?P<name>[^/]+)/?$")
LOGIN_PATHS = ("/login", "/login/")
QUEUE_JOIN_PATHS = ("/gradio_api/queue/join", "/gradio_api/queue/join/")
# Uploads have Gradio's own cap (--max-upload-mb, counted as the file streams to disk).
UPLOAD_PATH = "/gradio_api/upload"
# Gradio's MCP server (--mcp): an agent's tool calls.
MCP_PATH = "/gradio_api/mcp"
# The most bytes JSON takes to write one character of text: \u0001 (a client writing ASCII-only JSON
# writes every other character that isn't ASCII as \uXXXX too).
JSON_BYTES_PER_CHAR = 6
# Room in a request for what isn't text: the settings, the event's name, the session, the JSON around them.
BODY_OVERHEAD = 1024 * 1024
LOGIN_WINDOW_SECONDS = 60.0
# A request from an address whose fair share is full is refused at the door, after this pause: through
# Gradio's queue a refusal cost the server about as much as a decode step, and a script asking again at
# once (four sessions past the limit, ~25 refusals a second) made an honest visitor's first token 11-13x
# slower on 2 cores (docs/performance.md, "Under attack"). At the door it costs almost nothing, and the pause (an await, no thread) makes such a
# script ask once a second per connection.
REFUSAL_PAUSE_SECONDS = 1.0
# Where the results of work come back (a queued event's stream, an API call's, an event off the queue):
# the responses that count against an address's budget; the page's own files don't.
RESULT_PATHS = ("/gradio_api/queue/data", "/gradio_api/call/", "/gradio_api/run/", MCP_PATH)
FN_INDEX = TypeAdapter(int | None)


@dataclass(frozen=True)
class Endpoint:
    # In the order /gradio_api/call/NAME takes their values.
    parameters: tuple[str, ...]
    required: frozenset[str]

    def values_problem(self, name: str, data: list) -> str | None:
        """/gradio_api/call/NAME: {"data": [every value, in order]}."""
        if len(data) == len(self.parameters):
            return None
        return f"/{name} takes {len(self.parameters)} values, in this order: {self._listed()}; got {len(data)}."

    def named_values_problem(self, name: str, values: dict) -> str | None:
        """/gradio_api/call/v2/NAME: {"parameter": value, ...}, the required ones at least."""
        unknown = [key for key in values if key not in self.parameters and key != "oauth_token"]
        if unknown:
            return f"/{name} has no parameter {', '.join(unknown)}; its parameters: {self._listed()}."
        missing = [parameter for parameter in self.parameters if parameter in self.required - values.keys()]
        if missing:
            return f"/{name} needs {', '.join(missing)}; its parameters: {self._listed()}."
        return None

    def _listed(self) -> str:
        return ", ".join(self.parameters)


@dataclass(frozen=True)
class Rules:
    trusted_proxies: int
    own_origin_only: bool
    # The public API endpoints by name.
    endpoints: Mapping[str, Endpoint]
    # Why an address can't be let in now (FairShare.address_refusal), or None.
    address_refusal: Callable[[str], str | None]
    # The app's events (what /gradio_api/queue/join's fn_index names), as the app has them (Gradio's own
    # table: an app with gr.render would have more, per session; this one has none).
    events: Container[int]
    # The most bytes a request's body may have (uploads excepted; body_cap).
    max_body: int
    # What each address may move through the server.
    byte_budget: ByteBudget
    # What each address has waiting in Gradio's queue.
    waiting_room: WaitingRoom


class WaitingRoom:
    """The requests each address has waiting in Gradio's queue to start, and a limit on them.

    The fair share counts a request once it starts; until then it waits in Gradio's queue, which has room
    for --max-queue in all and tells everyone else "Queue is full" while that is taken. A script that
    sends dozens at once (36 scorings from one client, all within the queue's 20 ms poll) filled it before
    the fair share refused any. So the door lets an address have at most limit requests entering or
    waiting there: the ones it is letting through now, and those in the queue, read from the queue
    itself (at most --max-queue events to look at). Used from the server's event loop only."""

    def __init__(self, queue, limit: int):
        self.limit, self._queue = limit, queue
        self._entering: Counter[str] = Counter()

    def refusal(self, address: str) -> str | None:
        waiting = self._entering[address] + self._queued(address)
        if waiting < self.limit:
            return None
        return (
            f"Your network address already has {waiting} requests waiting to start, as many as one address may "
            "(anyone else at that address shares it). Wait a moment, then ask again."
        )

    @contextlib.contextmanager
    def entering(self, address: str) -> Iterator[None]:
        """While a request is let through to the queue: once its handler returns, it is queued or refused."""
        self._entering[address] += 1
        try:
            yield
        finally:
            self._entering[address] -= 1
            if not self._entering[address]:
                del self._entering[address]

    def _queued(self, address: str) -> int:
        waiting = getattr(self._queue, "event_queue_per_concurrency_id", {})
        return sum(
            1
            for event_queue in list(waiting.values())
            for event in list(event_queue.queue)
            if event.request is not None and event.request.client is not None and event.request.client.host == address
        )


def body_cap(settings: Settings) -> int:
    """The largest request body the server reads: the most text one request may bring (the chats the
    browser keeps or /chat's history, --max-store-chars, with a message and a system message of
    --max-message-chars each), however JSON writes it, and room for the rest. The caps on what a
    request brings apply once Gradio has read and parsed it; this one refuses a larger body first."""
    text = settings.max_store_chars + 2 * settings.max_message_chars
    return JSON_BYTES_PER_CHAR * text + BODY_OVERHEAD


class LoginThrottle:
    """Wrong logins per address within the last window; past the limit, that address waits until the
    oldest of them is a window old. Used from the server's event loop only."""

    def __init__(self, limit: int, window: float = LOGIN_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window, self._clock = limit, window, clock
        self._failures: dict[str, deque[float]] = {}

    def wait(self, address: str) -> int:
        """Seconds before this address may try again; 0 if it may now."""
        failures = self._failures.get(address, deque())
        now = self._clock()
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return math.ceil(failures[0] + self.window - now) if len(failures) >= self.limit else 0

    def failed(self, address: str) -> None:
        now = self._clock()
        # Addresses whose failures have all aged out are forgotten, so the record stays small.
        for stale in [a for a, failures in self._failures.items() if failures[-1] <= now - self.window]:
            del self._failures[stale]
        self._failures.setdefault(address, deque()).append(now)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


def received(budget: ByteBudget, address: str, receive: Receive) -> Receive:
    """The request's receive, counting its body's bytes against the address as they arrive."""

    async def counting() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            budget.spent(address, len(message.get("body", b"")))
        return message

    return counting


def sent(budget: ByteBudget, address: str, send: Send) -> Send:
    """The response's send, counting its body's bytes against the address as they go."""

    async def counting(message: Message) -> None:
        if message["type"] == "http.response.body":
            budget.spent(address, len(message.get("body", b"")))
        await send(message)

    return counting


class Guard:
    def __init__(self, app: ASGIApp, rules: Rules, throttle: LoginThrottle | None):
        self.app, self.rules, self.throttle = app, rules, throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope = self._as_the_app_sees_it(scope)
        path, post = scope["path"], scope["method"] == "POST"
        call = API_CALL.match(path) if post else None
        asks_for_work = call or (post and (path in (*QUEUE_JOIN_PATHS, UPLOAD_PATH) or path.startswith(MCP_PATH)))
        joins_queue = bool(call) or (post and path in QUEUE_JOIN_PATHS)
        if asks_for_work and await self._refused_for_now(scope, receive, send, joins_queue):
            return
        # No await since the check: the request counts as waiting before another is looked at.
        address = scope["client"][0]
        with self.rules.waiting_room.entering(address) if joins_queue else contextlib.nullcontext():
            await self._let_through(scope, receive, send, call)

    async def _let_through(self, scope: Scope, receive: Receive, send: Send, call: re.Match | None) -> None:
        path, post = scope["path"], scope["method"] == "POST"
        address, budget = scope["client"][0], self.rules.byte_budget
        receive = received(budget, address, receive)
        if path.startswith(RESULT_PATHS):
            send = sent(budget, address, send)
        if path != UPLOAD_PATH:
            capped = await self._within_cap(scope, receive, send)
            if capped is None:
                return
            receive = capped
        if post and self.throttle is not None and path in LOGIN_PATHS:
            await self._login(self.throttle, scope, receive, send)
        elif call:
            await self._api_call(call, scope, receive, send)
        elif post and path in QUEUE_JOIN_PATHS:
            await self._queue_join(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _refused_for_now(self, scope: Scope, receive: Receive, send: Send, joins_queue: bool) -> bool:
        """Refuse a request that asks for work (every queued event, API call and agent's tool call takes
        places of the fair share, and an upload is read by the event that follows it) from an address
        with none left, just refused for its limit, with as many waiting in the queue as it may, or past
        its budget of bytes; True if refused."""
        address, _ = scope["client"]
        refusal, wait = self.rules.address_refusal(address), 1
        if refusal is None and joins_queue:
            refusal = self.rules.waiting_room.refusal(address)
        if refusal is None and (wait := self.rules.byte_budget.wait(address)):
            refusal = self.rules.byte_budget.refusal(wait)
        if refusal is None:
            return False
        await asyncio.sleep(REFUSAL_PAUSE_SECONDS)
        # Gradio's page shows an upload's refusal as "HTTP 429: " and the body: plain words read best there.
        plain = scope["path"] == UPLOAD_PATH
        await _refuse(429, refusal, scope, receive, send, headers={"Retry-After": str(wait)}, plain=plain)
        return True

    def _as_the_app_sees_it(self, scope: Scope) -> Scope:
        headers = Headers(scope=scope)
        host, port = scope.get("client") or (None, 0)
        forwarded = headers.getlist("x-forwarded-for")
        address = visitor_address(host, forwarded, self.rules.trusted_proxies)
        if log.isEnabledFor(logging.DEBUG):  # what a Space owner reads to check --trusted-proxies
            said = ", ".join(forwarded) or "none"
            log.debug("%s from %s, X-Forwarded-For %s: the visitor is %s", scope["path"], host, said, address)
        scope = {**scope, "client": (address, port if address == host else 0)}
        if self.rules.own_origin_only and not _own_origin(headers):
            # Without an Origin, Gradio's CORS middleware grants the other site nothing: its page can't
            # read the answer, and a request that needs a preflight is never sent.
            scope["headers"] = [(name, value) for name, value in scope["headers"] if name != b"origin"]
        return scope

    async def _within_cap(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """The request's receive if its body is within the cap; None once it is refused (HTTP 413).
        A body that says its length is judged by it, before a byte is read; one sent in chunks is read
        here as it comes, up to the cap, and handed on whole."""
        cap, headers = self.rules.max_body, Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None:
            # uvicorn refuses a length that isn't a number, and reads no more than it says.
            within = not length.isdigit() or int(length) <= cap
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _body(receive, cap + 1)
            within, receive = len(body) <= cap, _replaying(body, receive)
        else:
            return receive  # no body
        if within:
            return receive
        message = (
            f"This request is larger than this server reads: at most {cap:,} bytes (set by --max-store-chars "
            "and --max-message-chars)."
        )
        await _refuse(413, message, scope, receive, send, {"Connection": "close"})
        return None

    async def _login(self, throttle: LoginThrottle, scope: Scope, receive: Receive, send: Send) -> None:
        address = scope["client"][0]
        wait = throttle.wait(address)
        if wait:
            message = (
                f"Too many wrong logins from your network address ({throttle.limit} within a minute). "
                f"Try again in {wait} s."
            )
            await _refuse(429, message, scope, receive, send, {"Retry-After": str(wait)})
            return

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] == 200:
                    throttle.succeeded(address)
                elif message["status"] in (400, 401):
                    throttle.failed(address)
            await send(message)

        await self.app(scope, receive, observed)

    async def _api_call(self, call: re.Match, scope: Scope, receive: Receive, send: Send) -> None:
        name = call["name"]
        endpoint = self.rules.endpoints.get(name)
        if endpoint is None:
            known = ", ".join(f"/{endpoint}" for endpoint in self.rules.endpoints)
            message = f"There is no API endpoint /{name}. This server's: {known} (GET /gradio_api/info describes them)."
            await _refuse(404, message, scope, receive, send)
            return
        body = await _body(receive)
        problem = _call_problem(endpoint, name, body, by_name=bool(call["by_name"]))
        if problem:
            await _refuse(422, problem, scope, receive, send)
            return
        await self.app(scope, _replaying(body, receive), send)

    async def _queue_join(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Gradio looks the event up without a check, so one it doesn't have was a bare 500."""
        body = await _body(receive)
        try:
            sent = json.loads(body)
        except ValueError:
            sent = None
        event = _event_named(sent)
        if event is not None and event not in self.rules.events:
            message = (
                f"fn_index {event} names no event of this app. Call its API endpoints by name "
                "(GET /gradio_api/info describes them), e.g. with gradio_client."
            )
            await _refuse(422, message, scope, receive, send)
            return
        # Whatever else is wrong (no JSON, no fn_index, a value of the wrong type), Gradio says itself.
        await self.app(scope, _replaying(body, receive), send)


def login_message(max_failed_logins: int) -> str:
    """The login page's note (Gradio's auth_message). Gradio's form shows "Incorrect credentials" for a
    400 and nothing at all for any other answer, such as the throttle's 429 with its reason, and the
    page can't be given a script: so the form says the rule before anyone needs it."""
    return (
        f"After {max_failed_logins} wrong logins within a minute from one network address, this form stops "
        "answering until the minute has passed: if signing in seems to do nothing, wait a minute and try again."
    )


def lifespan(demo, settings: Settings, share: bool, fair_share: FairShare):
    """For launch(app_kwargs={"lifespan": ...}): puts the guard around the app Gradio builds for demo."""
    endpoints = {
        name.lstrip("/"): Endpoint(
            tuple(p["parameter_name"] for p in info["parameters"]),
            frozenset(p["parameter_name"] for p in info["parameters"] if not p["parameter_has_default"]),
        )
        for name, info in demo.get_api_info()["named_endpoints"].items()
    }
    rules = Rules(
        settings.trusted_proxies,
        share or settings.auth is not None,
        endpoints,
        fair_share.address_refusal,
        demo.fns,
        body_cap(settings),
        fair_share.bytes,
        WaitingRoom(getattr(demo, "_queue", None), settings.address_limit),
    )
    throttle = LoginThrottle(settings.max_failed_logins) if settings.auth else None

    @contextlib.asynccontextmanager
    async def guarded(app):
        # The app's middleware, Gradio's CORS included, is built by now: the lifespan runs through it.
        app.middleware_stack = Guard(app.middleware_stack or app.build_middleware_stack(), rules, throttle)
        yield

    return guarded


def _own_origin(headers: Headers) -> bool:
    """Whether a browser sent this from the page itself (or sent no Origin at all)."""
    origin = headers.get("origin")
    return origin is None or urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


def _call_problem(endpoint: Endpoint, name: str, body: bytes, by_name: bool) -> str | None:
    """What is wrong with the values a call brings; None where Gradio's own checks speak (not JSON, not
    an object, no list of values) and where the app's do (each value's type and range)."""
    try:
        sent = json.loads(body)
    except ValueError:
        return None
    if not isinstance(sent, dict):
        return None
    if by_name:
        return endpoint.named_values_problem(name, sent)
    data = sent.get("data")
    return endpoint.values_problem(name, data) if isinstance(data, list) else None


def _event_named(sent) -> int | None:
    """The event a queue/join body names, read as Gradio reads it (pydantic, lax: "7", 7.0 and true
    name events too); None where Gradio refuses the body itself."""
    if not isinstance(sent, dict):
        return None
    try:
        return FN_INDEX.validate_python(sent.get("fn_index"))
    except ValidationError:
        return None


async def _refuse(
    status: int,
    message: str,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: dict | None = None,
    plain: bool = False,
) -> None:
    response = PlainTextResponse if plain else JSONResponse
    body = message if plain else {"detail": message}
    await response(body, status_code=status, headers=headers)(scope, receive, send)


async def _body(receive: Receive, most: float = math.inf) -> bytes:
    """The request's body, or its first `most` bytes and more where it is longer."""
    chunks, size = [], 0
    while size < most:
        message = await receive()
        if message["type"] != "http.request":  # the client left
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """The request's receive, giving the body already read first."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
