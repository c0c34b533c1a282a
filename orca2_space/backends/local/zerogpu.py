"""Hugging Face ZeroGPU: a Space borrows a GPU only inside functions wrapped by `spaces.GPU`.

Off ZeroGPU `spaces.GPU` returns the function unchanged, so the same code path runs everywhere.
On ZeroGPU, `spaces` must be imported before torch (app.py does) and the model must be on "cuda"
before the app launches: ZeroGPU packs the weights for its GPU workers at launch.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

from ..sampling import Sampling
from .generation import stream_tokens
from .scoring import score_ids


def gpu_task(task: Callable, duration: Callable[..., int]) -> Callable:
    """`task` wrapped to run on a ZeroGPU GPU for about `duration(*args)` seconds."""
    import spaces

    return spaces.GPU(task, duration=duration)


# ZeroGPU pickles a task's arguments into a forked GPU worker: the model can't be one of them, so
# it goes as a global the fork inherits. The tasks are wrapped at import, since ZeroGPU registers
# them when the app launches.
_model = None


def lend(model) -> None:
    """The model the GPU tasks run."""
    global _model
    _model = model


def gpu_seconds(input_ids: list[int], sampling: Sampling) -> int:
    """ZeroGPU time to ask for: a little for the prompt, then a generous 20 tokens per second."""
    return min(30 + sampling.max_new_tokens // 20, 300)


def _stream_tokens(input_ids: list[int], sampling: Sampling) -> Generator[int, None, None]:
    yield from stream_tokens(_model, input_ids, sampling, cancel=None)


stream_tokens_on_gpu = gpu_task(_stream_tokens, duration=gpu_seconds)


def _score_ids(input_ids: list[int], n_prompt: int, top: int):
    return score_ids(_model, input_ids, n_prompt, top)


# A full context's passes (scoring.GPU_SCORE_CHUNK positions each): seconds on the GPU.
score_ids_on_gpu = gpu_task(_score_ids, duration=lambda input_ids, n_prompt, top: 30)
