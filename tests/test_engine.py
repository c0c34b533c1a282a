"""The engine: one loaded model, token streaming, stop tokens, Stop, seeds and failures."""

import logging

import pytest
import torch
from support import batched, prompt_for

from orca2_space.backends.contract import GenerationError, ModelLoadError
from orca2_space.backends.local.engine import Engine
from orca2_space.backends.local.loading import plan_load
from orca2_space.prompt import IM_END, Prompt
from orca2_space.settings import GenerationParams


@pytest.mark.parametrize("engine_name", ["ends_with_im_end", "ends_with_eos"])
def test_generation_ends_at_im_end_or_eos_and_shows_no_control_text(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    generation = engine.generate(prompt_for(engine), GenerationParams(max_new_tokens=50))
    text = "".join(generation)
    assert text == "\nThe answer"
    assert generation.stats.stop_reason == "end_of_turn"
    assert generation.stats.n_tokens == 4  # three words and the stop token


def test_tokens_stream_one_by_one(never_ends):
    generation = never_ends.generate(prompt_for(never_ends), GenerationParams(max_new_tokens=9))
    assert list(generation) == ["\n", "The", " answer"] * 3
    assert generation.stats.stop_reason == "length"


def test_greedy_streaming_equals_the_model_cards_plain_generate(tiny_engine):
    prompt = prompt_for(tiny_engine)
    ids = prompt.input_ids
    streamed = "".join(tiny_engine.generate(prompt, GenerationParams(max_new_tokens=40)))
    reference = tiny_engine.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    new_ids = reference[0, len(ids) :].tolist()
    assert IM_END not in new_ids  # the random model runs to the limit, like the engine
    assert streamed == tiny_engine.tokenizer.decode(new_ids)


def test_stop_ends_the_models_work_within_one_decode_step(never_ends):
    generation = never_ends.generate(prompt_for(never_ends), GenerationParams(max_new_tokens=2000))
    received = []
    for delta in generation:
        received.append(delta)
        if len(received) == 5:
            generation.cancel()
    assert generation.wait(timeout=10), "the generation thread is still running after Stop"
    assert generation.stats.stop_reason == "stopped"
    assert generation.stats.tokens_after_cancel <= 1
    assert generation.stats.n_tokens < 2000


def test_an_abandoned_stream_stops_the_model(never_ends):
    generation = never_ends.generate(prompt_for(never_ends), GenerationParams(max_new_tokens=4000))
    stream = iter(generation)
    next(stream)
    state = generation._feed
    del stream, generation  # a client that vanished: nobody holds the handle any more
    assert state.done.wait(timeout=10)
    assert state.stats.stop_reason == "stopped"


def test_same_seed_and_settings_give_the_same_answer(tiny_engine):
    ids = prompt_for(tiny_engine)
    sampled = GenerationParams(do_sample=True, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=40, seed=1234)
    first = "".join(tiny_engine.generate(ids, sampled))
    second = "".join(tiny_engine.generate(ids, sampled))
    other_seed = "".join(tiny_engine.generate(ids, GenerationParams(**{**sampled.model_dump(), "seed": 99})))
    assert first == second
    assert first != other_seed


def test_a_random_seed_is_reported_so_an_answer_can_be_redone(tiny_engine):
    ids = prompt_for(tiny_engine)
    generation = tiny_engine.generate(ids, GenerationParams(do_sample=True, max_new_tokens=20))
    text = "".join(generation)
    seed = generation.stats.seed
    assert seed is not None
    assert "".join(tiny_engine.generate(ids, GenerationParams(do_sample=True, max_new_tokens=20, seed=seed))) == text


def test_greedy_answers_report_no_seed(tiny_engine):
    generation = tiny_engine.generate(prompt_for(tiny_engine), GenerationParams(max_new_tokens=3))
    list(generation)
    assert generation.stats.seed is None


def test_a_failure_during_generation_is_reported_and_the_engine_keeps_serving(tiny_engine):
    outside_the_vocabulary = Prompt("", [1, 99_999])
    generation = tiny_engine.generate(outside_the_vocabulary, GenerationParams(max_new_tokens=5))
    with pytest.raises(GenerationError, match="failed while answering"):
        list(generation)
    assert generation.stats.stop_reason == "error"
    after = tiny_engine.generate(prompt_for(tiny_engine), GenerationParams(max_new_tokens=5))
    assert len("".join(after)) > 0


def test_the_model_is_loaded_once_and_shared(tiny_engine):
    model = tiny_engine.model
    for _ in range(3):
        list(tiny_engine.generate(prompt_for(tiny_engine), GenerationParams(max_new_tokens=2)))
    assert tiny_engine.model is model


@pytest.mark.parametrize("quantization, dtype", [("8bit", torch.int8), ("4bit", torch.uint8), ("bf16", torch.bfloat16)])
def test_quantized_weights_load_and_answer(tiny_model_dir, quantization, dtype):
    engine = Engine.load(str(tiny_model_dir), quantization)
    assert engine.info.quantization == quantization
    weight = engine.model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == dtype
    assert len("".join(engine.generate(prompt_for(engine), GenerationParams(max_new_tokens=5)))) > 0


def test_8bit_cast_warning_is_logged_once_not_per_matmul(tiny_model_dir, caplog):
    engine = Engine.load(str(tiny_model_dir), "8bit")
    with caplog.at_level(logging.WARNING):
        list(engine.generate(prompt_for(engine), GenerationParams(max_new_tokens=20)))
        list(engine.generate(prompt_for(engine), GenerationParams(max_new_tokens=20)))
    casts = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert len(casts) <= 1


def test_auto_quantization_explains_its_choice():
    gib = 2**30
    assert plan_load("auto", cuda=True, fp32_bytes=28 * gib, ram_bytes=64 * gib).quantization == "8bit"
    cpu_small = plan_load("auto", cuda=False, fp32_bytes=1 * gib, ram_bytes=24 * gib)
    assert cpu_small.quantization == "fp32" and "no GPU" in cpu_small.reason
    cpu_big = plan_load("auto", cuda=False, fp32_bytes=27 * gib, ram_bytes=24 * gib)
    assert cpu_big.quantization == "bf16" and "27.0 GiB" in cpu_big.reason
    assert plan_load("4bit", cuda=False, fp32_bytes=1, ram_bytes=1).reason == "requested"


def test_auto_on_this_machine_is_reported_in_the_model_info(tiny_engine):
    assert tiny_engine.info.quantization == "fp32"
    assert "auto: no GPU" in tiny_engine.info.describe()
    assert tiny_engine.info.context_length == 4096


def test_a_missing_local_folder_gives_one_clear_message(tmp_path):
    with pytest.raises(ModelLoadError) as error:
        Engine.load(str(tmp_path / "nowhere"))
    message = str(error.value)
    assert "nowhere" in message and "--model" in message
    assert len(message.splitlines()) == 2


def test_a_hub_model_that_is_not_cached_offline_names_the_model_and_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="microsoft/Orca-2-7b") as error:
        Engine.load("microsoft/Orca-2-7b")
    assert "HF_HOME" in str(error.value)


def test_a_folder_without_weights_is_a_load_error(tiny_model_dir, tmp_path):
    for name in ("config.json", "tokenizer.model"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(ModelLoadError, match="Could not load the model"):
        Engine.load(str(tmp_path))


def test_a_forward_pass_made_while_the_batch_runs_reads_the_same_logits(tiny_engine):
    """transformers' batch steps and a plain forward on the same model must not overlap (see
    generation.one_forward_at_a_time): without turns, one plain pass in two read other logits."""
    engine = batched(tiny_engine)
    ids = torch.tensor([prompt_for(tiny_engine, "How are you?").input_ids])
    with torch.inference_mode():
        alone = tiny_engine.model(ids).logits
    answers = [engine.generate(prompt_for(engine, q), GenerationParams(max_new_tokens=2000)) for q in ("A", "B", "C")]
    try:
        for answer in answers:
            next(iter(answer))
        for _ in range(10):
            with torch.inference_mode():
                assert torch.equal(tiny_engine.model(ids).logits, alone)
    finally:
        for answer in answers:
            answer.cancel()
        engine.close()
