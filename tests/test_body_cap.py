"""A request's body is capped at the HTTP layer, before Gradio reads or parses it: a body that says
it is longer than the cap is refused at once, one sent in chunks once it passes the cap, each with
the cap in the message; uploads keep Gradio's own cap. Every check goes through a launched server."""

import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import free_port

from orca2_space.chat import Chat
from orca2_space.cli import launch
from orca2_space.settings import Settings
from orca2_space.ui.guard import body_cap

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def capped_app(never_ends):
    """The smallest caps the settings allow, so that a body over them is about 1 MiB; uploads may be larger."""
    settings = Settings(host="127.0.0.1", port=free_port(), max_store_chars=1000, max_message_chars=10, max_upload_mb=3)
    demo = launch(Chat(never_ends, settings), block=False)
    yield body_cap(settings), demo.local_url
    demo.close()


def test_the_cap_follows_the_settings_for_text_however_json_writes_it():
    settings = Settings(max_store_chars=5_000_000, max_message_chars=100_000)
    # \u0001 is 6 bytes of JSON for 1 character.
    assert body_cap(settings) == 6 * (5_000_000 + 2 * 100_000) + MIB
    assert body_cap(Settings(max_store_chars=2_000_000)) < body_cap(settings)


def test_a_body_that_says_it_is_over_the_cap_is_refused_before_it_is_sent(capped_app):
    cap, url = capped_app
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        # The headers only: a server that waited for the body would never answer.
        connection.sendall(
            f"POST /gradio_api/queue/join HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10 * cap}\r\n\r\n".encode()
        )
        answer = b""
        while b"}" not in answer:
            answer += connection.recv(4096)
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413")
    assert f"at most {cap:,} bytes" in json.loads(body)["detail"]


def chunks(size: int, chunk: int = 64 * 1024):
    sent = 0
    while sent < size:
        yield b" " * min(chunk, size - sent)
        sent += chunk


def test_a_chunked_body_is_refused_once_it_passes_the_cap(capped_app):
    cap, url = capped_app
    # A generator has no length: httpx sends it in chunks.
    refused = httpx.post(url + "gradio_api/queue/join", content=chunks(3 * cap), timeout=60)
    assert refused.status_code == 413 and f"at most {cap:,} bytes" in refused.json()["detail"]


def test_a_chunked_body_within_the_cap_is_handed_on_whole(capped_app):
    cap, url = capped_app
    padded = json.dumps({"data": ["one value"], "padding": " " * (cap - 100)}).encode()
    assert len(padded) <= cap
    answered = httpx.post(url + "gradio_api/call/chat", content=iter([padded[:1000], padded[1000:]]), timeout=60)
    # Read whole and parsed: the API call's check counts the values it brings.
    assert answered.status_code == 422 and "got 1" in answered.json()["detail"]


def test_an_upload_keeps_gradios_own_cap(capped_app):
    cap, url = capped_app
    larger_than_a_body = {"files": ("chat.json", b"{" + b" " * (cap + MIB) + b"}", "application/json")}
    assert httpx.post(url + "gradio_api/upload", files=larger_than_a_body, timeout=60).status_code == 200
    over_upload_cap = {"files": ("chat.json", b" " * (3 * MIB + 1), "application/json")}
    assert httpx.post(url + "gradio_api/upload", files=over_upload_cap, timeout=60).status_code == 413
