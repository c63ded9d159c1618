"""Benchmark building blocks, shared by the pytest-benchmark suite in bench/, the
comparison scripts in bench/ and ``python -m fastbn bench``.

- `shapes`: the input grids of every op (the one place they are defined).
- `timing`: interleaved timing of several implementations, and the bandwidth floor.
- `batch_norm`, `norms`: the cases of each op: inputs, the implementations to
  compare (every fastbn backend, torch), the check against torch; and (in
  `batch_norm`) the bytes an ideal kernel must move.
- `modules`: the module-level cases (torch.nn against fastbn.nn through autograd)
  and the ResNet-18 training step, end to end (the report and bench/test_nn.py).
- `resnet`: the ResNet (torchvision style) of that step and of the fastbn.nn tests.
- `compare`: the BatchNorm tables of bench/compare_batch_norm.py, and the environment
  header of every report.
- `machine`: other processes' CPU use before a run (the busy-machine warning).
- `torch_layouts`: where torch's own ops are wrong (bench/torch_layout_bugs.py).
- `report`: ``python -m fastbn bench``: every op at both levels, the ResNet-18 step,
  tables, results.json and plots.
"""
