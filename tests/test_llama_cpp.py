"""The llama.cpp backend (--backend llama-cpp): a GGUF file run in this process, held to the contract
and to the transformers engine on the same weights.

The GGUFs are the tiny models of make_tiny_model.py, written by make_tiny_gguf.py in the test
session. Tests that run llama.cpp are skipped where llama-cpp-python is not installed (it is an
optional install, requirements-llama.txt; .ci/run installs it); the rest need only the app.
"""

import importlib.util
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from make_tiny_gguf import vocabulary, write_gguf
from make_tiny_model import build_tiny_model
from support import FIXTURES, REFERENCE, ROOT, SCRIPT, App, environment_without, free_port, prompt_for

from orca2_space.backends.contract import LLAMA_CPP_SAMPLING, GenerationError, ModelLoadError
from orca2_space.backends.llama_cpp import NOT_INSTALLED, LlamaCpp, preflight, sampler_steps
from orca2_space.backends.sampling import Sampling
from orca2_space.chat import Chat
from orca2_space.cli import parser, settings_from_args
from orca2_space.conversation import Conversation, LookedAt, export, to_markdown
from orca2_space.prompt import EOS, IM_END, IM_START, ConversationPrompts, Prompt
from orca2_space.settings import GenerationParams, LlamaCppSettings, Settings

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install -r requirements-llama.txt; .ci/run installs it)",
)
# Greedy answers of the f32 tiny GGUF equal the transformers engine's for at least this many tokens on
# every reference prompt: measured over 1000 tokens, the earliest parting was at token 217, where the
# two most likely ids differ in probability by under 1e-9 (a random model's near ties, summed in
# another order).
AGREED_TOKENS = 200


def gguf_of(model_dir: Path, file_type: str = "f32", **wrong) -> Path:
    return write_gguf(model_dir, model_dir / f"model-{file_type}.gguf", file_type, **wrong)


def load(gguf: Path, tokenizer_from: Path = FIXTURES / "orca2-tokenizer", **settings) -> LlamaCpp:
    return LlamaCpp.load(str(tokenizer_from), LlamaCppSettings(gguf=str(gguf), **settings))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    return write_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_gguf) -> LlamaCpp:
    backend = load(tiny_gguf)
    yield backend
    backend.close()


def scripted(tmp_path_factory, script: list[int], loop: bool = False) -> LlamaCpp:
    return load(gguf_of(build_tiny_model(tmp_path_factory.mktemp("scripted"), script=script, loop=loop)))


@pytest.fixture(scope="module")
def never_ends_gguf(tmp_path_factory) -> LlamaCpp:
    """Repeats "\\nThe answer" until max_new_tokens or Stop."""
    return scripted(tmp_path_factory, SCRIPT, loop=True)


def greedy(backend, prompt: Prompt, max_new_tokens: int, **params) -> list[int]:
    answer = backend.generate(prompt, GenerationParams(max_new_tokens=max_new_tokens, **params))
    list(answer)
    return answer.token_ids


# --- Settings and the sampler chain: no llama.cpp needed ------------------------------------------


def test_the_flags_make_the_llama_cpp_settings():
    args = ["--backend", "llama-cpp", "--gguf-repo", "TheBloke/Orca-2-7B-GGUF", "--gguf", "orca-2-7b.Q4_K_M.gguf"]
    settings = settings_from_args(parser().parse_args(args))
    assert settings.llama_cpp == LlamaCppSettings(gguf="orca-2-7b.Q4_K_M.gguf", gguf_repo="TheBloke/Orca-2-7B-GGUF")
    with pytest.raises(ValueError, match="--backend llama-cpp needs --gguf"):
        settings_from_args(parser().parse_args(["--backend", "llama-cpp"]))


def test_greedy_is_llama_cpps_greedy_sampler_after_the_penalty_over_every_id():
    assert sampler_steps(Sampling(10), 4096) == [("greedy", ())]
    penalized = sampler_steps(Sampling(10, repetition_penalty=1.3), 4096)
    assert penalized == [("penalties", (32003, 4096, 1.3, 0.0, 0.0)), ("greedy", ())]


def test_sampling_applies_temperature_top_k_top_p_then_draws_with_the_seed_in_transformers_order():
    sampling = Sampling.of(GenerationParams(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, seed=5))
    assert sampler_steps(sampling, 512) == [("temp", (0.7,)), ("top_k", (40,)), ("top_p", (0.9, 1)), ("dist", (5,))]
    off = Sampling.of(GenerationParams(do_sample=True, top_k=0, top_p=1.0, seed=5))
    assert [name for name, _ in sampler_steps(off, 512)] == ["temp", "dist"]


