"""The local model in a process of its own (--model-process, on by default): the same answers, scores
and Stop as the engine in the web server's process, a clear reason when that process can't load or
dies, and nothing left running once the app closes."""

import os
import signal
import subprocess
import sys

import pytest
from make_tiny_model import build_tiny_model
from support import ROOT, SCRIPT, prompt_for, wait_for

from orca2_space.backends.contract import GenerationError, ModelLoadError
from orca2_space.backends.local.batching import BatchingSettings
from orca2_space.backends.local.engine import Engine
from orca2_space.backends.local.process import ModelProcess
from orca2_space.settings import GenerationParams

BATCH = BatchingSettings(max_concurrent=4, cache_tokens=8192)


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory):
    """Repeats "\\nThe answer" until max_new_tokens or Stop."""
    return build_tiny_model(tmp_path_factory.mktemp("endless"), script=SCRIPT, loop=True)


@pytest.fixture(scope="module")
def apart(tiny_model_dir):
    model = ModelProcess.load(str(tiny_model_dir), batching=BATCH)
    yield model
    model.close()


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(max_new_tokens=24),
        GenerationParams(max_new_tokens=24, do_sample=True, seed=7, temperature=0.9, top_p=0.9),
        GenerationParams(max_new_tokens=24, repetition_penalty=1.3),
    ],
    ids=["greedy", "seeded", "penalised"],
)
def test_answers_are_the_engines_own_token_for_token(apart, tiny_engine, params):
    prompt = prompt_for(tiny_engine)
    here, there = tiny_engine.generate(prompt, params), apart.generate(prompt, params)
    assert "".join(there) == "".join(here)
    assert there.token_ids == here.token_ids
    assert (there.stats.n_tokens, there.stats.stop_reason, there.stats.seed, there.stats.sampling) == (
        here.stats.n_tokens,
        here.stats.stop_reason,
        here.stats.seed,
        here.stats.sampling,
    )
    assert there.stats.batched  # the process's engine batches, as the app's does


def test_token_probabilities_are_the_engines_own(apart, tiny_engine):
    prompt = prompt_for(tiny_engine)
    answer_ids = [13, 1576, 1234, 29889]
    assert apart.score(prompt, answer_ids, top=3) == tiny_engine.score(prompt, answer_ids, top=3)


def test_concurrent_answers_each_get_their_own_tokens(apart, tiny_engine):
    prompts = [prompt_for(tiny_engine, f"Question {n}?") for n in range(4)]
    params = GenerationParams(max_new_tokens=16)
    running = [apart.generate(prompt, params) for prompt in prompts]
    assert ["".join(answer) for answer in running] == ["".join(tiny_engine.generate(p, params)) for p in prompts]


def test_stop_ends_the_models_work_within_one_decode_step(endless_dir):
    model = ModelProcess.load(str(endless_dir), batching=BATCH)
    try:
        answer = model.generate(prompt_for(model), GenerationParams(max_new_tokens=2000))
        pieces = []
        for piece in answer:
            pieces.append(piece)
            if len(pieces) == 5:
                answer.cancel()
        assert answer.wait(timeout=30)
        assert answer.stats.stop_reason == "stopped"
        assert answer.stats.tokens_after_cancel <= 1
        assert answer.stats.n_tokens < 2000
    finally:
        model.close()


def test_a_model_that_cant_load_says_why(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    phases = []
    with pytest.raises(ModelLoadError) as refused:
        ModelProcess.load(str(tmp_path), on_phase=phases.append)
    assert f"Could not load the model '{tmp_path}'" in str(refused.value)
    assert phases  # the model's process said what it was doing before it failed


def test_a_model_process_that_dies_ends_its_answers_and_every_later_request_with_the_reason(endless_dir):
    model = ModelProcess.load(str(endless_dir), batching=BATCH)
    answer = model.generate(prompt_for(model), GenerationParams(max_new_tokens=4000))
    stream = iter(answer)
    next(stream)
    model._process.kill()  # what the kernel's out-of-memory killer does
    with pytest.raises(GenerationError, match="The model's process has stopped .killed by signal 9"):
        list(stream)
    assert answer.stats.stop_reason == "error"
    later = model.generate(prompt_for(model), GenerationParams(max_new_tokens=8))
    with pytest.raises(GenerationError, match="needs a restart"):
        list(later)
    with pytest.raises(GenerationError, match="needs a restart"):
        model.score(prompt_for(model), [13])
    model.close()


WEB_SERVER = """
import sys
from orca2_space.backends.local.process import ModelProcess
model = ModelProcess.load(sys.argv[1])
print(model._process.pid, flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_the_models_process_ends_when_its_web_server_is_gone_however_it_ended(tiny_model_dir, signal_name):
    """Killed, the web server's process runs no exit handler: its model's process sees the pipe close."""
    web_server = subprocess.Popen(
        [sys.executable, "-c", WEB_SERVER, str(tiny_model_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
    )
    model_pid = int(web_server.stdout.readline())
    web_server.send_signal(getattr(signal, signal_name))
    web_server.wait(timeout=60)
    wait_for(lambda: not _running(model_pid), "the model's process to end")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # An ended child of an ended process is reaped by init; until then it is a zombie, not running.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_closing_ends_the_process_and_the_answers_in_flight(endless_dir):
    model = ModelProcess.load(str(endless_dir), batching=BATCH)
    answer = model.generate(prompt_for(model), GenerationParams(max_new_tokens=4000))
    stream = iter(answer)
    next(stream)
    model.close()
    with pytest.raises(GenerationError):
        list(stream)
    assert model._process.exitcode == 0


def test_without_batching_answers_take_turns_there_too(endless_dir):
    model = ModelProcess.load(str(endless_dir))
    try:
        answers = [model.generate(prompt_for(model), GenerationParams(max_new_tokens=6)) for _ in range(3)]
        assert ["".join(answer) for answer in answers] == ["\nThe answer\nThe answer"] * 3
        assert not any(answer.stats.batched for answer in answers)
    finally:
        model.close()


def test_the_engine_in_this_process_is_what_model_process_off_loads(tiny_model_dir):
    from orca2_space.cli import backend_loader
    from orca2_space.settings import Settings

    assert backend_loader(Settings(model=str(tiny_model_dir))).func == ModelProcess.load
    assert backend_loader(Settings(model=str(tiny_model_dir), model_process=False)).func == Engine.load
