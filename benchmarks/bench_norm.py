"""Layer norm / RMS norm speed: normkit against the memory bandwidth, PyTorch eager and torch.compile.

A thin wrapper over the harness behind ``normkit bench`` (:mod:`normkit.bench`), so both
produce the same numbers; it takes the same options::

    .venv/bin/python benchmarks/bench_norm.py                      # CPU sweep (as `make bench`)
    .venv/bin/python benchmarks/bench_norm.py --quick --no-compile # smoke test, seconds
    .venv/bin/python benchmarks/bench_norm.py --device cuda --json gpu.json --plot gpu.png

See ``normkit bench --help`` for every option and BENCHMARKS.md for recorded results.
"""

import sys

from normkit.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