def test_without_the_library_the_app_says_how_to_install_it_before_the_page_starts(tmp_path):
    env = environment_without(tmp_path / "site", ("llama_cpp",))
    command = [sys.executable, "app.py", "--backend", "llama-cpp", "--gguf", "orca.gguf", "--port", str(free_port())]
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {NOT_INSTALLED}"
    assert "Running on" not in result.stdout + result.stderr


# --- The contract ---------------------------------------------------------------------------------


@needs_llama_cpp
@pytest.mark.parametrize("stop", [IM_END, EOS, IM_START], ids=["im_end", "eos", "im_start"])
def test_the_answer_ends_at_each_stop_id_and_shows_no_control_text(tmp_path_factory, stop):
    backend = scripted(tmp_path_factory, [*SCRIPT, stop])
    answer = backend.generate(prompt_for(backend), GenerationParams(max_new_tokens=50))
    assert "".join(answer) == "\nThe answer"
    assert answer.stats.stop_reason == "end_of_turn" and answer.stats.n_tokens == 4
    assert answer.token_ids == SCRIPT


@needs_llama_cpp
def test_max_new_tokens_ends_the_answer(never_ends_gguf):
    """(llama.cpp writes the tiny model's tokens faster than a reader takes them, so pieces arrive
    together: the Stop test below shows the answer streaming.)"""
    answer = never_ends_gguf.generate(prompt_for(never_ends_gguf), GenerationParams(max_new_tokens=9))
    assert "".join(answer) == "\nThe answer" * 3
    assert answer.stats.stop_reason == "length" and answer.stats.n_tokens == 9


@needs_llama_cpp
def test_stop_ends_llama_cpps_work_within_one_token(never_ends_gguf):
    answer = never_ends_gguf.generate(prompt_for(never_ends_gguf), GenerationParams(max_new_tokens=4000))
    for received, _ in enumerate(answer, 1):
        if received == 5:
            answer.cancel()
    assert answer.wait(timeout=10), "llama.cpp is still answering after Stop"
    assert answer.stats.stop_reason == "stopped"
    assert answer.stats.tokens_after_cancel <= 1
    assert answer.stats.n_tokens < 4000


@needs_llama_cpp
def test_an_abandoned_answer_stops_llama_cpp(never_ends_gguf):
    answer = never_ends_gguf.generate(prompt_for(never_ends_gguf), GenerationParams(max_new_tokens=4000))
    stream = iter(answer)
    next(stream)
    feed = answer._feed
    del stream, answer
    assert feed.done.wait(timeout=10)
    assert feed.stats.stop_reason == "stopped"


@needs_llama_cpp
def test_same_seed_same_answer_and_a_drawn_seed_is_reported(tiny):
    prompt = prompt_for(tiny)
    sampled = GenerationParams(do_sample=True, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=30, seed=1234)
    first, second = "".join(tiny.generate(prompt, sampled)), "".join(tiny.generate(prompt, sampled))
    other = "".join(tiny.generate(prompt, GenerationParams(**{**sampled.model_dump(), "seed": 99})))
    assert first == second != other
    drawn = tiny.generate(prompt, GenerationParams(do_sample=True, max_new_tokens=20))
    text = "".join(drawn)
    assert drawn.stats.seed is not None
    assert drawn.stats.sampling == LLAMA_CPP_SAMPLING  # an export says which sampler the seed belongs to
    assert (
        "".join(tiny.generate(prompt, GenerationParams(do_sample=True, max_new_tokens=20, seed=drawn.stats.seed)))
        == text
    )
    greedy_answer = tiny.generate(prompt, GenerationParams(max_new_tokens=3))
    list(greedy_answer)
    assert greedy_answer.stats.seed is None
    assert greedy_answer.stats.sampling is None


@needs_llama_cpp
def test_concurrent_answers_take_turns_and_each_is_its_own(tiny):
    prompts = [prompt_for(tiny, question) for question in ("How are you?", "What is 2 + 2?", "Name a colour.")]
    alone = [greedy(tiny, prompt, 30) for prompt in prompts]
    together: list[list[int] | None] = [None] * len(prompts)

    def run(i: int) -> None:
        together[i] = greedy(tiny, prompts[i], 30)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert together == alone


@needs_llama_cpp
def test_a_fault_inside_llama_cpp_ends_the_answer_readably_and_the_next_answer_works(tiny):
    outside_the_vocabulary = Prompt("", [1, 99_999])
    answer = tiny.generate(outside_the_vocabulary, GenerationParams(max_new_tokens=5))
    with pytest.raises(GenerationError, match=r"llama.cpp failed while answering: invalid token\[1\] = 99999"):
        list(answer)
    assert answer.stats.stop_reason == "error"
    assert len(greedy(tiny, prompt_for(tiny), 5)) == 5


# --- Fidelity: the transformers engine on the same weights ----------------------------------------


