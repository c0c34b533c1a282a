"""Moderation of questions and answers, as Orca 2's model card recommends.

* ``Moderator``: the interface a moderation service implements (severity per category).
* ``AzureContentSafety``: Azure AI Content Safety through azure-ai-contentsafety 1.0 (GA API,
  api-version 2023-10-01), with deliberate timeouts and retries.
* ``Moderation``: the server's policy (threshold, categories, fail-closed or fail-open).
* ``StreamingGate``: lets answer text onto the screen only after it has passed a check.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from .settings import ModerationSettings

log = logging.getLogger(__name__)

MAX_CHARS = 10_000  # the service's limit per request
# Between tries of a throttled, failed or unreachable check: short, since a visitor is waiting.
RETRY_PAUSE_SECONDS = 0.2


class ModerationUnavailable(Exception):
    """The service could not give an answer. The message is safe to show: it never holds the key."""


class Moderator(Protocol):
    def analyze(self, text: str) -> dict[str, int]:
        """Severity (0 safe … 6) per category for at most MAX_CHARS characters; raises
        ModerationUnavailable when the service can't answer."""
        ...


class AzureContentSafety:
    """Azure AI Content Safety. The SDK's own retries are off: they follow Retry-After without a
    cap and spend seconds per call; here a failed call is retried `retries` times, quickly."""

    def __init__(self, endpoint: str, key: str, timeout: float, retries: int):
        from azure.ai.contentsafety import ContentSafetyClient
        from azure.core.credentials import AzureKeyCredential

        self._client = ContentSafetyClient(
            endpoint,
            AzureKeyCredential(key),
            retry_total=0,
            connection_timeout=timeout,
            read_timeout=timeout,
        )
        self._timeout = timeout
        self._retries = retries

    def analyze(self, text: str) -> dict[str, int]:
        from azure.ai.contentsafety.models import AnalyzeTextOptions
        from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

        for attempt in range(self._retries + 1):
            retry = attempt < self._retries
            try:
                result = self._client.analyze_text(AnalyzeTextOptions(text=text))
                return {item.category: item.severity or 0 for item in result.categories_analysis}
            except HttpResponseError as error:
                status = error.status_code
                if status in (401, 403):
                    raise ModerationUnavailable(f"the moderation service refused the key (HTTP {status})") from None
                if retry and (status == 429 or (status or 0) >= 500):
                    time.sleep(RETRY_PAUSE_SECONDS)
                    continue
                if status == 429:
                    raise ModerationUnavailable("the moderation service is throttling requests (HTTP 429)") from None
                raise ModerationUnavailable(f"the moderation service failed (HTTP {status})") from None
            except ServiceResponseError:
                # The service took longer than the timeout; waiting again would double the delay.
                raise ModerationUnavailable(
                    f"the moderation service did not answer within {self._timeout:g} s"
                ) from None
            except ServiceRequestError:
                if retry:
                    time.sleep(RETRY_PAUSE_SECONDS)
                    continue
                raise ModerationUnavailable("the moderation service could not be reached") from None
        raise AssertionError("unreachable")


class ModerationState(StrEnum):
    """What moderation did to an answer, as the page and /chat report it."""

    OFF = "off"
    PENDING = "pending"  # text is shown only after it passed
    PASSED = "passed"
    FLAGGED = "flagged"
    # The service failed: the answer is held back, or shown unmoderated if the server fails open.
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    # Categories at or over the threshold, with their severity.
    flagged: dict[str, int] = field(default_factory=dict)
    # Why the service gave no answer; with fail-open the text is allowed but not moderated.
    error: str | None = None

    @property
    def moderated(self) -> bool:
        return self.error is None

    @property
    def state(self) -> ModerationState:
        if not self.moderated:
            return ModerationState.UNAVAILABLE
        return ModerationState.PASSED if self.allowed else ModerationState.FLAGGED

    def describe(self) -> str:
        return ", ".join(f"{category} (severity {severity})" for category, severity in self.flagged.items())


def split_text(text: str, limit: int = MAX_CHARS) -> list[str]:
    """Parts of at most `limit` characters, cut at whitespace where there is some."""
    parts = []
    while len(text) > limit:
        cut = max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit))
        cut = cut + 1 if cut > 0 else limit
        parts.append(text[:cut])
        text = text[cut:]
    if text:
        parts.append(text)
    return parts


