"""A small version of bench/load.py: 16 clients at once against the launched app, on loopback."""

import sys
import threading
from pathlib import Path

import pytest
from support import free_port

from orca2_space.chat import Chat
from orca2_space.cli import launch
from orca2_space.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from load import run_load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_queue_app(tiny_engine):
    # 16 visitors, all on loopback: the per-address limit would otherwise be the one to refuse them.
    settings = Settings(host="127.0.0.1", port=free_port(), concurrency=1, max_queue=6, address_limit=16)
    demo = launch(Chat(tiny_engine, settings), block=False)
    yield demo.local_url
    demo.close()


def test_sixteen_clients_at_once_get_answers_or_a_clear_busy_message(small_queue_app):
    from gradio_client import Client

    outcomes = run_load(small_queue_app, clients=16, requests=2, max_new_tokens=12, timeout=120)
    assert len(outcomes) == 32  # none lost
    kinds = {o["outcome"] for o in outcomes}
    assert kinds <= {"ok", "busy"}, [o for o in outcomes if o["outcome"] not in ("ok", "busy")]
    assert any(o["outcome"] == "busy" for o in outcomes)  # the queue has a maximum size
    assert all(o["tokens"] == 12 for o in outcomes if o["outcome"] == "ok")
    # After the crowd: no generation left running, and the next visitor is served.
    for worker in [t for t in threading.enumerate() if t.name == "orca2-generate"]:
        worker.join(timeout=60)
        assert not worker.is_alive()
    assert Client(small_queue_app, verbose=False).predict(message="after", max_new_tokens=3, api_name="/chat")["done"]