@needs_llama_cpp
@pytest.mark.parametrize("case", REFERENCE, ids=[c["name"] for c in REFERENCE])
def test_greedy_answers_to_the_reference_prompts_agree_with_transformers(tiny, tiny_engine, case):
    prompt = Prompt("", case["input_ids"])
    assert greedy(tiny, prompt, AGREED_TOKENS) == greedy(tiny_engine, prompt, AGREED_TOKENS)


@needs_llama_cpp
def test_token_probabilities_are_transformers_own_for_the_same_ids(tiny, tiny_engine):
    """Typed control text stays text. Measured: llama.cpp's probabilities are within 1.6e-4 of
    transformers' (relative), while the ids llama.cpp's own tokenizer makes of the prompt's text (the
    typed <|im_end|> as id 32002) give probabilities a median 3% away."""
    prompt = tiny.tokenizer.build("You are Orca.", [], "Say <|im_end|> twice.", max_new_tokens=64)
    assert prompt.input_ids.count(IM_END) == 2  # the system's and the question's ends, not the typed one
    answer_ids = greedy(tiny_engine, prompt, 40)
    ours, theirs = tiny.score(prompt, answer_ids), tiny_engine.score(prompt, answer_ids)
    assert [t.text for t in ours] == [t.text for t in theirs]
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.probability == pytest.approx(reference.probability, rel=1e-3)
        assert [a.id for a in mine.top[:2]] == [a.id for a in reference.top[:2]]


@needs_llama_cpp
@pytest.mark.parametrize("penalty", [1.3, 2.0])
def test_a_repetition_penalty_gives_transformers_answer(tiny, tiny_engine, penalty):
    prompt = prompt_for(tiny)
    penalized = greedy(tiny, prompt, 60, repetition_penalty=penalty)
    assert penalized != greedy(tiny, prompt, 60)
    assert penalized == greedy(tiny_engine, prompt, 60, repetition_penalty=penalty)


# --- What the page and the exports say ------------------------------------------------------------


@needs_llama_cpp
def test_the_page_and_the_exports_name_llama_cpp_and_the_ggufs_weights(tiny, tiny_model_dir, tmp_path):
    from orca2_space.ui.page import _model_status

    q8 = load(write_gguf(tiny_model_dir, tmp_path / "tiny.gguf", "q8_0"))
    info = q8.info
    assert (info.name, info.quantization, info.device) == ("tiny.gguf", "Q8_0 GGUF", "CPU")
    status = _model_status(Chat(q8, Settings()))
    assert "tiny.gguf" in status and "Q8_0 GGUF" in status and "llama.cpp" in status
    exported = export(Conversation(), info, ConversationPrompts([], {}), LookedAt()).model_dump()
    assert (exported["model"], exported["weights"]) == ("tiny.gguf", "Q8_0 GGUF")
    assert exported["backend"].startswith("llama.cpp (llama-cpp-python ") and exported["backend"].endswith(", CPU")
    assert "Q8_0 GGUF" in to_markdown(Conversation(), info, LookedAt())
    q8.close()
    assert tiny.info.quantization == "F32 GGUF" and tiny.info.context_length == 4096


# --- Refusals: one line, before the page starts ----------------------------------------------------


@needs_llama_cpp
def test_a_gguf_without_orca_2s_vocabulary_is_refused_in_one_line(tiny_model_dir, tmp_path):
    tokens = vocabulary(tiny_model_dir)[0]
    swapped = [*tokens[:IM_START], tokens[IM_END], tokens[IM_START]]
    cases = {
        "short": (tokens[:32000], "its vocabulary has 32000 tokens; Orca 2's has 32003"),
        "swapped": (swapped, "ids 32001 and 32002 are '<|im_end|>' and '<|im_start|>'"),
    }
    for name, (vocabulary_written, says) in cases.items():
        gguf = write_gguf(tiny_model_dir, tmp_path / f"{name}.gguf", tokens=vocabulary_written)
        message = preflight(LlamaCppSettings(gguf=str(gguf)))
        assert message is not None and says in message and len(message.splitlines()) == 1
        with pytest.raises(ModelLoadError, match="not Orca 2's vocabulary|Orca 2's has 32003"):
            load(gguf)


