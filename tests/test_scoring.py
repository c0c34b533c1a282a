"""Token probabilities: a finished answer re-scored over its exact prompt, exact for the ids the model
wrote (greedy, sampled, batched or not), on the local model (in chunks whose passes let answers' go
first, with the numbers of one pass), on ZeroGPU, and from an inference server's prompt
log-probabilities where it has them (vLLM), or a clear "unavailable"."""

import math
import threading
import time

import pytest
import torch
from make_tiny_model import build_tiny_model
from openai_stub import OpenAIStub, Script, stub_prompt_logprobs
from support import FIXTURES, TransformersServe, batched, fake_alternatives, fake_probability, prompt_for, wait_for

from orca2_space.backends.contract import GenerationError, ScoringUnavailable
from orca2_space.backends.inference_server import DIALECTS, InferenceServer
from orca2_space.backends.local import zerogpu as zerogpu_module
from orca2_space.backends.local.engine import Engine
from orca2_space.backends.local.generation import one_forward_at_a_time
from orca2_space.backends.local.scoring import CPU_SCORE_CHUNK, GPU_SCORE_CHUNK, score_chunk, score_ids
from orca2_space.chat import Chat
from orca2_space.prompt import IM_END, Turn, answer_text
from orca2_space.scoring import as_api_dict, token_probabilities
from orca2_space.settings import GenerationParams, InferenceServerSettings, InvalidRequest, Settings

EMOJI_ANSWER = "Hi 😀 é!"  # the emoji is four byte-fallback tokens
SYSTEM = "You are Orca."
HISTORY = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]


def chat_over(engine) -> Chat:
    return Chat(engine, Settings(max_new_tokens_cap=4000))


def final_update(chat: Chat, message="How are you?", history=(), **params):
    request = chat.request(message, SYSTEM, list(history), **{"max_new_tokens": 40, **params})
    *_, final = chat.respond(request)
    assert final.done and final.error is None
    return final


def reference_probabilities(engine: Engine, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """The plain model forward over everything, softmax at temperature 1: what scoring must equal."""
    with torch.inference_mode():
        logits = engine.model(torch.tensor([prompt_ids + answer_ids])).logits[0].float()
    return torch.softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)


def assert_exact(engine: Engine, prompt_ids, answer_ids, tokens) -> None:
    """Each token is the given id with the model's own probability, and its top 5 are the model's."""
    reference = reference_probabilities(engine, prompt_ids, answer_ids)
    assert [t.id for t in tokens] == answer_ids
    for token, row in zip(tokens, reference, strict=True):
        assert token.probability == pytest.approx(row[token.id].item(), rel=1e-4)
        best = row.topk(5)
        assert [alt.id for alt in token.top] == best.indices.tolist()
        assert [alt.probability for alt in token.top] == pytest.approx(best.values.tolist(), rel=1e-4)


def assert_well_formed(tokens) -> None:
    for token in tokens:
        assert 0 < token.probability <= 1 and len(token.top) == 5
        probabilities = [alt.probability for alt in token.top]
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0 < p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-6
        if any(alt.id == token.id for alt in token.top):
            assert token.probability == next(alt.probability for alt in token.top if alt.id == token.id)
        else:
            assert token.probability <= probabilities[-1] + 1e-6


# The local model


@pytest.mark.parametrize("history", [(), HISTORY], ids=["single turn", "with history"])
def test_every_token_of_a_greedy_answer_is_the_models_most_likely(tiny_engine, history):
    chat = chat_over(tiny_engine)
    final = final_update(chat, history=history)
    assert not final.stats.batched
    tokens = token_probabilities(chat, "How are you?", SYSTEM, list(history), final.answer, list(final.answer_ids))
    # Only the exact prompt the answer was written for makes every greedy choice the argmax.
    assert [t.id for t in tokens] == list(final.answer_ids)
    assert all(t.top[0].id == t.id and t.top[0].probability == t.probability for t in tokens)
    prompt = chat.inspect("How are you?", SYSTEM, list(history))
    assert_exact(tiny_engine, prompt.input_ids, list(final.answer_ids), tokens)
    assert answer_text("".join(t.text for t in tokens)) == final.answer


