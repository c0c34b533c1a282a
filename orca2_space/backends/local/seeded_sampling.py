"""The next token of a sampled answer (or of one with a repetition penalty), decided by its own seed
and position alone: the same on the single path (model.generate) and in the batch, whoever else is
in the batch. Scheme SCHEME.

torch's sampler draws from one random generator shared by the process (or by the whole batch), so
what an answer gets depends on what else drew before it. Here each draw uses the Gumbel-max trick:
after the repetition penalty, temperature, top-k and top-p, add Gumbel noise G = -log(-log(U)) and
take the argmax; that picks token i with probability softmax(scores)_i, as multinomial sampling
does. U comes from a counter-based hash of (seed, position, token id), so the noise at each step
depends on nothing but the answer's seed and how many tokens it has written.

Both paths decode greedily over the scores this returns: an argmax is the draw. A changed hash,
order or filter changes every sampled answer: that is a new SCHEME, and exports name the one used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from ..sampling import Sampling

# Named in exports: an answer sampled under this scheme replays token for token with its seed.
SCHEME = "gumbel-v1"

_MASK32 = 0xFFFFFFFF
# _best looks for a row's best scores among those at least as good as the best of every 16th.
_SAMPLE_STRIDE = 16


def transforms(sampling: Sampling) -> bool:
    """Whether this answer's scores need anything but a plain argmax (greedy without a penalty doesn't)."""
    return sampling.do_sample or sampling.repetition_penalty != 1.0


def next_token_scores(
    scores: torch.Tensor, settings: Sequence[Sampling], histories: Sequence[torch.Tensor], positions: Sequence[int]
) -> torch.Tensor:
    """Scores [rows, vocab] whose argmax is each row's next token: row r's answer has `settings[r]`,
    has read the ids `histories[r]` (prompt and answer so far, for the repetition penalty) and is
    about to write its token number `positions[r]` (from 0)."""
    scores = scores.float().clone()
    penalised = [row for row, sampling in enumerate(settings) if sampling.repetition_penalty != 1.0]
    if penalised:
        _penalise(scores, penalised, [histories[row] for row in penalised], [settings[row] for row in penalised])
    sampled = [row for row, sampling in enumerate(settings) if sampling.do_sample]
    if not sampled:
        return scores
    chosen = [settings[row] for row in sampled]
    index = torch.tensor(sampled, device=scores.device)
    tempered = _tempered(scores.index_select(0, index), chosen)
    # Every other token scores -inf, and -inf plus noise stays -inf: the noise is needed, and
    # computed, only where a token is kept (a handful of the vocabulary under top-k or top-p).
    rows, tokens = _kept(tempered, chosen)
    keys = _keys([sampling.seed or 0 for sampling in chosen], [positions[row] for row in sampled], scores.device)
    drawn = torch.full_like(tempered, -float("inf"))
    drawn[rows, tokens] = tempered[rows, tokens] + _noise(keys[rows], tokens)
    return scores.index_copy_(0, index, drawn)


def _penalise(scores: torch.Tensor, rows: list[int], histories: list[torch.Tensor], settings: list[Sampling]) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor, on these rows at once, in place: every id
    already read is made less likely (a positive score divided by the penalty, a negative one
    multiplied)."""
    read = [(row, history, s) for row, history, s in zip(rows, histories, settings, strict=True) if len(history)]
    if not read:
        return
    longest = max(len(history) for _, history, _ in read)
    # A history is padded with its own first id: writing a score twice writes the same value.
    ids = torch.stack([torch.cat([history, history[:1].expand(longest - len(history))]) for _, history, _ in read])
    ids = ids.to(scores.device, torch.long)
    index = torch.tensor([row for row, _, _ in read], device=scores.device)
    penalty = torch.tensor([s.repetition_penalty for _, _, s in read], device=scores.device).unsqueeze(-1)
    chosen = scores.index_select(0, index)
    seen = chosen.gather(1, ids)
    scores.index_copy_(0, index, chosen.scatter(1, ids, torch.where(seen < 0, seen * penalty, seen / penalty)))


def _tempered(scores: torch.Tensor, settings: list[Sampling]) -> torch.Tensor:
    temperatures = [s.temperature or 1.0 for s in settings]
    return scores / torch.tensor(temperatures, device=scores.device).unsqueeze(-1)


