"""A fair share of one model for everyone: each visitor, and each network address, may have only a few
requests running or waiting, and a request over a limit is refused at once with the reason.

A request counts as the answers it runs: an answer, a token scoring or a prompt inspection is one
place, a comparison one per system message, so that a comparison of 4 weighs what 4 answers do.

Without this, one script that queues many long answers makes every other visitor wait behind all of
them. Requests are let in here, not held in Gradio's queue: the model's own scheduler (the batch, or
the engine's turn for answers run alone) is the only place a request waits, so a visitor who is
within the limits starts at the next decode step. The batch shares its places between addresses
(sharer), so the answers one address may have in progress can't keep them from another's.

Where the page offers Sign in with Hugging Face, a signed-in visitor is their account, whichever page
or tab they ask from, and the server's owner may give visitors who haven't signed in a smaller share
and keep heavy requests (Heavy) for signed-in ones.

An address also has a budget of the bytes it moves through the server (ByteBudget): the door
(ui/guard.py) counts them and refuses requests for work past it, and the page's own work takes its
address's turn (FairShare.page_work), so that what one request moved is counted before the next starts.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .settings import ADDRESS_BURST_SECONDS, MIB, InvalidRequest


@dataclass(frozen=True)
class Visitor:
    """Who asks: a page session, an API client or a signed-in account, and the network address it comes
    from."""

    session: str
    address: str
    # Signed in with Hugging Face: session is then the account (adapters.visitor_of).
    signed_in: bool = False


def sharer(visitor: Visitor | None) -> str:
    """Between whom a backend shares the places it serves at once (Backend.generate's whose): network
    addresses, as the limits here count them, since one client may open many sessions. The app's own
    requests (visitor None) are one more."""
    return "" if visitor is None else visitor.address


class Heavy(enum.Enum):
    """A request heavy enough that the server's owner may keep it for signed-in visitors (--sign-in-for-heavy);
    its value is what it does, as a refusal says it."""

    COMPARISON = "compare system messages"
    EVALUATION = "evaluate questions under system messages"


def visitor_address(peer: str | None, forwarded_for: Sequence[str], trusted_proxies: int) -> str:
    """The network address a request comes from, as the operator's proxies saw it.

    Each of the trusted_proxies proxies in front of the server appends the address it sees to
    X-Forwarded-For, so the visitor's is the entry that many from the right; whatever the client wrote
    itself is further left and ignored (as uvicorn's --forwarded-allow-ips and Werkzeug's
    ProxyFix(x_for=N) read it). forwarded_for holds every X-Forwarded-For header's value, in order.
    Without trusted proxies, or with fewer entries than them, it is the connection's own peer."""
    entries = [entry.strip() for value in forwarded_for for entry in value.split(",")]
    if trusted_proxies and len(entries) >= trusted_proxies and entries[-trusted_proxies]:
        return counted_address(entries[-trusted_proxies])
    return counted_address(peer) if peer else "unknown"


# An IPv6 network hands each home or phone a /64 of its own (RFC 6177 suggests a /56 or /48 per site),
# and any machine in it may take as many of its 2^64 addresses as it likes: each would be a new address
# with limits and a budget of its own. The /64 is what one machine can't get out of, as Cloudflare's and
# nginx's per-client limits count IPv6.
IPV6_NETWORK_BITS = 64


def counted_address(address: str) -> str:
    """What the limits count as one network address: an IPv4 address as it is, an IPv6 one as its /64
    network (an IPv4 address written as IPv6 as the IPv4 one), either without a port a proxy wrote after
    it (1.2.3.4:5678, [2001:db8::1]:5678: each connection would be an address of its own), and anything
    else (a test client's name) as it is."""
    try:
        parsed = ipaddress.ip_address(_without_port(address))
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, IPV6_NETWORK_BITS), strict=False))
    return str(parsed)


def _without_port(address: str) -> str:
    if address.startswith("[") and "]" in address:
        return address[1 : address.index("]")]
    host, colon, port = address.rpartition(":")
    return host if colon and host.count(":") == 0 and port.isdigit() else address


# An address just refused for its limit is refused at the door (address_refusal) for this long: a script
# asking again at once would otherwise cost the server a trip through Gradio's queue each time.
REFUSED_ADDRESS_SECONDS = 1.0


class Refused(InvalidRequest):
    """A request over a limit; the message says which and what to do."""


@dataclass(frozen=True)
class Limits:
    per_visitor: int
    per_address: int
    total: int
    # For a visitor who hasn't signed in (every one where the page offers no sign-in); None: per_visitor.
    per_anonymous_visitor: int | None = None
    # The page offers Sign in with Hugging Face, so a refusal can say what signing in would give.
    sign_in_offered: bool = False
    # Heavy requests only for signed-in visitors.
    sign_in_for_heavy: bool = False
    # The bytes an address may move through the server a second (ByteBudget).
    address_bytes_per_second: float = math.inf

    def per(self, visitor: Visitor) -> int:
        """How many places this visitor may hold."""
        return self.per_visitor if visitor.signed_in else self.per_anonymous

    @property
    def per_anonymous(self) -> int:
        """How many places a visitor who hasn't signed in may hold: never more than a signed-in one."""
        return min(self.per_anonymous_visitor or self.per_visitor, self.per_visitor)