def test_a_batched_greedy_answer_scores_the_same(batched_tiny, tiny_engine):
    chat = chat_over(batched_tiny)
    final = final_update(chat)
    assert final.stats.batched
    tokens = token_probabilities(chat, "How are you?", SYSTEM, [], final.answer, list(final.answer_ids))
    assert all(t.top[0].id == t.id for t in tokens)
    ids = list(final.answer_ids)
    alone = token_probabilities(chat_over(tiny_engine), "How are you?", SYSTEM, [], final.answer, ids)
    assert [(t.id, t.text) for t in alone] == [(t.id, t.text) for t in tokens]
    assert [t.probability for t in alone] == pytest.approx([t.probability for t in tokens], rel=1e-4)


def test_a_sampled_answer_is_scored_exactly_as_written(tiny_engine):
    chat = chat_over(tiny_engine)
    final = final_update(chat, do_sample=True, temperature=2.0, top_k=0, top_p=1.0, seed=3)
    ids = list(final.answer_ids)
    tokens = token_probabilities(chat, "How are you?", SYSTEM, [], final.answer, ids)
    assert_exact(tiny_engine, chat.inspect("How are you?", SYSTEM, []).input_ids, ids, tokens)
    assert_well_formed(tokens)
    # At temperature 2 over noise, it did not always write the most likely token.
    assert any(t.top[0].id != t.id for t in tokens)


def test_the_answer_text_gives_the_ids_the_model_wrote(ends_with_im_end, writes_an_emoji):
    for engine in (ends_with_im_end, writes_an_emoji):
        chat = chat_over(engine)
        final = final_update(chat)
        by_ids = token_probabilities(chat, "How are you?", SYSTEM, [], final.answer, list(final.answer_ids))
        by_text = token_probabilities(chat, "How are you?", SYSTEM, [], final.answer, None)
        # The newline that ends the role line is put back in front of the text: the ids the model wrote.
        assert [t.id for t in by_text] == list(final.answer_ids)
        assert by_text == by_ids and by_text[0].text == "\n"


def test_text_the_model_wrote_in_unusual_pieces_still_reads_the_same(tiny_engine):
    """Random weights write tokens the tokenizer would split otherwise, and no newline first: the
    text's tokens then differ from the ids, but both spell the answer."""
    chat = chat_over(tiny_engine)
    final = final_update(chat)
    by_ids = token_probabilities(chat, "How are you?", SYSTEM, [], final.answer, list(final.answer_ids))
    by_text = token_probabilities(chat, "How are you?", SYSTEM, [], final.answer, None)
    assert answer_text("".join(t.text for t in by_ids)) == final.answer
    assert answer_text("".join(t.text for t in by_text)) == final.answer


@pytest.fixture(scope="module")
def writes_an_emoji(tmp_path_factory, tokenizer) -> Engine:
    script = [*tokenizer.encode_text("\n" + EMOJI_ANSWER), IM_END]
    return Engine.load(str(build_tiny_model(tmp_path_factory.mktemp("emoji"), script=script)))


def test_texts_join_to_the_answer_and_a_split_character_is_on_its_last_byte(writes_an_emoji):
    chat = chat_over(writes_an_emoji)
    final = final_update(chat)
    assert final.answer == EMOJI_ANSWER
    tokens = token_probabilities(chat, "How are you?", SYSTEM, [], final.answer, list(final.answer_ids))
    assert [t.text for t in tokens] == ["\n", "Hi", " ", "", "", "", "😀", " é", "!"]
    assert all(t.top[0].id == t.id for t in tokens)  # the scripted model wrote exactly these
    # Alternatives read as the tokens themselves: a byte of a character as its piece.
    assert tokens[3].top[0].text == "<0xF0>" and tokens[0].top[0].text == "\n"


