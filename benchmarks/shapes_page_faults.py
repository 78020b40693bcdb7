"""Page faults per call in the shapes suite: is a slow cell the kernel or the OS?

Runs the suite's 1-thread cells of 1, 8 and 128 rows in the suite's order (the order leaves
the heap as the full suite does when it reaches 128 rows) and counts, for every timed batch,
the minor page faults of the process (``getrusage``) per call, next to the time per call. On
a VM whose page faults cost microseconds each, a call whose outputs land on freshly mapped
pages (glibc returned them to the OS after the last call, or maps them anew) pays for each
4 KiB page, and which side of a pair gets them depends on the heap's state, not its code::

    PYTHONPATH=src python benchmarks/shapes_page_faults.py > OUT.txt
"""

from __future__ import annotations

import resource

import normkit.bench.paired as paired
from normkit.bench import shapes


def main() -> int:
    batches = []
    timed_batch = paired._batch_ns

    def counting(fn, inner):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ns = timed_batch(fn, inner)
        batches.append((fn, inner, ns, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
        return ns

    paired._batch_ns = counting
    try:
        marks = []
        for cell in shapes.make_cells(threads=(1,), rows=(1, 8, 128)):
            start = len(batches)
            (row,) = shapes.run_suite([cell])
            marks.append((row, batches[start:]))
    finally:
        paired._batch_ns = timed_batch
    for row, cell_batches in marks:
        if row["rows"] != 128:
            continue
        print(f"{shapes.SHORT_OP[row['op']]} {row['mode']} {row['rows']}x{row['width']}: ratio {row['ratio']:.2f}")
        sides = {}
        for fn, inner, ns, faults in cell_batches:
            sides.setdefault(fn, []).append((ns / inner / 1e6, faults / inner))
        for name, (fn, samples) in zip(("torch", "normkit"), sides.items()):  # a, then b, first called in warm-up
            samples = samples[-16:]  # the last timed batches
            print(f"  {name}: ms/call {[round(t, 2) for t, _ in samples]}")
            print(f"  {name}: faults/call {[round(f) for _, f in samples]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
