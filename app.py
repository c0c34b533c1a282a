"""Entry point: `python app.py --help` locally; what a Hugging Face Space runs."""

import sys

from orca2_space.settings import on_zerogpu

if on_zerogpu():
    # ZeroGPU's package must be imported before torch initialises CUDA.
    import spaces  # noqa: F401

from orca2_space.cli import main

if __name__ == "__main__":
    sys.exit(main())