def test_ending_the_turn_is_an_alternative_shown_as_its_control_text(ends_with_im_end):
    chat = chat_over(ends_with_im_end)
    # The scripted model writes "\nThe answer", then ends its turn.
    tokens = token_probabilities(chat, "How are you?", SYSTEM, [], None, [13, 1576, 1234, IM_END])
    assert [t.text for t in tokens] == ["\n", "The", " answer", ""]  # control ids are not answer text
    assert tokens[-1].top[0].id == IM_END and tokens[-1].top[0].text == "<|im_end|>"
    assert tokens[2].top[0].text == " answer"


def test_scoring_runs_beside_a_long_answer_without_waiting_for_it(never_ends):
    chat = chat_over(never_ends)
    long_answer = never_ends.generate(prompt_for(never_ends), GenerationParams(max_new_tokens=4000, do_sample=True))
    stream = iter(long_answer)
    next(stream)  # it is being written, and holds the engine's lock
    try:
        started = time.perf_counter()
        tokens = token_probabilities(chat, "Hi", SYSTEM, [], "The answer", None)
        assert time.perf_counter() - started < 10
        assert long_answer.stats is None  # still being written
    finally:
        long_answer.cancel()
        assert long_answer.wait(timeout=10)
    assert [t.text for t in tokens] == ["\n", "The", " answer"]
    assert all(t.top[0].id == t.id for t in tokens)