class ByteBudget:
    """The bytes each network address moves through the server, against a budget that refills at a
    steady rate and may run into debt (a token bucket that lends): a request for work is let in while
    its address is within budget, however large, and its address then waits as long as the budget
    takes to refill.

    Why bytes: every page event brings the chats the browser keeps, and its work (reading, rendering,
    exporting them) follows what it reads and writes: about 40 ms of CPU per MB to show a conversation,
    60 to export one, on 2 cores (docs/performance.md, "Under attack"). So bytes bound the CPU one
    address takes from the model, and what a request brings is known before any of its work is done."""

    def __init__(self, per_second: float, burst_seconds: float = ADDRESS_BURST_SECONDS, clock=time.monotonic) -> None:
        self.per_second, self.most, self._clock = per_second, per_second * burst_seconds, clock
        self._lock = threading.Lock()
        # Each address's balance in bytes, as of a time; an address absent has the most.
        self._balances: dict[str, tuple[float, float]] = {}
        self._forgotten = clock()

    def wait(self, address: str, brought: int = 0) -> int:
        """Whole seconds before this address is within budget again; 0 if it is now. brought: the bytes
        the request asking brought, already counted, which were let in with it."""
        with self._lock:
            balance = self._balance(address, self._clock()) + brought
        return 0 if balance > 0 else max(1, math.ceil(-balance / self.per_second))

    def refusal(self, wait: int) -> str:
        """Why a request for work is refused while its address waits `wait` seconds for its budget."""
        return (
            f"Your network address has moved more data through this server than it allows one address "
            f"({self.per_second * 60 / MIB:g} MiB a minute, counting the chats your browser sends with most "
            f"of the page's requests and what comes back); everyone behind that address shares it. "
            f"Try again in {wait} s."
        )

    def spent(self, address: str, size: int) -> None:
        with self._lock:
            now = self._clock()
            self._balances[address] = (self._balance(address, now) - size, now)
            if now - self._forgotten > ADDRESS_BURST_SECONDS:
                # Addresses whose budget has refilled are forgotten, so the record stays small.
                self._balances = {a: b for a, b in self._balances.items() if self._balance(a, now) < self.most}
                self._forgotten = now

    def _balance(self, address: str, now: float) -> float:
        balance, at = self._balances.get(address, (self.most, now))
        return min(self.most, balance + (now - at) * self.per_second)


