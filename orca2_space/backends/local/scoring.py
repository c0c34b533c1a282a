"""Scoring's forward pass: the probability the model gives each token of an answer."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .turns import yielding

# Positions whose output head runs at once: 256 positions of 32003 float32 log-probabilities is
# 33 MB, where a whole 4096-token answer at once would be half a gigabyte, several times over.
HEAD_CHUNK = 256
# Positions the transformer runs in one forward pass, one turn on the model (turns.py): an answer's
# next decode step waits for at most one such pass, never for a whole scoring. On a GPU a pass over
# Positions a scoring pass takes at once. On a GPU, 128 positions of a 7B model cost about what a decode
# step does (both are bound by reading the weights), so answers slow by about one step per chunk while a
# 2000-token scoring still takes only 16 passes; it is half the batch's own prefill chunk
# (BATCH_PAGE_TOKENS, its max_batch_tokens), so no scoring pass is longer than a batch step that
# prefills a prompt. On a CPU a pass is bound by arithmetic, so its cost grows with its positions: at
# 128 an answer waiting behind one waited about as long as its own prefill (a first token 2.5x slower
# under a flood of scorings, docs/performance.md); 32 keeps that wait to a few decode steps, and the
# scoring's own time about the same (the same arithmetic, in more passes).
GPU_SCORE_CHUNK = 128
CPU_SCORE_CHUNK = 32


def score_chunk(device: torch.device) -> int:
    return CPU_SCORE_CHUNK if device.type == "cpu" else GPU_SCORE_CHUNK


def score_ids(
    model, input_ids: list[int], n_prompt: int, top: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """For each id after the first n_prompt: its probability given the ids before it, and the `top`
    (id, probability) pairs most likely there (log_softmax in float32).

    The transformer runs over every id but the last (the last predicts nothing scored), score_chunk
    ids a pass, each pass attending to the ones before through a KV cache: the same numbers as one
    pass (tests/test_scoring.py holds them to it), in turns that let answers' passes go first. The
    output head then runs on the answer's positions only, a chunk at a time. For a causal LM that is
    the model's own forward (Orca 2 is a LlamaForCausalLM: final norm in the base model, then
    lm_head). On ZeroGPU this runs in the GPU worker process, so it returns plain numbers.
    """
    targets = input_ids[n_prompt:]
    probabilities: list[float] = []
    alternatives: list[list[tuple[int, float]]] = []
    with torch.inference_mode():
        states = _hidden_states(model, input_ids[:-1])[n_prompt - 1 :]
        head = model.get_output_embeddings()
        for start in range(0, len(targets), HEAD_CHUNK):
            logprobs = torch.log_softmax(head(states[start : start + HEAD_CHUNK]).float(), dim=-1)
            chosen = torch.tensor(targets[start : start + HEAD_CHUNK], device=logprobs.device)
            probabilities += logprobs.gather(1, chosen[:, None])[:, 0].exp().tolist()
            best, best_ids = logprobs.topk(top, dim=-1)
            alternatives += [list(zip(i, p, strict=True)) for i, p in zip(best_ids.tolist(), best.exp().tolist())]
    return probabilities, alternatives


def _hidden_states(model, ids: list[int]) -> torch.Tensor:
    """The base model's last hidden state at each of `ids`, score_chunk positions a forward pass.

    The cache holds keys and values for every position scored so far: for Orca 2 7B in fp16, 2
    (keys, values) x 32 layers x 4096 x 2 bytes = 512 KiB a token, 1 GiB for a 2000-token answer and
    2 GiB at the full 4096-token context, freed when scoring returns. The engine runs one scoring at a
    time so that this is held once. (The single pass it replaces held no cache, but its activations
    for the whole context at once.)
    """
    everything = torch.tensor([ids], device=model.device)
    cache = DynamicCache(config=model.config)
    states, chunk = [], score_chunk(everything.device)
    with yielding():
        for start in range(0, len(ids), chunk):
            end = min(start + chunk, len(ids))
            # Positions follow from the cache's length; the mask covers the cached ids and this chunk's.
            output = model.base_model(
                input_ids=everything[:, start:end],
                attention_mask=torch.ones((1, end), dtype=torch.long, device=everything.device),
                past_key_values=cache,
                use_cache=True,
            )
            states.append(output.last_hidden_state[0])
    return torch.cat(states)
