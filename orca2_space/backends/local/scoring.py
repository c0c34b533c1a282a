"""Scoring's forward pass: the probability the model gives each token of an answer."""

from __future__ import annotations

import torch

# Positions whose output head runs at once: 256 positions of 32003 float32 log-probabilities is
# 33 MB, where a whole 4096-token answer at once would be half a gigabyte, several times over.
HEAD_CHUNK = 256


def score_ids(
    model, input_ids: list[int], n_prompt: int, top: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """For each id after the first n_prompt: its probability given the ids before it, and the `top`
    (id, probability) pairs most likely there, from one forward pass (log_softmax in float32).

    The transformer runs once over every id but the last (the last predicts nothing scored); the
    output head then runs on the answer's positions only, a chunk at a time. For a causal LM that
    is the model's own forward (Orca 2 is a LlamaForCausalLM: final norm in the base model, then
    lm_head). On ZeroGPU this runs in the GPU worker process, so it returns plain numbers.
    """
    targets = input_ids[n_prompt:]
    probabilities: list[float] = []
    alternatives: list[list[tuple[int, float]]] = []
    with torch.inference_mode():
        ids = torch.tensor([input_ids[:-1]], device=model.device)
        hidden = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        states = hidden.last_hidden_state[0, n_prompt - 1 :]
        head = model.get_output_embeddings()
        for start in range(0, len(targets), HEAD_CHUNK):
            logprobs = torch.log_softmax(head(states[start : start + HEAD_CHUNK]).float(), dim=-1)
            chosen = torch.tensor(targets[start : start + HEAD_CHUNK], device=logprobs.device)
            probabilities += logprobs.gather(1, chosen[:, None])[:, 0].exp().tolist()
            best, best_ids = logprobs.topk(top, dim=-1)
            alternatives += [list(zip(i, p, strict=True)) for i, p in zip(best_ids.tolist(), best.exp().tolist())]
    return probabilities, alternatives
