"""Benchmark building blocks, shared by the pytest-benchmark suite in bench/ and
the comparison script (bench/compare_batch_norm.py, later ``python -m fastbn bench``).

- `shapes`: the input grids of every op (the one place they are defined).
- `timing`: interleaved timing of several implementations, and the bandwidth floor.
- one module per op (`batch_norm`): its inputs, the implementations to compare
  (every fastbn backend, torch) and the bytes an ideal kernel must move.
- `compare`: the comparison tables.
"""