class FairShare:
    """Counts the places in use (requests running or waiting, each as the answers it runs) per visitor,
    per address and in all, and the bytes each address moves (bytes)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.bytes = ByteBudget(limits.address_bytes_per_second)
        self._lock = threading.Lock()
        # Each address's turn for the page's work, and how many requests hold or wait for it.
        self._turns: dict[str, tuple[threading.Lock, int]] = {}
        self._sessions: Counter[tuple[bool, str]] = Counter()
        self._addresses: Counter[str] = Counter()
        self._total = 0
        self._listeners: list[Callable[[], None]] = []
        # When each address was last refused for its limit, and why.
        self._refused: dict[str, tuple[float, str]] = {}

    @contextlib.contextmanager
    def listening(self, listener: Callable[[], None]) -> Iterator[None]:
        """Call listener (quickly: it runs in the admitting request's thread) after each request is let in,
        while in the block: how an evaluation knows at once that others want the batch."""
        with self._lock:
            self._listeners.append(listener)
        try:
            yield
        finally:
            with self._lock:
                self._listeners.remove(listener)

    @contextlib.contextmanager
    def admit(self, visitor: Visitor | None, places: int = 1, heavy: Heavy | None = None) -> Iterator[None]:
        """Hold places while the request is in progress; Refused at once if there are not enough, or if
        the request is heavy and the server keeps those for signed-in visitors (check_heavy).
        Requests from within the app (visitor None) count toward the total only."""
        if heavy is not None:
            self.check_heavy(visitor, heavy)
        self._take(visitor, places)
        try:
            yield
        finally:
            self._give_back(visitor, places)

    @contextlib.contextmanager
    def page_work(self, visitor: Visitor, brought: int = 0) -> Iterator[None]:
        """For the page's own work (reading, showing, exporting what the browser keeps): a place, then its
        address's turn, one such request at a time, and Refused if the address is then past its budget
        of bytes, not counting the `brought` bytes of the request itself, let in whole at the door.
        Taking turns counts what each request moved before the next starts: at once, an address's 8
        places let it start 8 large exports within its budget, and owe 8 times what it may."""
        with self.admit(visitor), self._turn(visitor.address):
            wait = self.bytes.wait(visitor.address, brought)
            if wait:
                raise Refused(self.bytes.refusal(wait))
            yield

    @contextlib.contextmanager
    def _turn(self, address: str) -> Iterator[None]:
        with self._lock:
            turn, users = self._turns.get(address, (threading.Lock(), 0))
            self._turns[address] = (turn, users + 1)
        try:
            with turn:
                yield
        finally:
            with self._lock:
                users = self._turns[address][1] - 1
                if users:
                    self._turns[address] = (turn, users)
                else:
                    del self._turns[address]

    def check_heavy(self, visitor: Visitor | None, heavy: Heavy) -> None:
        """Refused where this server keeps heavy requests for signed-in visitors and this one isn't; for a
        request that checks before it takes its places (admit checks too)."""
        if visitor is None or visitor.signed_in or not self.limits.sign_in_for_heavy:
            return
        raise Refused(
            f"Sign in with Hugging Face (the button at the top of the page) to {heavy.value}: this server keeps "
            "them for signed-in visitors. A script or an agent can't sign in; it can run its own copy of the app."
        )

    def _take(self, visitor: Visitor | None, places: int) -> None:
        limits = self.limits
        with self._lock:
            if visitor is not None:
                held, most = self._sessions[_key(visitor)], limits.per(visitor)
                if places > most:
                    raise Refused(
                        f"This request counts {places} (one per answer it runs): more than this server lets one "
                        f"visitor have at once ({most})." + self.sign_in_hint(visitor)
                    )
                if held + places > most:
                    raise Refused(
                        _over("You already have", held, places, most, "visitor")
                        + ". Wait for one to finish, or stop it, then ask again."
                        + self.sign_in_hint(visitor)
                    )
                held = self._addresses[visitor.address]
                if held + places > limits.per_address:
                    raise Refused(
                        self._remember_refusal(visitor.address, _address_over(held, places, limits.per_address))
                    )
            if self._total + places > limits.total:
                raise Refused(
                    f"The server is busy: {self._total} requests are running or waiting. Try again in a minute."
                )
            self._total += places
            if visitor is not None:
                self._sessions[_key(visitor)] += places
                self._addresses[visitor.address] += places
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def address_refusal(self, address: str) -> str | None:
        """Why a request from this address is refused before it is looked at: every place its address
        may hold is taken, or the address was refused for its limit within REFUSED_ADDRESS_SECONDS. For a
        check at the door (guard.py), before any work is spent on the request."""
        with self._lock:
            held = self._addresses.get(address, 0)
            when, why = self._refused.get(address, (-math.inf, None))
        if held >= self.limits.per_address:
            return _address_over(held, 1, self.limits.per_address)
        return why if time.monotonic() - when <= REFUSED_ADDRESS_SECONDS else None

    def _remember_refusal(self, address: str, why: str) -> str:
        """Note an address's refusal for its limit (call with _lock held); the ones past their time go."""
        now = time.monotonic()
        self._refused = {a: r for a, r in self._refused.items() if now - r[0] <= REFUSED_ADDRESS_SECONDS}
        self._refused[address] = (now, why)
        return why

    def sign_in_hint(self, visitor: Visitor) -> str:
        """What signing in would give a visitor refused for their share: a sentence, or nothing."""
        limits = self.limits
        if visitor.signed_in or not limits.sign_in_offered or limits.per_visitor <= limits.per_anonymous:
            return ""
        return f" Signed in with Hugging Face (the button at the top of the page), you may have {limits.per_visitor}."

    def _give_back(self, visitor: Visitor | None, places: int) -> None:
        with self._lock:
            self._total -= places
            if visitor is not None:
                _less(self._sessions, _key(visitor), places)
                _less(self._addresses, visitor.address, places)

    def in_progress(self) -> int:
        """Places in use, in all."""
        with self._lock:
            return self._total


def _less(counts: Counter, key, places: int) -> None:
    counts[key] -= places
    if not counts[key]:
        del counts[key]


def _key(visitor: Visitor) -> tuple[bool, str]:
    """Whose places these are. A page session's name is the client's to choose, so an account is kept
    apart from it: a session named like an account can't take that account's places."""
    return visitor.signed_in, visitor.session


def _address_over(held: int, places: int, limit: int) -> str:
    return (
        _over("Your network address already has", held, places, limit, "address")
        + "; everyone behind that address shares it. Wait for one to finish, then ask again."
    )


def _over(holder: str, held: int, places: int, limit: int, per: str) -> str:
    """Why a request doesn't fit a limit: "You already have 4 requests running or waiting, ..."."""
    have = f"{holder} {held} request{'' if held == 1 else 's'} running or waiting"
    if places == 1:
        return f"{have}, this server's limit per {per} (a comparison counts one per answer)"
    return f"{have}, and this one counts {places} (one per answer it runs): more than this server's {limit} per {per}"