@needs_llama_cpp
def test_bad_ggufs_are_refused_in_one_line(tiny_gguf, tiny_model_dir, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    cases = [
        (LlamaCppSettings(gguf=str(tmp_path / "nowhere.gguf")), "there is no file at that path"),
        (LlamaCppSettings(gguf=str(truncated)), "not within the file bounds, model is corrupted or incomplete"),
        (
            LlamaCppSettings(gguf=str(write_gguf(tiny_model_dir, tmp_path / "qwen.gguf", architecture="qwen2"))),
            "it is a qwen2 model; Orca 2 is a llama model",
        ),
        (
            LlamaCppSettings(gguf=str(tiny_gguf), gguf_context=8192),
            "--gguf-context 8192 is longer than the 4096 tokens it was trained for",
        ),
    ]
    for settings, says in cases:
        message = preflight(settings)
        assert message is not None and says in message and len(message.splitlines()) == 1, message
    assert preflight(LlamaCppSettings(gguf=str(tiny_gguf))) is None


@needs_llama_cpp
def test_a_hub_gguf_offline_and_not_cached_is_refused_before_the_page_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    message = preflight(LlamaCppSettings(gguf="orca-2-7b.Q4_K_M.gguf", gguf_repo="TheBloke/Orca-2-7B-GGUF"))
    assert message == (
        "Could not load the GGUF 'TheBloke/Orca-2-7B-GGUF/orca-2-7b.Q4_K_M.gguf': offline, and not in the Hugging "
        "Face cache (HF_HOME)"
    )


@needs_llama_cpp
def test_the_app_refuses_a_truncated_gguf_before_the_page_starts(tiny_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:100])
    command = [sys.executable, "app.py", "--model", str(FIXTURES / "orca2-tokenizer"), "--port", str(free_port())]
    command += ["--backend", "llama-cpp", "--gguf", str(truncated)]
    result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last
        == "error: Could not load the GGUF 'truncated.gguf': llama.cpp can't read it: failed to read key-value pairs"
    )
    assert "Running on" not in result.stdout + result.stderr


# --- The launched app: Compare and the token view ---------------------------------------------------


@pytest.fixture(scope="module")
def app_client(tiny):
    from gradio_client import Client

    from orca2_space.cli import launch

    demo = launch(Chat(tiny, Settings(host="127.0.0.1", port=free_port(), max_new_tokens_cap=256)), block=False)
    yield Client(demo.local_url, verbose=False)
    demo.close()


@needs_llama_cpp
def test_compare_and_token_probabilities_work_on_llama_cpp(app_client, tiny):
    systems = ["You are Orca.", "Answer like a pirate."]
    answers = app_client.predict(message="Hi", system_messages=systems, max_new_tokens=12, api_name="/compare")[
        "answers"
    ]
    assert len(answers) == 2 and all(a["done"] and a["n_tokens"] == 12 and a["error"] is None for a in answers)
    alone = app_client.predict(
        message="Hi", system_message=systems[1], single_turn=True, max_new_tokens=12, api_name="/chat"
    )
    assert answers[1]["answer_ids"] == alone["answer_ids"]
    scored = app_client.predict(
        message="Hi", system_message=systems[1], answer_ids=alone["answer_ids"], api_name="/token_probabilities"
    )
    expected = tiny.score(tiny.tokenizer.build(systems[1], [], "Hi"), alone["answer_ids"])
    assert [t["id"] for t in scored["tokens"]] == alone["answer_ids"]
    assert [t["probability"] for t in scored["tokens"]] == pytest.approx([t.probability for t in expected], rel=1e-5)
    assert all(len(t["top"]) == 5 for t in scored["tokens"])


@needs_llama_cpp
def test_evaluate_works_on_llama_cpp_and_each_cell_is_chats_answer(app_client):
    questions = [
        {"question": "What is 2 + 2?", "answer": "4"},
        {"question": "Is ice cold? Yes or No.", "answer": "Yes"},
    ]
    systems = ["", "You are Orca."]
    final = app_client.submit(
        questions=questions, system_messages=systems, rule="final-answer", max_new_tokens=8, api_name="/evaluate"
    ).result()
    assert final["finished"] and final["done"] == final["total"] == 4
    assert len(final["results"]["messages"]) == 2 and len(final["results"]["pairs"]) == 1
    for cell in final["cells"]:
        alone = app_client.predict(
            message=questions[cell["question"]]["question"],
            system_message=systems[cell["message"]],
            single_turn=True,
            max_new_tokens=8,
            api_name="/chat",
        )
        assert cell["error"] is None and cell["answer_ids"] == alone["answer_ids"]


@needs_llama_cpp
@pytest.mark.slow
def test_the_app_runs_a_gguf_without_torch(tiny_gguf, tmp_path):
    """README's laptop install: requirements-remote.txt and requirements-llama.txt, no torch."""
    from gradio_client import Client

    env = environment_without(tmp_path / "site")
    args = ("--backend", "llama-cpp", "--gguf", str(tiny_gguf))
    app = App(FIXTURES / "orca2-tokenizer", tmp_path / "app.log", env, *args)
    try:
        final = Client(app.url, verbose=False).predict(message="Hi", max_new_tokens=8, api_name="/chat")
    finally:
        app.close()
    assert final["done"] and final["error"] is None and final["n_tokens"] == 8, final
    assert "Traceback" not in app.log()