def test_concurrent_scoring_gives_the_same_numbers(tiny_engine):
    chat = chat_over(tiny_engine)
    answer = "Whatever the sampling, the numbers are the model's own."
    expected = token_probabilities(chat, "Hi", SYSTEM, [], answer)
    results = []

    def score():
        results.append(token_probabilities(chat, "Hi", SYSTEM, [], answer))

    threads = [threading.Thread(target=score) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 4
    for tokens in results:
        assert [t.id for t in tokens] == [t.id for t in expected]
        assert [t.probability for t in tokens] == pytest.approx([t.probability for t in expected], rel=1e-4)


# Scoring in chunks, between answers' passes


def long_answer_ids(n: int) -> list[int]:
    """n ids of noise (seeded), for answers longer than a scoring chunk."""
    return torch.randint(100, 32000, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def test_scoring_in_chunks_gives_the_numbers_of_one_pass(tiny_engine):
    prompt, answer_ids = prompt_for(tiny_engine), long_answer_ids(2 * CPU_SCORE_CHUNK + 37)
    probabilities, alternatives = score_ids(tiny_engine.model, prompt.input_ids + answer_ids, prompt.n_tokens, 5)
    reference = reference_probabilities(tiny_engine, prompt.input_ids, answer_ids)
    chosen = reference.gather(1, torch.tensor(answer_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(probabilities), chosen, rtol=1e-5, atol=1e-9)
    best = reference.topk(5)
    assert [[i for i, _ in top] for top in alternatives] == best.indices.tolist()
    assert torch.allclose(
        torch.tensor([[p for _, p in top] for top in alternatives]), best.values, rtol=1e-5, atol=1e-9
    )


def test_a_scoring_pass_takes_fewer_positions_on_a_cpu_where_its_cost_grows_with_them():
    assert score_chunk(torch.device("cpu")) == CPU_SCORE_CHUNK < GPU_SCORE_CHUNK == score_chunk(torch.device("cuda"))


def test_a_long_scoring_makes_one_forward_pass_per_chunk(tiny_engine):
    prompt, answer_ids = prompt_for(tiny_engine), long_answer_ids(2000)
    mine, passes = threading.current_thread(), []
    body = tiny_engine.model.base_model
    hook = body.register_forward_pre_hook(lambda *_: passes.append(1) if threading.current_thread() is mine else None)
    try:
        tiny_engine.score(prompt, answer_ids)
    finally:
        hook.remove()
    transformer_ids = prompt.n_tokens + len(answer_ids) - 1  # the last id predicts nothing scored
    assert len(passes) == math.ceil(transformer_ids / CPU_SCORE_CHUNK)


def test_an_answers_pass_waiting_when_a_chunk_ends_goes_before_the_next_chunk(tiny_engine):
    """The answer's prefill asks for the model while scoring's first chunk runs: it runs next, then
    scoring's other chunks. The log is written inside the turn (the embedding runs in the pass)."""
    turns = one_forward_at_a_time(tiny_engine.model)
    prompt, answer_ids = prompt_for(tiny_engine), long_answer_ids(2 * CPU_SCORE_CHUNK)
    first_chunk_runs, answer_waits = threading.Event(), threading.Event()
    log = []

    def in_turn(module, args):
        who = threading.current_thread().name
        if who in ("scoring", "orca2-model"):
            log.append(who)
        if log == ["scoring"]:
            first_chunk_runs.set()
            assert answer_waits.wait(timeout=60)

    hook = tiny_engine.model.base_model.embed_tokens.register_forward_pre_hook(in_turn)
    scoring = threading.Thread(target=tiny_engine.score, args=(prompt, answer_ids), name="scoring")
    try:
        scoring.start()
        assert first_chunk_runs.wait(timeout=60)
        answer = tiny_engine.generate(prompt, GenerationParams(max_new_tokens=1))  # one pass: its prefill
        wait_for(lambda: turns.urgent_waiting == 1, "the answer's pass to wait for its turn")
        answer_waits.set()
        scoring.join(timeout=60)
        assert len("".join(answer)) > 0
    finally:
        answer_waits.set()
        hook.remove()
    assert log == ["scoring", "orca2-model", "scoring", "scoring"]


def test_a_long_scoring_ends_while_answers_stream_in_the_batch(never_ends):
    engine = batched(never_ends)
    answers = [engine.generate(prompt_for(engine, q), GenerationParams(max_new_tokens=4000)) for q in ("A", "B", "C")]
    try:
        for answer in answers:
            next(iter(answer))  # being written: the batch steps back to back
        answer_ids = long_answer_ids(3 * CPU_SCORE_CHUNK)
        tokens = engine.score(prompt_for(engine, "Hi"), answer_ids)
        assert [t.id for t in tokens] == answer_ids
        assert all(answer.stats is None for answer in answers)  # still being written
    finally:
        for answer in answers:
            answer.cancel()
        engine.close()


def test_on_zerogpu_scoring_runs_as_a_gpu_task_and_gives_the_same_numbers(tiny_engine, monkeypatch):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(zerogpu_module, "_model", None)
    zerogpu = Engine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.info)
    prompt, ids = prompt_for(tiny_engine), tiny_engine.tokenizer.encode_text("\nAn answer")
    assert zerogpu._score_ids is zerogpu_module.score_ids_on_gpu
    assert zerogpu.score(prompt, ids) == tiny_engine.score(prompt, ids)


def test_the_api_shape(tiny_engine):
    tokens = token_probabilities(chat_over(tiny_engine), "Hi", SYSTEM, [], "Yes")
    shaped = as_api_dict(tokens)
    assert list(shaped) == ["tokens"] and len(shaped["tokens"]) == len(tokens)
    first = shaped["tokens"][0]
    assert list(first) == ["id", "text", "probability", "top"] and first["text"] == "\n"
    assert len(first["top"]) == 5 and list(first["top"][0]) == ["id", "text", "probability"]
    assert first["probability"] == float(f"{tokens[0].probability:.6g}")
    assert as_api_dict([]) == {"tokens": []}


# What a caller may send


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"answer": 5}, "answer must be text, got int"),
        ({"answer": None}, "Give the answer"),
        ({"answer_ids": "13, 1576"}, "answer_ids must be a list of token ids or null, got str"),
        ({"answer_ids": [13, "1576"]}, r"answer_ids\[1\] must be a whole number, got str"),
        ({"answer_ids": [13, 1.5]}, r"answer_ids\[1\] must be a whole number, got float"),
        ({"answer_ids": [True]}, r"answer_ids\[0\] must be a whole number, got bool"),
        ({"answer_ids": [13, 32003]}, r"answer_ids\[1\] is 32003, not a token id \(0 to 32002\)"),
        ({"answer_ids": [-1]}, r"answer_ids\[0\] is -1, not a token id"),
        ({"answer_ids": [13] * 5000}, "answer_ids has 5,000 ids, more than Orca 2's 4096-token context"),
        ({"answer_ids": [13] * 4090}, r"The prompt \(\d+ tokens\) and the answer \(4090 tokens\) don.t fit"),
        ({"answer": "x" * 200_000}, "The answer is 200,000 characters"),
        ({"answer": "The end", "answer_ids": [13, 1576]}, "answer_ids spell 'The', not the answer given"),
        ({"message": 3}, "message must be text, got int"),
        ({"history": "Hello"}, "history must be a list"),
        ({"history": [{"role": "system", "content": "x"}]}, r"history\[0\]: role must be 'user' or 'assistant'"),
    ],
)
def test_bad_requests_are_refused_clearly_before_the_backend_is_asked(fake_backend, fields, says):
    call = {"message": "Hi", "system_message": SYSTEM, "history": [], "answer": "Fine.", "answer_ids": None, **fields}
    with pytest.raises(InvalidRequest, match=says):
        token_probabilities(chat_over(fake_backend), **call)
    assert fake_backend.scored == []


