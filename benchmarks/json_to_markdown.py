"""Render a ``normkit bench --json`` record (either suite) as the markdown used in BENCHMARKS.md.

    .venv/bin/python benchmarks/json_to_markdown.py benchmarks/results/cpu.json
    .venv/bin/python benchmarks/json_to_markdown.py benchmarks/results/shapes-*.json
"""

from __future__ import annotations

import json
import sys

from normkit.bench.report import render_markdown

if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(render_markdown(json.load(f)))
