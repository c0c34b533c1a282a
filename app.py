"""Entry point: `python app.py --help` locally; what a Hugging Face Space runs."""

import sys

from orca2_space.cli import main

if __name__ == "__main__":
    sys.exit(main())
