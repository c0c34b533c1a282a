"""Hugging Face ZeroGPU: a Space borrows a GPU only inside functions wrapped by `spaces.GPU`.

Off ZeroGPU `spaces.GPU` returns the function unchanged, so the same code path runs everywhere.
On ZeroGPU, `spaces` must be imported before torch (app.py does) and the model must be on "cuda"
before the app launches: ZeroGPU packs the weights for its GPU workers at launch.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def on_zerogpu() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


def gpu_task(task: Callable, duration: Callable[..., float]) -> Callable:
    """`task` wrapped to run on a ZeroGPU GPU for about `duration(*args)` seconds."""
    import spaces

    return spaces.GPU(task, duration=duration)
