"""`olmoe bench` from a source checkout: olmoe against its peers and the machine's limits.

    .venv/bin/python bench/cpu_inference.py --shape small            # about a minute or two
    .venv/bin/python bench/cpu_inference.py --json released.json     # released shape, ~14 GB/engine

The benchmark itself is `olmoe.benchmarks.cpu_inference` (its doc says what it measures).
"""

import sys

from olmoe.benchmarks.cpu_inference import main

if __name__ == "__main__":
    sys.exit(main())