def _kept(scores: torch.Tensor, settings: list[Sampling]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, token id) pairs that top-k then top-p keep: each row's k best scores (ties at the
    k-th kept too, as transformers does; k 0: all), then the fewest best tokens whose probabilities
    reach p (the best one always, as transformers' TopPLogitsWarper; p 1: all).

    The first version (tests/support_gumbel_v1.py, the oracle) sorted the whole vocabulary twice.
    Both filters keep every score from a threshold up, and both thresholds are found from the best
    scores alone, by the same arithmetic on the same values, so every row keeps the same tokens."""
    vocab = scores.size(-1)
    ks = torch.tensor([min(s.top_k or vocab, vocab) for s in settings], device=scores.device).unsqueeze(-1)
    best, ids = _best(scores, int(ks.max()))
    kth = best.gather(-1, ks - 1).masked_fill(ks == vocab, -float("inf"))
    survivors = (best >= kth).sum(-1, keepdim=True)
    if bool((survivors == best.size(-1)).any()) and best.size(-1) < vocab:
        # Ties at the k-th run past the best scores taken: take enough to hold them all.
        best, ids = _best(scores, int((scores >= kth).sum(-1).max()))
        survivors = (best >= kth).sum(-1, keepdim=True)
    ps = torch.tensor([s.top_p if s.top_p is not None else 1.0 for s in settings], device=scores.device)
    lowest, straddled = _top_p_line(best, kth, survivors, ps, vocab)
    # The best scores come first: a row keeps its first `survivors` that reach its top-p line.
    taken = torch.ones_like(best, dtype=torch.long).cumsum(-1) <= survivors
    taken &= (best >= lowest) & ~straddled.unsqueeze(-1)
    rows, places = taken.nonzero(as_tuple=True)
    tokens = ids[rows, places]
    if bool(straddled.any()):
        tied = straddled.nonzero().squeeze(-1)
        tied_rows, tied_tokens = _kept_by_sorting(scores[tied], kth[tied], ps[tied]).nonzero(as_tuple=True)
        rows, tokens = torch.cat([rows, tied[tied_rows]]), torch.cat([tokens, tied_tokens])
    return rows, tokens


def _best(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `count` best scores and their ids, best first; one more, when there is one, shows
    whether ties at the last run past them."""
    count = min(count + 1, scores.size(-1))
    sample = scores[:, ::_SAMPLE_STRIDE]
    if count > sample.size(-1):
        best, ids = scores.topk(count, dim=-1)
        return best, ids
    # The sample's count-th best has at least `count` scores from it up, in the sample and so in the
    # row: the row's `count` best are among those, a few hundred, and topk over them is cheap.
    floor = sample.topk(count, dim=-1).values[:, -1:]
    rows, ids = (scores >= floor).nonzero(as_tuple=True)
    starts = torch.searchsorted(rows, torch.arange(scores.size(0), device=scores.device))
    places = torch.arange(rows.numel(), device=scores.device) - starts[rows]
    width = int(places.max()) + 1
    candidates = scores.new_full((scores.size(0), width), -float("inf"))
    candidates[rows, places] = scores[rows, ids]
    # A row's padding (-inf) is never among its best: it has `count` candidates above -inf, or its
    # floor is -inf and the whole row is a candidate.
    candidate_ids = torch.zeros_like(candidates, dtype=torch.long)
    candidate_ids[rows, places] = ids
    best, places = candidates.topk(count, dim=-1)
    return best, candidate_ids.gather(-1, places)


def _top_p_line(
    best: torch.Tensor, kth: torch.Tensor, survivors: torch.Tensor, ps: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest score top-p keeps in each row of top-k's survivors, and whether a tie sits across
    that line (then which of the tied tokens is kept depends on how the sort ordered ties, and only
    the full sort tells).

    TopPLogitsWarper sorts the row ascending, takes the softmax and its cumulative sum, and drops
    the positions whose sum is <= 1 - p: a prefix, as the sum only grows. That ascending row is the
    masked tokens' -inf, then the survivors ascending: built here from the best scores, it is the
    same tensor, and the softmax and sum run over it as they did, whole."""
    width = int(survivors.max())
    top = best[:, :width]
    top = top.masked_fill(top < kth, -float("inf")).flip(-1)
    ascending = torch.cat([top.new_full((top.size(0), vocab - width), -float("inf")), top], dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = (cumulative <= (1 - ps).unsqueeze(-1)) & (ps < 1).unsqueeze(-1)
    drop[:, -1] = False
    first_kept = drop.sum(-1, keepdim=True)
    lowest = ascending.gather(-1, first_kept)
    straddled = (first_kept > 0) & (ascending.gather(-1, (first_kept - 1).clamp_min(0)) == lowest)
    return lowest, straddled.squeeze(-1)


def _kept_by_sorting(scores: torch.Tensor, kth: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p's kept tokens [rows, vocab] as the first version found them, sorting the
    whole row."""
    masked = scores.masked_fill(scores < kth, -float("inf"))
    ascending, order = masked.sort(dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = (cumulative <= (1 - ps).unsqueeze(-1)) & (ps < 1).unsqueeze(-1)
    drop[:, -1] = False
    return ~drop.scatter(-1, order, drop) & (scores >= kth)


def gumbel_noise(seeds: Sequence[int], positions: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise [rows, vocab], float32: row r's is a function of (seeds[r], positions[r])
    and nothing else, the same on every device."""
    keys = _keys(seeds, positions, device).unsqueeze(-1)  # [rows, 1]
    return _noise(keys, torch.arange(vocab, dtype=torch.long, device=device).unsqueeze(0))


def _keys(seeds: Sequence[int], positions: Sequence[int], device: torch.device) -> torch.Tensor:
    """Each row's key: its seed's and position's hash."""
    seed = torch.tensor([s & _MASK32 for s in seeds], dtype=torch.long, device=device)  # seeds are 32-bit
    position = torch.tensor(list(positions), dtype=torch.long, device=device)
    return _mix(_mix(seed) ^ position)


def _noise(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The noise of each (key, token id), elementwise (the two broadcast): each value depends on its
    own pair alone, so a few tokens' noise is, bit for bit, what the whole vocabulary's has there."""
    bits = _mix(_mix(tokens) ^ keys)
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


class SeededLogitsProcessor(LogitsProcessor):
    """The single path's hook: model.generate with do_sample=False and this processor decodes the
    answer as the batch does (scores in, scores whose argmax is the draw out)."""

    def __init__(self, sampling: Sampling, prompt_length: int):
        self._sampling = sampling
        self._prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        positions = [input_ids.size(-1) - self._prompt_length] * input_ids.size(0)
        return next_token_scores(scores, [self._sampling] * scores.size(0), list(input_ids), positions)
