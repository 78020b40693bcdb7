"""``normkit bench``: one harness for the CLI and ``benchmarks/bench_norm.py``.

Two suites. ``kernels`` (the default, described here) measures each kernel on 64 MiB tensors;
``shapes`` (:mod:`~normkit.bench.shapes`) times ``normkit.nn`` modules against ``torch.nn``'s
at the shapes models use, in interleaved pairs.

For each op (``layer_norm``, ``rms_norm``, fused ``add_layer_norm`` / ``add_rms_norm`` with
the pre-norm output), direction (``fwd``, ``bwd``, ``fwd+bwd``) and shape, it reports the
median time after warm-up, the achieved bandwidth counted from the bytes that must move, its
fraction of the copy bandwidth measured in the same run, and the speed ratio against PyTorch
eager, ``torch.compile`` and, on CUDA, Liger-Kernel and QuACK when installed.

Modules, one job each:

* :mod:`~normkit.bench.cases` — ops, directions, default shapes, the bytes-moved model;
* :mod:`~normkit.bench.impls` — the implementations compared, behind one signature;
* :mod:`~normkit.bench.timing` — warm-up + median timer (perf_counter / CUDA events);
* :mod:`~normkit.bench.copy_bandwidth` — the machine's ``dst.copy_(src)`` bandwidth;
* :mod:`~normkit.bench.runner` — times every case with every implementation;
* :mod:`~normkit.bench.paired` — interleaved paired timer, median ratio and its interval;
* :mod:`~normkit.bench.shapes` — the ``shapes`` suite: module against module, 1 and 2 threads;
* :mod:`~normkit.bench.report` — rich table, JSON, matplotlib plot, markdown (both suites);
* :mod:`~normkit.bench.cli` — the command line.
"""

from normkit.bench.cases import DIRECTIONS, OPS, Case, bytes_moved

__all__ = ["DIRECTIONS", "OPS", "Case", "bytes_moved"]