def test_an_empty_answer_has_no_tokens_and_asks_nothing(fake_backend):
    chat = chat_over(fake_backend)
    assert token_probabilities(chat, "Hi", SYSTEM, [], "") == []
    assert token_probabilities(chat, "Hi", SYSTEM, [], None, []) == []
    assert fake_backend.scored == []


def test_the_backend_scores_the_exact_prompt_and_the_answers_ids_and_its_numbers_come_back(fake_backend, tokenizer):
    """FakeBackend scores by a rule of each id (support.fake_probability), so what comes back is known."""
    tokens = token_probabilities(chat_over(fake_backend), "Hi", SYSTEM, HISTORY, "The answer", top=3)
    ids = [13, 1576, 1234]  # "\nThe answer": the role line's newline put back in front of the answer
    prompt = tokenizer.build(SYSTEM, [Turn("Hello", "Hi there.")], "Hi", max_new_tokens=len(ids))
    assert fake_backend.scored == [(prompt, ids, 3)]
    assert [(t.id, t.text, t.probability) for t in tokens] == [
        (13, "\n", fake_probability(13)),
        (1576, "The", fake_probability(1576)),
        (1234, " answer", fake_probability(1234)),
    ]
    assert [[(alt.id, alt.probability) for alt in t.top] for t in tokens] == [fake_alternatives(i, 3) for i in ids]


# On an inference server


def remote(base_url: str) -> InferenceServer:
    return InferenceServer.load(str(FIXTURES / "orca2-tokenizer"), InferenceServerSettings(base_url))


def test_vllm_prompt_logprobs_give_the_answers_probabilities(tokenizer):
    with OpenAIStub(Script()) as stub:
        backend = remote(stub.base_url)
        prompt = tokenizer.build(SYSTEM, [], "Hi")
        ids = tokenizer.encode_text("\n" + EMOJI_ANSWER)
        tokens = backend.score(prompt, ids)
    request = stub.script.requests[-1]
    assert request["prompt"] == prompt.input_ids + ids and request["prompt_logprobs"] == 5
    assert request["max_tokens"] == 1 and request["stream"] is False and request["temperature"] == 1.0
    served = stub_prompt_logprobs(prompt.input_ids + ids, 5)[prompt.n_tokens :]
    assert [t.id for t in tokens] == ids
    assert "".join(t.text for t in tokens) == "\n" + EMOJI_ANSWER
    for token, entry in zip(tokens, served, strict=True):
        assert token.probability == pytest.approx(math.exp(entry[str(token.id)]["logprob"]))
        listed = sorted(entry.items(), key=lambda item: -item[1]["logprob"])
        best = [int(i) for i, value in listed if int(i) != token.id or value["rank"] <= 5][:5]
        assert [alt.id for alt in token.top] == best
        assert [alt.text for alt in token.top] == [tokenizer.piece_text(i) for i in best]
    assert_well_formed(tokens)
    # The stub ranks the written token first at even positions, ninth (outside the top 5) at odd ones.
    assert any(t.top[0].id == t.id for t in tokens) and any(t.id not in {a.id for a in t.top} for t in tokens)


