"""Compare fastbn's BatchNorm2d with PyTorch's on the CPU, through the NumPy API.

    PYTHONPATH=$PWD python bench/compare_batch_norm.py [--threads 2] [--quick]
        [--channels-last] [--backends cython numba] [--repeats 30] [--dtype float32]

For each mode (training forward + backward; eval forward) and each shape of
fastbn.benchmarks.shapes.BATCH_NORM_2D it prints a markdown row: time of torch
(`torch.native_batch_norm` + `torch.ops.aten.native_batch_norm_backward`, no
autograd) and of each fastbn backend (`fastbn.batch_norm_forward` +
`fastbn.batch_norm_backward`), speedups over torch, and time / bandwidth floor;
then per backend the geometric-mean speedup and the worst shape.

Method
- Same threads for both: torch.set_num_threads(n) and fastbn.set_num_threads(n).
- Every result is checked against torch (assert_allclose) before anything is timed.
- Zero copy: torch's tensors are torch.from_numpy views of fastbn's arrays,
  made once, outside the timed region.
- Interleaved timing (fastbn.benchmarks.timing.alternate): warm-up rounds
  (numba compiles there), then rounds of torch, each backend and the floor in
  turn, the order rotating each round; medians over rounds.
- Floor: a multi-threaded copy (fastbn._cython._memory.parallel_copy) moving the
  bytes an ideal kernel must move: 5 x the input's bytes for forward + backward,
  2 x for eval (see fastbn.benchmarks.batch_norm.bytes_moved).
- OpenMP runtimes. torch's wheel bundles torch/lib/libgomp.so.1, with the same
  soname as the system libgomp that fastbn (and numba's omp layer) link, and
  torch loads it RTLD_GLOBAL: the dynamic loader keeps whichever comes first and
  every library runs on that one runtime and its one thread pool. So here there
  is no second pool whose idle threads spin (GOMP_SPINCOUNT, ~3 ms by default)
  on the cores the other needs, and the script runs with the default wait
  policy, as users do. OMP_WAIT_POLICY=passive would slow everyone's small
  shapes (each parallel region then wakes sleeping threads: 1.5-2x here).
  Measured on 2 busy cores by forcing a second runtime (fastbn linked to a
  renamed copy of libgomp, imported before torch, as an auditwheel-repaired
  wheel would be): with the default policy the least disturbed (minimum)
  times of torch and fastbn alike grew 1.5x on the largest case and 3x to 300x
  on small ones; with OMP_WAIT_POLICY=passive they matched the one-runtime
  passive times; sleeping 5 ms between implementations did not help on a busy
  machine (waking up on a busy core costs more). The header lists the OpenMP
  runtimes loaded and warns when there are several: then rerun with
  OMP_WAIT_POLICY=passive (and say so), or fix the installation.
- The header also warns when other processes compete for the cores (their CPU use,
  measured over half a second before the run, fastbn/benchmarks/machine.py): OpenMP
  threads that wait for a core stall every barrier.
"""
import sys

from fastbn.benchmarks.compare import main

if __name__ == "__main__":
    sys.exit(main())