class Moderation:
    """Checks text with a Moderator under the server's policy."""

    def __init__(self, moderator: Moderator, settings: ModerationSettings):
        self.moderator = moderator
        self.settings = settings

    def check(self, text: str) -> Verdict:
        if not text.strip():
            return Verdict(allowed=True)  # nothing to judge, and the service refuses empty text
        worst: dict[str, int] = {}
        try:
            for part in split_text(text):
                for category, severity in self.moderator.analyze(part).items():
                    worst[category] = max(worst.get(category, 0), severity)
        except ModerationUnavailable as error:
            log.warning("moderation unavailable: %s", error)
            return Verdict(allowed=self.settings.fail_open, error=str(error))
        except Exception:
            log.exception("moderation check failed")
            return Verdict(allowed=self.settings.fail_open, error="the moderation check failed unexpectedly")
        # Severity 0 means safe, so even the lowest threshold never flags safe text.
        flagged = {
            category: severity
            for category, severity in worst.items()
            if category in self.settings.categories and severity >= self.settings.threshold and severity > 0
        }
        return Verdict(allowed=not flagged, flagged=flagged)

    def gate(self) -> StreamingGate:
        # A check in flight ends within the client's timeout per try, plus the pauses between tries.
        patience = (self.settings.timeout + RETRY_PAUSE_SECONDS) * (self.settings.retries + 1) + 1
        return StreamingGate(self.check, patience, fail_open=self.settings.fail_open)


def _within(seconds: float, check: Callable[[str], Verdict], text: str) -> Verdict | None:
    """check(text), or None if it has not answered after `seconds` (a hung client must not hang the chat)."""
    result: list[Verdict] = []
    worker = threading.Thread(target=lambda: result.append(check(text)), name="orca2-moderation", daemon=True)
    worker.start()
    worker.join(seconds)
    return result[0] if result else None


_BOUNDARY = re.compile(r"[.!?…:;](?=\s)|\n")


class StreamingGate:
    """Releases answer text chunk by chunk, each only after it passed moderation.

    A worker checks, while the model goes on generating, the next complete sentence (or a long
    run without one) together with a little of the text before it for context. Nothing that has
    not passed is ever released; `finish` checks the whole answer once more.
    """

    MIN_CHUNK = 40  # characters; fewer, shorter checks would cost more calls than they save delay
    MAX_CHUNK = 400  # release even without a sentence end after this much text
    CONTEXT = 200  # characters of already released text sent along with the next chunk

    def __init__(self, check: Callable[[str], Verdict], patience: float, fail_open: bool = False):
        self._check = check
        self._patience = patience
        self._fail_open = fail_open
        self._text = ""
        self._released = 0
        self._blocking: Verdict | None = None
        self._unmoderated: Verdict | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="orca2-moderation", daemon=True)
        self._worker.start()

    @property
    def released(self) -> str:
        """The text that may be shown now."""
        with self._changed:
            return self._text if self._unmoderated else self._text[: self._released]

    @property
    def blocked(self) -> Verdict | None:
        """The verdict that stopped the answer, once one has."""
        return self._blocking

    def offer(self, text: str) -> None:
        """The answer so far (each call extends the previous one)."""
        with self._changed:
            self._text = text
            self._changed.notify()

    def close(self) -> None:
        """Stop checking chunks (the worker ends after a check in flight)."""
        with self._changed:
            self._closed = True
            self._changed.notify()

    def finish(self, text: str) -> Verdict:
        """Check the whole answer; afterwards `released` is all of it, or nothing if it failed."""
        self.offer(text)
        self.close()
        self._worker.join(self._patience)
        verdict = None
        if not self._worker.is_alive():
            verdict = self._blocking or self._unmoderated or _within(self._patience, self._check, text)
        if verdict is None:
            log.warning("a moderation check outlived its timeout")
            verdict = Verdict(self._fail_open, error="the moderation service did not answer in time")
        with self._changed:
            self._released = len(text) if verdict.allowed else 0
        return verdict

    def _next_chunk_end(self) -> int | None:
        pending = self._text[self._released :]
        if len(pending) >= self.MAX_CHUNK:
            return self._released + self.MAX_CHUNK
        ends = [m.end() for m in _BOUNDARY.finditer(pending)]
        if ends and ends[-1] >= self.MIN_CHUNK:
            return self._released + ends[-1]
        return None

    def _run(self) -> None:
        while True:
            with self._changed:
                end = self._next_chunk_end()
                while not self._closed and end is None:
                    self._changed.wait()
                    end = self._next_chunk_end()
                if self._closed or end is None:
                    return
                segment = self._text[max(0, self._released - self.CONTEXT) : end]
            verdict = self._check(segment)
            with self._changed:
                if not verdict.allowed:
                    self._blocking = verdict
                    return
                if not verdict.moderated:
                    # Fail-open: the service is down, so stop waiting on it for this answer.
                    self._unmoderated = verdict
                    self._released = len(self._text)
                    return
                self._released = end
