"""The server under attack, as bench/attack.py floods it but judged on what happens, never on time: while
one client floods a launched app with each kind of request, its requests past the limits are refused
with the reason, another visitor is admitted and answered in full, the flood's work ends once it
stops, and a new client is answered. The app runs behind an emulated Space proxy (--trusted-proxies 1),
whose entry in X-Forwarded-For each client writes."""

import sys
from pathlib import Path

import pytest
from gradio_client import Client
from support import batched, free_port, wait_for

from orca2_space.chat import Chat
from orca2_space.cli import launch
from orca2_space.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from attack import KINDS, Flood, Sizes, honest_answer

pytestmark = pytest.mark.slow

# Smaller than the bench's, and long-running answers (the model never ends them) that hold their places.
SIZES = Sizes(hostile_chars=100_000, exchanges=500, score_tokens=3000, flood_tokens=4000)
# The API's requests go through the fair share; so do the page's events once they are on the queue.
ADMITTED = ("score", "compare", "forged")
# Answers that hold their places until the flood stops: the flooder keeps its address's limit full.
HELD = ("compare", "forged")
# Over its places or its budget of bytes (guard.py): either way, the refusal names the address.
ADDRESS_REFUSAL = "Your network address"


@pytest.fixture(scope="module")
def space(never_ends):
    """The app as on a Space (its limits, one trusted proxy), over the model that never ends, batched as
    the app batches. The batch has one slot more than an address may hold: with --concurrency equal to
    --address-limit (both 8 by default) one address's long answers take every slot, and another
    visitor, admitted, waits for one of them to end (bench/attack.py measures it)."""
    limits = Settings()
    settings = Settings(
        host="127.0.0.1",
        port=free_port(),
        max_new_tokens_cap=4000,
        trusted_proxies=1,
        concurrency=limits.address_limit + 1,
    )
    assert settings.max_exchanges == SIZES.exchanges
    engine = batched(never_ends, max_concurrent=settings.concurrency)
    chat = Chat(engine, settings)
    demo = launch(chat, block=False)
    yield chat, demo.local_url
    demo.close()
    engine.close()


@pytest.mark.parametrize("kind", KINDS)
def test_under_a_flood_another_visitor_is_answered_and_the_flood_is_refused_past_its_limit(space, kind):
    chat, url = space
    limit = chat.settings.address_limit
    # A sender refused waits a moment before asking again, leaving this machine's CPU to the server.
    flood = Flood(url, kind, flooders=limit + 4, sizes=SIZES, pause=0.2).start()
    try:
        wait_for(lambda: flood.sent >= flood.flooders, f"every {kind} flooder to have sent a request")
        if kind in HELD:
            wait_for(lambda: chat.fair_share.in_progress() == limit, f"the {kind} flood to fill its address's places")
        if kind in ADMITTED:
            wait_for(lambda: flood.outcomes["refused"] > 0, f"a {kind} request past the address limit to be refused")
        honest = honest_answer(url, new_tokens=8)
        assert honest.kind == "ok", honest.message
        assert honest.final["n_tokens"] == 8 and honest.final["stop_reason"] == "length"
        if kind in HELD:  # answered while the flood's answers still held their places
            assert chat.fair_share.in_progress() == limit and "ok" not in flood.outcomes
    finally:
        tally = flood.stop()
    assert set(tally["outcomes"]) <= {"ok", "refused", "stopped"}, tally["messages"]
    assert tally["senders_left"] == 0
    # However many addresses it forged, the flooder is one address.
    assert all(ADDRESS_REFUSAL in refusal for refusal in tally["messages"].get("refused", {})), tally["messages"]
    wait_for(lambda: chat.fair_share.in_progress() == 0, f"the {kind} flood's work to end", seconds=120)
    after = Client(url, verbose=False).predict(message="After the flood", max_new_tokens=3, api_name="/chat")
    assert after["done"] and not after["error"]
