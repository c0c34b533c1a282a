"""seeded_sampling's transform inside transformers' continuous batching: every request in the batch
gets its own settings, seed and repetition penalty.

transformers' batch takes per-request temperature, top-k and top-p, but it draws every token from one
shared random generator and has no repetition penalty, and its public API has no way to add either.
This is the one place that reaches into its internals (tests/test_seeded_sampling.py fails when they
change): a per-request logits processor that reads each request's state (its settings, the ids it
has read) when the step is scheduled, and transforms the scores of that step; the batch then takes
the argmax. That pairing holds in the synchronous loop, where the step's scores follow its
scheduling; CONFIG keeps the loop so (no asynchronous batching, no CUDA graphs, no compilation).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)

from ..sampling import Sampling
from .seeded_sampling import next_token_scores, transforms

_KWARG = "orca2_sampling"
# How many of the request's first tokens it had written before the batch set it aside (batching.py):
# they are in its prompt now, and its positions count from before them.
_WRITTEN = "orca2_written"
# ContinuousBatchingConfig fields that keep the step's scores right after its scheduling.
CONFIG: dict[str, Any] = dict(use_async_batching=False, use_cuda_graph=False, default_compile_level=0)
# What a request with no settings of ours (transformers' warm-up) decodes with: plain greedy.
_GREEDY = Sampling(max_new_tokens=1)


def request_kwargs(sampling: Sampling, written: int = 0) -> dict[str, Any]:
    """What add_request takes to decode this request with its own settings; `written`: the answer's
    tokens already written, now at the end of its prompt (a request resumed where it was set aside)."""
    return {_KWARG: sampling, _WRITTEN: written}


def install(manager) -> None:
    """Make the (not yet started) manager decode each request with its own settings; the manager's
    own processors (none: it is greedy) are replaced."""
    config = manager.continuous_batching_config
    if config.use_async_batching or any(config.cuda_graph_booleans) or manager.is_running():
        raise RuntimeError(
            "seeded sampling needs a synchronous batch loop that has not started (batch_sampling.CONFIG)"
        )
    processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([_SeededBatchSampler()]))
    # transformers counts the argument rows of the processors it converts itself; ours takes one.
    processors.tensors_required = 1
    manager.logit_processor = processors


class _SeededBatchSampler(ContinuousBatchingLogitsProcessor):
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self):
        self.supported_kwargs = {_KWARG: Sampling, _WRITTEN: int}
        # The scheduled step's rows, from prepare_tensor_args to __call__ (the same thread, in turn).
        self._step: tuple[list[Sampling], list[torch.Tensor], list[int]] | None = None

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
        settings, histories, positions = [], [], []
        for future in requests_with_new_token:
            state = future.state
            kwargs = state.logit_processor_kwargs
            sampling = kwargs.get(_KWARG, _GREEDY)
            # A request set aside and taken back in (by transformers when its cache ran out, or by
            # batching.py to make room) carries its earlier answer in its prompt.
            prompt_length = (state._true_initial_tokens or len(state.initial_tokens)) - kwargs.get(_WRITTEN, 0)
            read = len(state.initial_tokens) + len(state.generated_tokens)
            # Only the penalty reads the ids: the other rows' are not copied at every step.
            penalised = sampling.repetition_penalty != 1.0
            settings.append(sampling)
            histories.append(torch.tensor(state.initial_tokens + state.generated_tokens if penalised else []))
            positions.append(read - prompt_length)
        self._step = settings, histories, positions
        return torch.zeros(len(settings), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        step, self._step = self._step, None
        # The rows of the requests with a new token come first, in order; the batch scores one more
        # (unread) row for each request still reading its prompt in chunks.
        if step is None or len(step[0]) > scores.size(0):
            raise RuntimeError("transformers' batch no longer scores the rows it scheduled; see batch_sampling.py")
        settings, histories, positions = step
        if not any(map(transforms, settings)):
            return scores  # an all-greedy step: the batch's argmax as it was
        drawn = next_token_scores(scores[: len(settings)], settings, histories, positions)
        return torch.cat([drawn, scores[len(settings) :]])