def test_vllm_scoring_goes_through_the_chat(tokenizer):
    with OpenAIStub(Script()) as stub:
        chat = Chat(remote(stub.base_url), Settings(max_new_tokens_cap=4000))
        tokens = token_probabilities(chat, "Hi", SYSTEM, HISTORY, "The answer", None)
    ids = [13, 1576, 1234]  # "\nThe answer"
    prompt = tokenizer.build(SYSTEM, [Turn("Hello", "Hi there.")], "Hi", max_new_tokens=len(ids))
    assert stub.script.requests[-1]["prompt"] == prompt.input_ids + ids
    assert [t.text for t in tokens] == ["\n", "The", " answer"]


@pytest.mark.parametrize(
    "script",
    [Script(takes_ids=False), Script(takes_ids=False, takes_extras=False), Script(prompt_logprobs=False)],
    ids=["refuses ids", "plain OpenAI server", "ignores prompt_logprobs"],
)
def test_a_server_without_prompt_logprobs_says_it_is_unavailable_and_why(tokenizer, script):
    with OpenAIStub(script) as stub:
        backend = remote(stub.base_url)
        with pytest.raises(ScoringUnavailable, match="unavailable on this inference server.*transformers serve"):
            backend.score(tokenizer.build(SYSTEM, [], "Hi"), [13, 1576])


@pytest.mark.parametrize("dialect", DIALECTS[1:], ids=lambda d: d.name)
def test_once_a_server_is_known_to_read_text_nothing_is_asked(tokenizer, dialect):
    with OpenAIStub(Script()) as stub:
        backend = remote(stub.base_url)
        backend.dialect = dialect
        with pytest.raises(ScoringUnavailable, match="unavailable on this inference server"):
            backend.score(tokenizer.build(SYSTEM, [], "Hi"), [13, 1576])
    assert stub.script.requests == []


def test_a_failing_server_is_a_failure_not_unavailable(tokenizer):
    with OpenAIStub(Script(status=500)) as stub:
        backend = remote(stub.base_url)
        with pytest.raises(GenerationError, match=r"could not score the answer \(500\)"):
            backend.score(tokenizer.build(SYSTEM, [], "Hi"), [13, 1576])


@pytest.mark.slow
def test_transformers_serve_has_no_prompt_logprobs(tmp_path, tokenizer):
    model = build_tiny_model(tmp_path / "served", script=[13, 1576, 1234, IM_END])
    server = TransformersServe(tmp_path / "serve.log", pinned=model)
    try:
        chat = Chat(InferenceServer.load(str(model), InferenceServerSettings(server.base_url)), Settings())
        # Asked before any answer: the request for prompt_logprobs goes out, and gets none.
        with pytest.raises(ScoringUnavailable, match="transformers serve does not"):
            token_probabilities(chat, "Hi", SYSTEM, [], "The answer")
        *_, final = chat.respond(chat.request("Hi", SYSTEM, [], max_new_tokens=8))
        assert final.answer == "The answer" and final.answer_ids is None  # it sends text only
        # Once the server is known to read text, the answer is at once: unavailable.
        with pytest.raises(ScoringUnavailable, match="transformers serve does not"):
            token_probabilities(chat, "Hi", SYSTEM, [], final.answer)
    finally:
        server.stop()
