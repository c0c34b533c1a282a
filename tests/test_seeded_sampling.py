"""Seeded sampling (gumbel-v1): a seed decides the answer, alone or in a batch of any size, beside
any other requests, on the single path and the batched one; the draws follow the model's
distribution after temperature, top-k and top-p; the repetition penalty is transformers' own; and
exports name the scheme, while an answer sampled before it says that its seed can't redo it."""

import dataclasses
import math
import threading
from pathlib import Path

import pytest
import support_gumbel_v1
import torch
from support import QUESTIONS, answer, batched, prompt_for
from transformers import RepetitionPenaltyLogitsProcessor
from transformers.generation.continuous_batching.requests import RequestState

from orca2_space.backends.contract import GenerationStats, ModelInfo, StopReason
from orca2_space.backends.local import batch_sampling
from orca2_space.backends.local.batching import Batcher, BatchingSettings
from orca2_space.backends.local.seeded_sampling import SCHEME, gumbel_noise, next_token_scores
from orca2_space.backends.sampling import Sampling
from orca2_space.conversation import NOT_REDOABLE, LookedAt, Stats, parse_export, to_markdown
from orca2_space.settings import GenerationParams
from orca2_space.ui.messages import imported_status

EXPORTED_BY_0_3_0 = Path(__file__).parent / "fixtures" / "conversation-0.3.0.json"
SAMPLED = dict(do_sample=True, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
# Settings whose answers go through the seeded scores: sampled (with and without a penalty), and
# greedy with a repetition penalty.
SEEDED = [
    SAMPLED,
    dict(do_sample=True, temperature=1.3, top_p=1.0, top_k=0, seed=7, repetition_penalty=1.2),
    dict(repetition_penalty=1.3),
]
# Neighbours of every kind and length: greedy, sampled with other seeds and settings, penalised.
NEIGHBOURS = [
    dict(max_new_tokens=60),
    dict(max_new_tokens=9, do_sample=True, seed=5, temperature=0.7),
    dict(max_new_tokens=30, repetition_penalty=1.5),
    dict(max_new_tokens=50, do_sample=True, seed=1234, top_k=3),  # the same seed, other settings
    dict(max_new_tokens=20),
    dict(max_new_tokens=45, do_sample=True, seed=99, top_p=0.5),
    dict(max_new_tokens=12, do_sample=True, seed=3, repetition_penalty=1.1),
]


@pytest.fixture(scope="module")
def batch_of_8(tiny_engine):
    engine = batched(tiny_engine, max_concurrent=8)
    yield engine
    engine.close()


def answers_together(engine, requests: list[tuple[str, dict]]) -> list[str]:
    """Each (question, settings) answered at the same time, as concurrent visitors would (40 tokens
    unless the settings say otherwise, as support.answer)."""
    texts: list[str] = [""] * len(requests)

    def ask(index, question, params):
        settings = GenerationParams(**{"max_new_tokens": 40, **params})
        texts[index] = "".join(engine.generate(prompt_for(engine, question), settings))

    threads = [threading.Thread(target=ask, args=(i, q, p)) for i, (q, p) in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return texts


# --- A seed decides the answer ---------------------------------------------------------------------


@pytest.mark.parametrize("params", SEEDED)
def test_the_single_path_redoes_an_answer_from_its_seed(tiny_engine, params):
    first, stats = answer(tiny_engine, QUESTIONS[1], **params)
    assert answer(tiny_engine, QUESTIONS[1], **params)[0] == first and not stats.batched


def test_another_seed_samples_another_answer(tiny_engine):
    assert (
        answer(tiny_engine, QUESTIONS[1], **SAMPLED)[0]
        != answer(tiny_engine, QUESTIONS[1], **SAMPLED | {"seed": 99})[0]
    )


@pytest.mark.parametrize("params", SEEDED)
def test_the_batch_answers_token_for_token_as_the_single_path(batch_of_8, tiny_engine, params):
    alone, stats = answer(batch_of_8, QUESTIONS[1], **params)
    assert stats.batched and stats.seed == params.get("seed")
    assert alone == answer(tiny_engine, QUESTIONS[1], **params)[0]


@pytest.mark.parametrize("size", [2, 4, 8])
def test_a_seeded_answer_is_the_same_in_a_batch_of_any_size_beside_any_requests(batch_of_8, tiny_engine, size):
    alone = answer(tiny_engine, QUESTIONS[2], **SAMPLED)[0]
    neighbours = [(QUESTIONS[i % len(QUESTIONS)], params) for i, params in enumerate(NEIGHBOURS[: size - 1])]
    together = answers_together(batch_of_8, [(QUESTIONS[2], SAMPLED), *neighbours])
    assert together[0] == alone
    # The neighbours, too, each answer as they would alone.
    assert together[1:] == [answer(tiny_engine, q, **p)[0] for q, p in neighbours]


def test_a_seeded_answer_that_waits_for_a_place_in_a_full_batch_is_the_same(batched_tiny, tiny_engine):
    crowd = [(QUESTIONS[i % 4], params) for i, params in enumerate(NEIGHBOURS[:5])]  # 6 requests, 4 places
    together = answers_together(batched_tiny, [*crowd, (QUESTIONS[3], SAMPLED)])
    assert together[-1] == answer(tiny_engine, QUESTIONS[3], **SAMPLED)[0]


def test_a_seeded_answer_is_the_same_beside_long_prompts_read_in_chunks(batch_of_8, tiny_engine):
    """A prompt longer than the batch's step (256 tokens) joins a chunk at a time; meanwhile the batch
    scores a row for it that no token is read from."""
    long = " ".join(f"word{i}" for i in range(300)) + " — which word comes first?"
    requests = [(QUESTIONS[2], SAMPLED), (long, {"max_new_tokens": 10}), (long, SAMPLED | {"seed": 5})]
    together = answers_together(batch_of_8, requests)
    assert together == [answer(tiny_engine, q, **p)[0] for q, p in requests]


@pytest.mark.parametrize("engine_kind", ["single", "batched"])
def test_stop_ends_a_sampled_answers_work_within_one_decode_step(never_ends, engine_kind):
    engine = never_ends if engine_kind == "single" else batched(never_ends)
    try:
        params = GenerationParams(max_new_tokens=3000, **SAMPLED)
        generation = engine.generate(prompt_for(engine), params)
        for n, _ in enumerate(generation, 1):
            if n == 5:
                generation.cancel()
        assert generation.wait(timeout=10)
        stats = generation.stats
        assert stats.stop_reason == "stopped" and stats.tokens_after_cancel <= 1 and stats.n_tokens < 3000
        assert stats.batched == (engine_kind == "batched") and stats.sampling == SCHEME
    finally:
        if engine is not never_ends:
            engine.close()


# --- The draws ------------------------------------------------------------------------------------

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draws(sampling: Sampling, keys: int = 20_000, by: str = "seed") -> torch.Tensor:
    """How often each token of LOGITS is drawn over many keys: seeds 0.. at position 0, or seed 1 at
    positions 0... The keys are fixed, so the counts are too: this can't flake."""
    rows = [dataclasses.replace(sampling, seed=k if by == "seed" else 1) for k in range(keys)]
    positions = [0 if by == "seed" else k for k in range(keys)]
    scores = next_token_scores(LOGITS.repeat(keys, 1), rows, [torch.tensor([])] * keys, positions)
    return torch.bincount(scores.argmax(-1), minlength=LOGITS.numel()) / keys


def assert_drawn_from(frequencies: torch.Tensor, probabilities: torch.Tensor, keys: int = 20_000) -> None:
    """Each frequency within 5 binomial standard deviations of its probability (a true sampler strays
    that far once in about 3 million tries), and a token of probability 0 never drawn."""
    for f, p in zip(frequencies.tolist(), probabilities.tolist(), strict=True):
        assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / keys) + 1e-9, (frequencies, probabilities)


@pytest.mark.parametrize("by", ["seed", "position"])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.8])
def test_the_draws_follow_the_softmax_of_the_tempered_scores(temperature, by):
    sampling = Sampling(1, do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    assert_drawn_from(draws(sampling, by=by), (LOGITS / temperature).softmax(-1))


def test_top_k_keeps_the_k_best_tokens_in_proportion():
    kept = LOGITS.clone()
    kept[2:] = -float("inf")
    assert_drawn_from(draws(Sampling(1, do_sample=True, temperature=1.0, top_p=1.0, top_k=2)), kept.softmax(-1))


def test_top_p_keeps_the_fewest_best_tokens_that_reach_p():
    probabilities = LOGITS.softmax(-1)  # 0.56, 0.21, 0.12, …: 0.56 + 0.21 reaches 0.75
    kept = LOGITS.clone()
    kept[2:] = -float("inf")
    assert probabilities[:2].sum() >= 0.75 > probabilities[0]
    assert_drawn_from(draws(Sampling(1, do_sample=True, temperature=1.0, top_p=0.75, top_k=0)), kept.softmax(-1))


def test_the_noise_depends_on_seed_and_position_alone():
    alone = gumbel_noise([7], [3], 32003, torch.device("cpu"))
    among = gumbel_noise([1, 7, 7, 2**32 - 1], [3, 3, 4, 3], 32003, torch.device("cpu"))
    assert torch.equal(alone[0], among[1])
    assert not torch.equal(among[1], among[2]) and not torch.equal(among[0], among[1])


def test_gumbel_v1_is_pinned():
    """An exported answer names gumbel-v1 and replays with it: a change to the hash, or to how the
    uniforms become noise, is a new scheme (a new SCHEME, and old exports told so), never this one."""
    noise = gumbel_noise([1234], [5], 4, torch.device("cpu"))[0].tolist()
    assert SCHEME == "gumbel-v1"
    assert [round(g, 6) for g in noise] == PINNED_GUMBEL_V1


PINNED_GUMBEL_V1 = [-1.339887, 0.740331, 2.138669, -0.09584]


# --- The transform is gumbel-v1 as first written -----------------------------------------------


def random_case(generator: torch.Generator) -> tuple[torch.Tensor, list[Sampling], list[torch.Tensor], list[int]]:
    """A step of 1 to 9 rows: scores with no ties, with many (a few distinct values, as low-precision
    logits have) or all tied, some -inf; each row greedy or sampled, with or without top-k, top-p,
    temperature and penalty, its own seed, position and history (empty too)."""

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    rows, vocab = int(torch.randint(1, 10, (1,), generator=generator)), pick([2, 7, 300, 32003, 32003])
    scores = torch.randn(rows, vocab, generator=generator) * pick([0.5, 3.0, 10.0])
    kind = pick(["plain", "steps", "bfloat16", "tied", "with -inf"])
    if kind == "steps":
        scores = (scores * 2).round() / 2
    elif kind == "bfloat16":
        scores = scores.bfloat16().float()
    elif kind == "tied":
        scores = torch.full_like(scores, pick([0.0, 1.5]))
    elif kind == "with -inf":
        scores[torch.rand(scores.shape, generator=generator) < 0.3] = -float("inf")
    # A row without top-k makes the whole step look through every score; most steps have none.
    top_ks = pick([[None, 0, 1, 2, 5, 50, 1000, vocab + 3], [1, 2, 5, 50, 1000], [50]])
    settings = [
        Sampling(
            1,
            do_sample=pick([True, True, True, False]),
            temperature=pick([None, 0.3, 0.7, 1.0, 1.7]),
            top_p=pick([None, 1.0, 0.99, 0.9, 0.75, 0.5, 0.01]),
            top_k=pick(top_ks),
            repetition_penalty=pick([1.0, 1.0, 1.1, 1.5]),
            seed=pick([None, 0, 7, 2**32 - 1, int(torch.randint(2**31, (1,), generator=generator))]),
        )
        for _ in range(rows)
    ]
    histories = [torch.randint(vocab, (pick([0, 1, 5, 300]),), generator=generator) for _ in range(rows)]
    positions = [int(torch.randint(4096, (1,), generator=generator)) for _ in range(rows)]
    return scores, settings, histories, positions


@pytest.mark.parametrize("batch", range(8))
def test_every_row_gets_the_scores_gumbel_v1_as_first_written_gives(batch):
    """Scores equal everywhere: the same argmax (the token) and the same tokens kept (the finite
    ones), for every kind of row; the first version (tests/support_gumbel_v1.py) is the oracle."""
    generator = torch.Generator().manual_seed(batch)
    for _ in range(20):
        case = random_case(generator)
        ours, theirs = next_token_scores(*case), support_gumbel_v1.next_token_scores(*case)
        assert torch.equal(ours, theirs), case[1]


def test_a_tie_across_the_top_p_line_keeps_the_tied_token_the_first_version_kept():
    """Ascending, the probabilities sum to 0.04, 0.14, 0.24, 1: top-p 0.8 drops the first two places,
    and the second and third hold the tied tokens 1 and 2, so the sort's order of ties decides."""
    scores = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    case = (scores, [Sampling(1, do_sample=True, top_p=0.8, seed=3)], [torch.tensor([])], [0])
    ours = next_token_scores(*case)
    assert torch.equal(ours, support_gumbel_v1.next_token_scores(*case))
    assert ours.isfinite().sum() == 2 and ours[0, 0].isfinite()


# --- The repetition penalty -----------------------------------------------------------------------


def test_the_repetition_penalty_is_transformers_own():
    scores = torch.randn(1, 500, generator=torch.Generator().manual_seed(0)) * 4
    history = torch.tensor([3, 17, 17, 250, 499, 0])
    ours = next_token_scores(scores, [Sampling(1, repetition_penalty=1.3)], [history], [0])
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(history.unsqueeze(0), scores.clone())
    assert torch.equal(ours, theirs)


def test_a_penalised_answer_on_the_single_path_is_transformers_generate(tiny_engine):
    ids = prompt_for(tiny_engine, QUESTIONS[0]).input_ids
    reference = tiny_engine.model.generate(
        torch.tensor([ids]), max_new_tokens=40, do_sample=False, repetition_penalty=1.3
    )
    text = answer(tiny_engine, QUESTIONS[0], repetition_penalty=1.3)[0]
    assert text == tiny_engine.tokenizer.decode(reference[0, len(ids) :].tolist())
    assert text != answer(tiny_engine, QUESTIONS[0])[0]  # the penalty changed something


# --- transformers' internals that batch_sampling reaches into -------------------------------------


def test_the_request_state_batch_sampling_reads_is_there():
    """batch_sampling reads each scheduled request's settings and ids. If this fails, transformers'
    RequestState changed, and batch_sampling must change with it."""
    state = RequestState(request_id="r", initial_tokens=[1, 2, 3], logit_processor_kwargs={"k": 1})
    state.generated_tokens.append(4)
    assert state.initial_tokens + state.generated_tokens == [1, 2, 3, 4]
    assert state._true_initial_tokens == 0 and state.logit_processor_kwargs == {"k": 1}


def test_the_batch_refuses_a_loop_that_would_score_a_step_after_scheduling_the_next(tiny_engine):
    batcher = Batcher(tiny_engine.model, BatchingSettings(max_concurrent=2, cache_tokens=8192), context_length=4096)
    try:
        with pytest.raises(RuntimeError, match="synchronous batch loop"):
            batch_sampling.install(batcher._manager)  # already started
    finally:
        batcher.close()


# --- Exports --------------------------------------------------------------------------------------

INFO = ModelInfo("tiny", "fp32", "test", "cpu", 4096)


def test_a_sampled_answer_records_its_scheme_and_a_greedy_one_none(tiny_engine):
    sampled = tiny_engine.generate(prompt_for(tiny_engine), GenerationParams(max_new_tokens=3, **SAMPLED))
    greedy = tiny_engine.generate(prompt_for(tiny_engine), GenerationParams(max_new_tokens=3))
    list(sampled), list(greedy)
    assert Stats.of(sampled.stats).sampling == SCHEME and Stats.of(greedy.stats).sampling is None


def test_an_answer_sampled_before_gumbel_v1_imports_saying_its_seed_cannot_redo_it():
    conversation, _ = parse_export(EXPORTED_BY_0_3_0.read_bytes(), LookedAt(), 100)
    (old,) = conversation.exchanges
    assert old.settings.do_sample and old.stats.sampling is None and not old.redoable
    assert NOT_REDOABLE in imported_status(conversation)
    assert NOT_REDOABLE in to_markdown(conversation, INFO, LookedAt())


def test_greedy_and_gumbel_v1_answers_import_as_redoable():
    conversation, _ = parse_export(EXPORTED_BY_0_3_0.read_bytes(), LookedAt(), 100)
    (old,) = conversation.exchanges
    stats = GenerationStats(2, 0.5, StopReason.END_OF_TURN, 7, sampling=SCHEME)
    now = old.model_copy(update={"stats": Stats.of(stats)})
    greedy = old.model_copy(update={"settings": GenerationParams()})
    assert now.redoable and greedy.redoable
    assert imported_status(conversation.model_copy(update={"exchanges": [now, greedy]})) == ""
