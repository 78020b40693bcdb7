"""Render a ``normkit bench --json`` record as the markdown table used in BENCHMARKS.md.

    .venv/bin/python benchmarks/json_to_markdown.py benchmarks/results/cpu.json
"""

from __future__ import annotations

import json
import sys

from normkit.bench.report import markdown_table

if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(markdown_table(json.load(f)))
