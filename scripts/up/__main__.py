"""`python -m scripts.up` (and `./up.sh`, and the `sdfl-up` console script): the launcher's command line."""

from __future__ import annotations

import sys

from scripts.up.cli import main

if __name__ == "__main__":
    sys.exit(main())
