"""`python -m graphs RUN_DIR [--out DIR]`: draws the run's pictures, prints one line per file written.

`python -m graphs RUN_DIR RUN_DIR... [--out DIR]`: compares several runs instead: their global accuracy per round on
one plot (`comparison.png` in DIR, default the current folder), each labelled with how it trained.

Exit status: 0 when at least one picture was written, 2 when the run dir is missing or holds nothing drawable.
Skipped rows and pictures are reported on stderr so that stdout stays a plain list of files for other tools.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from graphs.draw import COMPARISON, GRAPHS_DIR, draw_all, draw_comparison  # Agg canvases: no display, no backend
from peer.records.run_dir import RunDirError

EXIT_NO_RECORDS = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphs", description="Draw the pictures of a run dir.")
    parser.add_argument("run_dir", nargs="+", help="the run dir (see docs/RECORDS.md); several: compare them")
    parser.add_argument(
        "--out", help=f"where to write the PNG files (default: RUN_DIR/{GRAPHS_DIR}; for a comparison, here)"
    )
    arguments = parser.parse_args(argv)
    if len(arguments.run_dir) > 1:
        try:
            path = draw_comparison(arguments.run_dir, Path(arguments.out or ".") / COMPARISON)
        except RunDirError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_NO_RECORDS
        print(path)
        return 0
    arguments.run_dir = arguments.run_dir[0]
    try:
        written = draw_all(arguments.run_dir, arguments.out)
    except RunDirError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NO_RECORDS
    if not written:
        print(f"error: nothing could be drawn from {arguments.run_dir}", file=sys.stderr)
        return EXIT_NO_RECORDS
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
