"""gumbel-v1 as first written (seeded_sampling.py before it was made faster): the straightforward
algorithm, kept as an independent oracle. The package's transform must choose the same token and keep
the same tokens as this on every row (tests/test_seeded_sampling.py), and bench/sampling_transform.py
times the two side by side. Don't change it: it is the scheme's definition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from orca2_space.backends.sampling import Sampling

_MASK32 = 0xFFFFFFFF


def next_token_scores(
    scores: torch.Tensor, settings: Sequence[Sampling], histories: Sequence[torch.Tensor], positions: Sequence[int]
) -> torch.Tensor:
    """Scores [rows, vocab] whose argmax is each row's next token: row r's answer has `settings[r]`,
    has read the ids `histories[r]` (prompt and answer so far, for the repetition penalty) and is
    about to write its token number `positions[r]` (from 0)."""
    scores = scores.float().clone()
    for row, (sampling, history) in enumerate(zip(settings, histories, strict=True)):
        if sampling.repetition_penalty != 1.0:
            scores[row] = _penalised(scores[row], history, sampling.repetition_penalty)
    sampled = [row for row, sampling in enumerate(settings) if sampling.do_sample]
    if not sampled:
        return scores
    chosen = [settings[row] for row in sampled]
    warped = _top_p(_top_k(_tempered(scores[sampled], chosen), chosen), chosen)
    seeds = [sampling.seed or 0 for sampling in chosen]
    noise = gumbel_noise(seeds, [positions[row] for row in sampled], scores.size(-1), scores.device)
    scores[sampled] = warped + noise
    return scores


def _penalised(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, for one row: every id already read is made less
    likely (a positive score divided by the penalty, a negative one multiplied)."""
    ids = history.to(scores.device, torch.long)
    seen = scores.gather(0, ids)
    return scores.scatter(0, ids, torch.where(seen < 0, seen * penalty, seen / penalty))


def _tempered(scores: torch.Tensor, settings: list[Sampling]) -> torch.Tensor:
    temperatures = [s.temperature or 1.0 for s in settings]
    return scores / torch.tensor(temperatures, device=scores.device).unsqueeze(-1)


def _top_k(scores: torch.Tensor, settings: list[Sampling]) -> torch.Tensor:
    """Keep each row's k best scores (ties at the k-th kept too, as transformers does); k 0: all."""
    vocab = scores.size(-1)
    ks = torch.tensor([min(s.top_k or vocab, vocab) for s in settings], device=scores.device)
    kth = scores.sort(dim=-1, descending=True).values.gather(-1, (ks - 1).unsqueeze(-1))
    return scores.masked_fill(scores < kth, -float("inf"))


def _top_p(scores: torch.Tensor, settings: list[Sampling]) -> torch.Tensor:
    """Keep the fewest best tokens whose probabilities reach p (the best one always), as transformers'
    TopPLogitsWarper; p 1: all."""
    ps = torch.tensor([s.top_p if s.top_p is not None else 1.0 for s in settings], device=scores.device)
    ascending, order = scores.sort(dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = (cumulative <= (1 - ps).unsqueeze(-1)) & (ps < 1).unsqueeze(-1)
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), -float("inf"))


def gumbel_noise(seeds: Sequence[int], positions: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise [rows, vocab], float32: row r's is a function of (seeds[r], positions[r])
    and nothing else, the same on every device."""
    seed = torch.tensor([s & _MASK32 for s in seeds], dtype=torch.long, device=device)  # seeds are 32-bit
    position = torch.tensor(list(positions), dtype=torch.long, device=device)
    key = _mix(_mix(seed) ^ position).unsqueeze(-1)  # [rows, 1]
    token = _mix(torch.arange(vocab, dtype=torch.long, device=device)).unsqueeze(0)  # [1, vocab]
    bits = _mix(token ^ key)
    uniform = (bits.double() + 0.5) / 2.0**32  # in (0, 1): never 0 or 1
    return (-torch.log(-torch.log(uniform))).float()


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Chris Wellons' lowbias32) in int64 arithmetic: a product may wrap past
    2^63, and its low 32 bits, all that is kept, are right all the same."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)
