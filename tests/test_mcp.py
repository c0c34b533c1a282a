"""Agents are visitors too: with --mcp, Gradio's MCP server offers Orca 2 as three tools (an answer, a
comparison, token probabilities), and nothing else; they answer as the API does and take places of
the caller's fair share, the caller being its address. Driven with the `mcp` SDK's own client over
streamable HTTP, against the launched app."""

import asyncio
import json

import httpx
import pytest
from gradio_client import Client
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from support import FakeBackend, Held, free_port, wait_for

from orca2_space.chat import Chat
from orca2_space.presets import SYSTEM_PRESETS
from orca2_space.settings import Settings

QUESTION = "Why is the sky blue?"
# Each agent comes through one trusted proxy, which says where it came from.
AGENT = "203.0.113.7"
ANOTHER_AGENT = "198.51.100.4"


def launched(chat: Chat):
    from orca2_space.cli import launch

    return launch(chat, block=False)


def with_tools(url: str, use, address: str = AGENT):
    """use(session) on an initialized MCP session to the app, as an agent at address."""

    async def run():
        # The MCP SDK's own client, with the header the proxy would add.
        agent = httpx.AsyncClient(headers={"X-Forwarded-For": address}, timeout=httpx.Timeout(30, read=300))
        async with (
            agent,
            streamable_http_client(f"{url}gradio_api/mcp/", http_client=agent) as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await use(session)

    return asyncio.run(run())


def call(url: str, tool: str, address: str = AGENT, **arguments):
    return with_tools(url, lambda session: session.call_tool(tool, arguments), address)


def result(called) -> dict:
    assert not called.isError, called.content
    return json.loads(called.content[0].text)


@pytest.fixture(scope="module")
def agents_app(tiny_engine):
    """The app on the tiny model (greedy answers are its own), with --mcp, behind one trusted proxy."""
    settings = Settings(host="127.0.0.1", port=free_port(), max_new_tokens_cap=256, mcp=True, trusted_proxies=1)
    demo = launched(Chat(tiny_engine, settings))
    yield demo.local_url
    demo.close()


def test_the_tools_are_an_answer_a_comparison_and_token_probabilities_each_described(agents_app):
    tools = with_tools(agents_app, lambda session: session.list_tools()).tools
    assert sorted(tool.name for tool in tools) == ["answer", "compare", "token_probabilities"]
    for tool in tools:
        assert "Returns: JSON text" in (tool.description or "")
        properties = tool.inputSchema["properties"]
        assert all(schema.get("description") for schema in properties.values()), tool.name
    answer = next(tool for tool in tools if tool.name == "answer")
    assert answer.inputSchema["required"] == ["message"]
    assert {"system_message", "preset", "max_new_tokens", "do_sample", "seed"} <= answer.inputSchema[
        "properties"
    ].keys()


def test_the_api_s_other_endpoints_are_not_tools(agents_app):
    for endpoint in ("chat_endpoint", "compare_endpoint", "inspect_prompt", "token_probabilities_endpoint"):
        called = call(agents_app, endpoint, message="Hi")
        assert called.isError and "Unknown tool" in called.content[0].text


def test_the_answer_tool_gives_what_chat_gives(agents_app):
    preset = "Step-by-step"
    answered = result(call(agents_app, "answer", message=QUESTION, preset=preset, max_new_tokens=24))
    chat = Client(agents_app, verbose=False).predict(
        message=QUESTION, system_message=SYSTEM_PRESETS[preset], single_turn=True, max_new_tokens=24, api_name="/chat"
    )
    assert answered["answer_ids"] and answered["n_tokens"] == len(answered["answer_ids"])
    assert answered == chat | {"tokens_per_second": answered["tokens_per_second"]}


def test_the_comparison_tool_answers_each_system_message_as_the_answer_tool_does(agents_app):
    systems = ["", SYSTEM_PRESETS["Step-by-step"]]
    compared = result(call(agents_app, "compare", message=QUESTION, system_messages=systems, max_new_tokens=16))
    for system, answer in zip(systems, compared["answers"], strict=True):
        alone = result(call(agents_app, "answer", message=QUESTION, system_message=system, max_new_tokens=16))
        assert answer["answer_ids"] == alone["answer_ids"] and answer["answer"] == alone["answer"]


def test_the_token_probabilities_tool_scores_the_answer_tools_ids_as_the_api_does(agents_app):
    answered = result(call(agents_app, "answer", message=QUESTION, system_message="", max_new_tokens=12))
    ids = answered["answer_ids"]
    scored = result(call(agents_app, "token_probabilities", message=QUESTION, system_message="", answer_ids=ids))
    api = Client(agents_app, verbose=False).predict(
        message=QUESTION, system_message="", answer_ids=ids, api_name="/token_probabilities"
    )
    assert [token["id"] for token in scored["tokens"]] == ids
    assert scored == api


def test_a_bad_call_is_refused_with_the_reason(agents_app):
    called = call(agents_app, "compare", message="Hi", system_messages=["only one"])
    assert called.isError and "system_messages must be a list of 2 to 4 texts" in called.content[0].text


@pytest.fixture
def held_agents_app(tokenizer):
    """The app over a model whose answers stay in progress until released, with --mcp and the default limits."""
    held = Held()
    backend = FakeBackend(tokenizer, ["\n", "The", " answer"], held=held)
    chat = Chat(backend, Settings(host="127.0.0.1", port=free_port(), mcp=True, trusted_proxies=1))
    demo = launched(chat)
    yield chat, held, demo.local_url
    held.release()
    demo.close()


def test_a_flood_from_one_agent_is_refused_past_its_share_and_another_agent_is_answered(held_agents_app):
    chat, held, url = held_agents_app
    assert chat.settings.visitor_limit == 4

    async def flood(session):
        return await asyncio.gather(*(session.call_tool("answer", {"message": f"Part {n}"}) for n in range(10)))

    async def hold_and_then_ask_another(session):
        calls = asyncio.ensure_future(flood(session))
        # Every call of the flood is either refused or holding its place: none waits in a line.
        while held.waiting < 4:
            await asyncio.sleep(0.01)
        another = asyncio.ensure_future(asyncio.to_thread(call, url, "answer", ANOTHER_AGENT, message="Hi"))
        while held.waiting < 5:
            await asyncio.sleep(0.01)
        assert chat.fair_share.in_progress() == 5
        held.release()
        return await calls, await another

    flooded, answered = with_tools(url, hold_and_then_ask_another)
    refused = [called.content[0].text for called in flooded if called.isError]
    assert len(refused) == 6 and all("You already have 4 requests running or waiting" in r for r in refused)
    assert [result(called)["answer"] for called in flooded if not called.isError] == ["The answer"] * 4
    assert result(answered)["answer"] == "The answer"
    wait_for(lambda: chat.fair_share.in_progress() == 0, "every place to be given back")


def test_a_comparison_counts_as_its_answers_for_an_agent_too(held_agents_app):
    chat, held, url = held_agents_app

    async def answer_then_compare_4(session):
        first = asyncio.ensure_future(session.call_tool("answer", {"message": "Hi"}))
        while held.waiting < 1:
            await asyncio.sleep(0.01)
        compared = await session.call_tool("compare", {"message": "Hi", "system_messages": ["A", "B", "C", "D"]})
        held.release()
        return compared, await first

    compared, first = with_tools(url, answer_then_compare_4)
    assert compared.isError and "this one counts 4 (one per answer it runs)" in compared.content[0].text
    assert result(first)["answer"] == "The answer"
    wait_for(lambda: chat.fair_share.in_progress() == 0, "every place to be given back")


def test_without_mcp_there_is_no_mcp_server(launched_chat):
    _, url = launched_chat
    response = httpx.post(f"{url}gradio_api/mcp/", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert response.status_code == 404
