"""`make bench`: the side-by-side comparison recorded in bench/RESULTS.md (flags pass through)."""

from __future__ import annotations

import sys

from bench.side_by_side import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
