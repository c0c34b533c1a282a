"""ZeroGPU: on a ZeroGPU Space the model's work runs inside `@spaces.GPU`; elsewhere nothing changes."""

import threading

import pytest
import spaces  # installed, as on a Space: it must change nothing on this (CPU) machine
from support import prompt_for

from orca2_space.backends.local import zerogpu
from orca2_space.backends.local.engine import Engine
from orca2_space.backends.local.loading import plan_load
from orca2_space.backends.local.zerogpu import gpu_task
from orca2_space.backends.sampling import Sampling
from orca2_space.settings import GenerationParams, on_zerogpu


def test_off_zerogpu_the_gpu_decorator_is_a_pass_through():
    assert not spaces.config.Config.zero_gpu and not on_zerogpu()

    def task(n):
        yield from range(n)

    assert gpu_task(task, duration=lambda n: 1) is task


def test_auto_loads_bf16_on_zerogpu_because_8bit_models_cannot_move_to_its_gpu():
    gib = 2**30
    plan = plan_load("auto", cuda=True, fp32_bytes=28 * gib, ram_bytes=64 * gib, zerogpu=True)
    assert plan.quantization == "bf16" and "ZeroGPU" in plan.reason
    assert plan_load("8bit", cuda=True, fp32_bytes=1, ram_bytes=1, zerogpu=True).quantization == "8bit"


def test_the_gpu_time_asked_for_follows_max_new_tokens_within_a_cap():
    seconds = [zerogpu.gpu_seconds([1], Sampling.of(GenerationParams(max_new_tokens=n))) for n in (64, 512, 4096)]
    assert seconds[0] < seconds[1] < seconds[2] <= 300


@pytest.fixture
def zerogpu_engine(never_ends, monkeypatch):
    """The engine's ZeroGPU path on this CPU: `spaces` read SPACES_ZERO_GPU when imported (off), so
    spaces.GPU stays a pass-through while the engine does what it does on ZeroGPU."""
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(zerogpu, "_model", None)
    return Engine(never_ends.model, never_ends.tokenizer, never_ends.info)


def model_threads():
    return [t for t in threading.enumerate() if t.name == "orca2-model"]


def test_on_zerogpu_the_answer_is_the_same(zerogpu_engine, never_ends):
    params = GenerationParams(max_new_tokens=12)
    ids = prompt_for(never_ends)
    assert zerogpu._model is never_ends.model
    assert "".join(zerogpu_engine.generate(ids, params)) == "".join(never_ends.generate(ids, params))


def test_on_zerogpu_stop_closes_the_gpu_task_and_the_model_stops(zerogpu_engine):
    generation = zerogpu_engine.generate(prompt_for(zerogpu_engine), GenerationParams(max_new_tokens=2000))
    for n, _ in enumerate(generation, 1):
        if n == 5:
            generation.cancel()
    assert generation.wait(timeout=10)
    # The stop can't reach ZeroGPU's worker process directly: it closes the stream, which the
    # model sees at its next decode step.
    assert generation.stats.stop_reason == "stopped" and generation.stats.tokens_after_cancel <= 2
    assert model_threads() == []
