"""Hugging Face ZeroGPU: a Space borrows a GPU only inside functions wrapped by `spaces.GPU`.

Off ZeroGPU (any other machine, with or without the `spaces` package) `gpu_task` returns the
function unchanged, so the same code path runs everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def on_zerogpu() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


def gpu_task(task: Callable, duration: Callable[..., float]) -> Callable:
    """`task` wrapped to run on a ZeroGPU GPU for about `duration(*args)` seconds."""
    try:
        import spaces
    except ImportError:
        return task
    return spaces.GPU(task, duration=duration)
