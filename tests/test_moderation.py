"""Moderation through the real azure-ai-contentsafety client, over HTTP, against a local server that
speaks the service's wire protocol."""

import logging
import threading

import pytest
from support import SAFETY_KEY

from orca2_space.moderation import MAX_CHARS, AzureContentSafety, Moderation, split_text
from orca2_space.settings import ModerationSettings


def azure(server, key=SAFETY_KEY, timeout=2.0, retries=1, **policy) -> Moderation:
    settings = ModerationSettings(endpoint=server.endpoint, key=key, timeout=timeout, retries=retries, **policy)
    return Moderation(AzureContentSafety(settings.endpoint, settings.key, settings.timeout, settings.retries), settings)


def test_requests_follow_the_services_wire_protocol(safety_server):
    azure(safety_server).check("Hello there")
    (request,) = safety_server.requests
    assert request.path == "/contentsafety/text:analyze"
    assert "api-version=2023-10-01" in request.query
    assert request.key == SAFETY_KEY
    assert request.text == "Hello there"


def test_safe_text_is_allowed(safety_server):
    verdict = azure(safety_server).check("A calm afternoon by the lake.")
    assert verdict.allowed and verdict.moderated and verdict.flagged == {}


@pytest.mark.parametrize("category", ["Hate", "SelfHarm", "Sexual", "Violence"])
def test_each_category_at_the_threshold_is_flagged_and_named(safety_server, category):
    safety_server.behaviour.triggers = {"trigger": (category, 4)}
    verdict = azure(safety_server).check("a trigger word")
    assert not verdict.allowed
    assert verdict.flagged == {category: 4}
    assert verdict.describe() == f"{category} (severity 4)"


@pytest.mark.parametrize(
    "threshold, severity, flagged",
    [(4, 2, False), (4, 4, True), (4, 6, True), (6, 4, False), (2, 2, True), (0, 2, True), (0, 0, False)],
)
def test_the_threshold_decides(safety_server, threshold, severity, flagged):
    safety_server.behaviour.triggers = {"trigger": ("Hate", severity)}
    assert azure(safety_server, threshold=threshold).check("trigger").allowed is not flagged


def test_only_the_configured_categories_count(safety_server):
    safety_server.behaviour.triggers = {"trigger": ("Hate", 6)}
    assert azure(safety_server, categories=("Violence",)).check("trigger").allowed
    assert not azure(safety_server, categories=("Hate", "Violence")).check("trigger").allowed


def test_text_over_10000_characters_is_split_and_every_part_checked(safety_server):
    text = ("calm words " * 2500) + "violent ending"
    verdict = azure(safety_server).check(text)
    parts = safety_server.texts()
    assert len(parts) == 3
    assert all(len(p) <= MAX_CHARS for p in parts)
    assert "".join(parts) == text
    assert verdict.flagged == {"Violence": 6}


def test_split_text_cuts_at_whitespace_and_keeps_every_character():
    text = "word " * 5000
    parts = split_text(text, limit=1000)
    assert "".join(parts) == text
    assert all(len(p) <= 1000 and p.endswith(" ") for p in parts)
    assert split_text("x" * 2500, limit=1000) == ["x" * 1000, "x" * 1000, "x" * 500]


@pytest.mark.parametrize(
    "status, message, attempts",
    [
        (401, "refused the key (HTTP 401)", 1),
        (403, "refused the key (HTTP 403)", 1),
        (429, "throttling requests (HTTP 429)", 2),
        (500, "failed (HTTP 500)", 2),
        (503, "failed (HTTP 503)", 2),
    ],
)
def test_service_errors_fail_closed_with_a_clear_reason(safety_server, status, message, attempts):
    safety_server.behaviour.status = status
    verdict = azure(safety_server).check("hello")
    assert not verdict.allowed and not verdict.moderated
    assert message in verdict.error
    assert len(safety_server.requests) == attempts  # one bounded retry, none for a refused key


def test_a_wrong_key_is_refused_by_the_service(safety_server):
    verdict = azure(safety_server, key="wrong-key").check("hello")
    assert "refused the key (HTTP 401)" in verdict.error


def test_fail_open_lets_text_through_marked_unmoderated(safety_server):
    safety_server.behaviour.status = 500
    verdict = azure(safety_server, fail_open=True).check("hello")
    assert verdict.allowed and not verdict.moderated


def test_a_long_retry_after_is_not_obeyed(safety_server):
    safety_server.behaviour.status = 429
    safety_server.behaviour.retry_after = "3600"
    result = []
    worker = threading.Thread(target=lambda: result.append(azure(safety_server).check("hello")), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert result, "the check waited for the server's Retry-After"
    assert "HTTP 429" in result[0].error


def test_a_slow_service_times_out_without_retrying(safety_server):
    safety_server.behaviour.delay = 3
    verdict = azure(safety_server, timeout=0.3).check("hello")
    assert verdict.error == "the moderation service did not answer within 0.3 s"
    assert len(safety_server.requests) == 1


def test_a_refused_connection_is_reported():
    class Closed:
        endpoint = "http://127.0.0.1:9"  # discard port: nothing listens

    verdict = azure(Closed).check("hello")
    assert verdict.error == "the moderation service could not be reached"


def test_empty_text_needs_no_check(safety_server):
    assert azure(safety_server).check("  ").allowed
    assert safety_server.requests == []


def test_the_key_never_appears_in_logs_or_errors(safety_server, caplog):
    caplog.set_level(logging.DEBUG)
    moderation = azure(safety_server)
    moderation.check("hello")
    safety_server.behaviour.status = 500
    failed = moderation.check("hello")
    bad_key = azure(safety_server, key=SAFETY_KEY + "-wrong").check("hello")
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert logged  # the SDK did log its requests
    assert SAFETY_KEY not in logged
    assert SAFETY_KEY not in failed.error and SAFETY_KEY not in bad_key.error
    assert SAFETY_KEY not in repr(moderation.settings)


class StuckService:
    """A Moderator whose check never returns until released: a hung client, not a slow server."""

    def __init__(self):
        self.release = threading.Event()

    def analyze(self, text: str) -> dict[str, int]:
        self.release.wait()
        return {}


def test_a_check_that_outlives_its_timeout_ends_the_answer_as_unavailable():
    stuck = StuckService()
    gate = Moderation(stuck, ModerationSettings(endpoint="http://127.0.0.1:9", key="k", timeout=0.1, retries=0)).gate()
    try:
        text = "A sentence long enough to be checked on its own, as soon as it ends. And more"
        verdict = gate.finish(text)  # returns although the check in flight never does
    finally:
        stuck.release.set()
    assert not verdict.allowed and verdict.error == "the moderation service did not answer in time"
    assert gate.released == ""
